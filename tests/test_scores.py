"""Preview scores (training/scores.py): in every run, the change on prompts without the trigger ("leak"), on the
sample step's line of metrics.jsonl, in the log and the model card; on the toy world, the concept score, attribute
accuracy and Turbo drift, and the guide's claims about them."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from zimage_lora.config import load_job
from zimage_lora.training.recipe import train
from zimage_lora.training.scores import PreviewScorer, change, has_trigger, thumbnail


def _rows(result):
    return [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]


def test_thumbnails_and_the_change_between_them(tmp_path):
    black = Image.new("RGB", (128, 96), (0, 0, 0))
    white = Image.new("RGB", (128, 96), (255, 255, 255))
    assert thumbnail(black).shape == (64, 64)
    assert change(thumbnail(black), thumbnail(black)) == 0.0 and change(thumbnail(black), thumbnail(white)) == 1.0
    grey = Image.new("RGB", (128, 96), (128, 128, 128))
    assert change(thumbnail(black), thumbnail(grey)) == pytest.approx(128 / 255, abs=1e-6)
    assert has_trigger("a zfox, on a rock", "zfox") and not has_trigger("a zfoxes den", "zfox")
    assert not has_trigger("anything", None)
    paths = []
    for index, image in enumerate((black, white, grey)):
        paths.append(tmp_path / f"{index}.png")
        image.save(paths[-1])
    scorer = PreviewScorer(["zfox here", "a car", "a tree"], "zfox", toy_world=False, distilled=False)
    assert scorer.plain == [1, 2]
    scorer.set_reference(paths)
    same = scorer.score(paths)
    assert same.leak == 0.0 and same.leak_prompts == {"1": 0.0, "2": 0.0}
    moved = scorer.score([paths[0], paths[0], paths[2]])  # prompt 1 went from white to black
    assert moved.leak_prompts == {"1": 1.0, "2": 0.0} and moved.leak == 0.5
    only_trigger = PreviewScorer(["zfox here"], "zfox", toy_world=False, distilled=False).score(paths[:1])
    assert only_trigger.leak is None and "every preview prompt has the trigger word" in only_trigger.leak_note


def test_every_run_scores_its_preview_rounds_on_their_metrics_lines(make_job):
    """Sample steps (here 2, 4 and the last) carry the scores; other steps do not; step 0 is the reference."""
    job = make_job(
        {"train": {"steps": 5}, "sample": {"every": 2, "steps": 2, "prompts": ["[trigger], a fox", "a red car"]}}
    )
    result = train(load_job(job), progress=False)
    rows = _rows(result)
    scored = [row["step"] for row in rows if "leak" in row]
    assert scored == [2, 4, 5] and [row["step"] for row in rows] == [1, 2, 3, 4, 5]
    assert all(set(row["leak_prompts"]) == {"1"} and 0 <= row["leak"] <= 1 for row in rows if "leak" in row)
    assert rows[-1]["leak"] > 0  # the LoRA changed the prompt without the trigger a little
    assert "concept" not in rows[-1]  # not a toy-world model
    log = (result.run_dir / "train.log").read_text()
    assert "scores at step 5: change on prompts without the trigger" in log
    card = (result.run_dir / "README.md").read_text()
    assert "| change on prompts without the trigger |" in card and "`tiny.safetensors`" in card


def test_a_run_whose_prompts_all_have_the_trigger_says_why_there_is_no_leak(make_job):
    job = make_job({"train": {"steps": 2}, "sample": {"every": 1, "steps": 2, "prompts": ["[trigger], a fox"]}})
    result = train(load_job(job), progress=False)
    rows = _rows(result)
    assert all("leak" not in row and "every preview prompt has the trigger" in row["leak_note"] for row in rows)
    assert "n/a (every preview prompt has the trigger word" in (result.run_dir / "README.md").read_text()
