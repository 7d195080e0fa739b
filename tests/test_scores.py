"""Preview scores (training/scores.py): in every run, the change on prompts without the trigger ("leak"), on the
sample step's line of metrics.jsonl, in the log and the model card; on the toy world, the concept score, attribute
accuracy and Turbo drift, and the guide's claims about them."""

from __future__ import annotations

import json

import numpy as np
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


# --- on the toy world -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy():
    from zimage_lora.toyworld.demo import shipped_models

    return shipped_models()


@pytest.fixture(scope="module")
def untouched(toy):
    """The untouched toy Turbo's probe pictures (with the trigger, without), made once for the tests below."""
    from zimage_lora.toyworld.experiments import TURBO_8, pictures

    return pictures(toy, TURBO_8, None)


def _checkpoint(result, step):
    return result.run_dir / f"{result.run_dir.name}_{step:09d}.safetensors"


def test_the_toy_worlds_scores_are_on_its_runs_sample_lines(toy_lora_run):
    """The demo job previews two prompts with the trigger and two without: every round after step 0 has the
    concept score, the accuracy and (a Turbo path) the Turbo drift, and the leak per prompt without the trigger,
    each what the toy world's scorer says of that round's saved previews (whatever the training reached)."""
    from zimage_lora.toyworld import score, world

    cfg, result = toy_lora_run
    captions = [p.prompt.replace("[trigger]", cfg.job.trigger_word) for p in cfg.sample.prompts]
    scenes = [world.parse_caption(c, cfg.job.trigger_word) for c in captions]

    def scored(step: int, indices: list[int], how) -> float:
        images = []
        for i in indices:
            with Image.open(result.run_dir / "samples" / f"{step:09d}_{i:02d}.png") as im:
                images.append(np.asarray(im.convert("RGB")))
        return how(images, [scenes[i] for i in indices])

    rows = [row for row in _rows(result) if "leak" in row]
    assert [row["step"] for row in rows] == [500, 1000, 1500]
    assert all(set(row["leak_prompts"]) == {"2", "3"} for row in rows)
    accuracy = lambda step: scored(step, [2, 3], lambda i, s: score.accuracy(i, s)["all"])  # noqa: E731
    for row in rows:
        assert row["concept"] == pytest.approx(scored(row["step"], [0, 1], score.concept_score), abs=1e-6)
        assert row["accuracy"] == pytest.approx(accuracy(row["step"]), abs=1e-6)
        assert row["turbo_drift"] == pytest.approx(accuracy(0) - accuracy(row["step"]), abs=1e-6)
        assert row["leak"] < 0.1
    card = (result.run_dir / "README.md").read_text()
    assert "| concept score (toy world) |" in card and "| Turbo drift (toy world) |" in card


def test_leak_is_zero_at_weight_zero_and_grows_with_the_weight(toy, toy_lora_run, untouched):
    from zimage_lora.toyworld.experiments import TURBO_8, leak, pictures

    _, result = toy_lora_run
    leaks = [leak(pictures(toy, TURBO_8, result.final_lora, w)[1], untouched[1]) for w in (0.0, 0.5, 0.75, 1.0)]
    assert leaks[0] == 0.0, leaks  # weight 0: the very same pictures
    assert leaks[1] < leaks[2] < leaks[3], leaks


def test_plain_pictures_in_the_data_keep_the_leak_down(toy, toy_lora_run, toy_lora_short_runs, untouched):
    """The same 500 steps with and without the 24 plain pictures (AI Toolkit's regularisation idea): mixing them in
    leaks less into the prompts without the trigger."""
    from conftest import TOY_SHORT_STEPS

    from zimage_lora.toyworld.experiments import TURBO_8, measure

    _, mixed = toy_lora_run
    _, striped_only = toy_lora_short_runs["no_plain_pictures"]
    with_plain = measure(toy, TURBO_8, _checkpoint(mixed, TOY_SHORT_STEPS), untouched)
    without_plain = measure(toy, TURBO_8, striped_only.final_lora, untouched)
    assert with_plain["leak"] < without_plain["leak"], (with_plain, without_plain)


def test_turbo_drift_with_and_without_the_adapter_as_docs_record_it(toy, toy_lora_run, toy_lora_short_runs, untouched):
    """The adapter experiment's step-500 row (docs/experiments.md, from docs/experiments/adapter.json): the same two
    runs measured here must order as recorded, by at least half the recorded gap; a gap the experiment recorded as
    "not shown" (within the probe set's standard error) is only required to be measured."""
    from pathlib import Path

    from conftest import TOY_SHORT_STEPS

    from zimage_lora.toyworld.experiments import TURBO_8, measure

    recorded = json.loads((Path(__file__).parents[1] / "docs" / "experiments" / "adapter.json").read_text())
    row = lambda arm: next(r for r in recorded[arm] if r["step"] == TOY_SHORT_STEPS)["turbo_8"]  # noqa: E731
    gap = row("a_turbo_without_adapter")["drift"] - row("b_turbo_with_adapter")["drift"]
    shown = recorded["drift_gap_shown"][str(TOY_SHORT_STEPS)]
    _, with_adapter = toy_lora_run
    _, raw = toy_lora_short_runs["raw_turbo"]
    a = measure(toy, TURBO_8, raw.final_lora, untouched)
    b = measure(toy, TURBO_8, _checkpoint(with_adapter, TOY_SHORT_STEPS), untouched)
    assert all(0 <= m["accuracy"] <= 1 and m["leak"] >= 0 for m in (a, b))
    if shown:
        assert (a["drift"] - b["drift"]) * np.sign(gap) >= abs(gap) / 2, (a, b, gap)
