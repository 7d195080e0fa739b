"""`zimage-lora caption`: captions from tiny random Qwen3-VL and Florence-2 models of the real classes, no network.

The models are built once per module (models/tiny_captioner.py) and loaded through the same path as the hub repos.
Their words are random, so the tests check what the captioner does with them: one file per image, the trigger first,
tags joined by commas, the word cap, existing captions kept, nothing written on a dry run, whole files after a kill,
corrupt images skipped by name, every image upright RGB at the processor, the same captions on a rerun. What a
caption is made of a model's answer (preambles, refusals) is checked on fixed answers.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from zimage_lora.captioning import registry
from zimage_lora.captioning.captioner import Florence2Captioner, Qwen3VLCaptioner, load_captioner, resolve_captioner
from zimage_lora.captioning.prompts import clean_caption, instruction
from zimage_lora.captioning.run import (
    CaptionOptions,
    caption_folder,
    plan,
    zimage_prompt_limit,
    zimage_token_counter,
)
from zimage_lora.errors import UserError
from zimage_lora.models.tiny_captioner import build_tiny_florence2, build_tiny_qwen3_vl


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return build_tiny_qwen3_vl(tmp_path_factory.mktemp("captioners") / "qwen3-vl")


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    with load_captioner(str(qwen_dir), device="cpu") as loaded:
        yield loaded


@pytest.fixture(scope="module")
def florence(tmp_path_factory):
    folder = build_tiny_florence2(tmp_path_factory.mktemp("captioners") / "florence-2")
    with load_captioner(str(folder), device="cpu") as loaded:
        yield loaded


def picture(seed: int, size=(72, 56)) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    return coarse.resize(size, Image.Resampling.BILINEAR)


def dataset(folder, count: int = 3):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        picture(i, (64 + 16 * i, 56)).save(folder / f"img{i}.png")
    return folder


def run(folder, captioner, **options):
    opts = CaptionOptions(**options)
    return caption_folder(plan(folder, opts.overwrite), captioner, opts, progress=False)


def caption_files(folder) -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt"))}


# --- the models -----------------------------------------------------------------------------------------------------
def test_tiny_models_are_the_real_classes_loaded_like_hub_folders(qwen, florence, qwen_dir):
    assert isinstance(qwen, Qwen3VLCaptioner) and isinstance(florence, Florence2Captioner)
    assert type(qwen.model).__name__ == "Qwen3VLForConditionalGeneration"
    assert type(florence.model).__name__ == "Florence2ForConditionalGeneration"
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja",
            "preprocessor_config.json"} <= {p.name for p in qwen_dir.iterdir()}  # fmt: skip
    # the folder asks for sampling (as Qwen3-VL's does); the captioner decodes greedily anyway
    assert json.loads((qwen_dir / "generation_config.json").read_text())["do_sample"] is True
    for loaded in (qwen, florence):
        config = loaded.model.generation_config
        assert config.do_sample is False and config.num_beams == 1 and config.temperature is None


def test_model_references_fail_in_one_sentence(tmp_path, monkeypatch, florence):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as offline:
        resolve_captioner(registry.DEFAULT_MODEL)
    message = str(offline.value)
    assert "hf download Qwen/Qwen3-VL-8B-Instruct --revision main" in message and "\n" not in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        resolve_captioner(str(tmp_path / "empty"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(UserError, match="is a llama; the captioner reads qwen3_vl and florence2"):
        load_captioner(str(tmp_path / "other"), device="cpu")
    with pytest.raises(UserError, match="not a folder, a hub id or a known name"):
        resolve_captioner("no such model")
    with pytest.raises(UserError, match="Florence-2 writes sentences, not tags"):
        florence.request("tags")
    with pytest.raises(UserError, match="Florence-2 takes no instruction"):
        florence.request("character", "Describe the dog.")


# --- captions -------------------------------------------------------------------------------------------------------
def test_one_caption_per_image_with_the_trigger_first(tmp_path, qwen, florence):
    folder = dataset(tmp_path / "qwen", 3)
    report = run(folder, qwen, trigger="zfox", max_words=6)
    files = caption_files(folder)
    assert sorted(files) == ["img0.txt", "img1.txt", "img2.txt"]
    assert report.written == ["img0.png", "img1.png", "img2.png"]
    for text in files.values():
        assert text.startswith("[trigger], ") and text.endswith("\n") and text.count("\n") == 1
        assert 1 <= len(text.removeprefix("[trigger], ").split()) <= 6  # the word cap; the trigger is extra
    assert len(set(files.values())) > 1  # the answers depend on the picture

    words = run(folder, qwen, trigger="zfox", trigger_style="word", overwrite=True, dry_run=True, max_words=6)
    assert all(p.caption.startswith("zfox, ") for p in words.proposals)
    assert caption_files(folder) == files  # a dry run writes nothing

    other = dataset(tmp_path / "florence", 2)
    run(other, florence, mode="style", trigger="zfox", trigger_style="word", max_words=5)
    assert [t.startswith("zfox, ") for t in caption_files(other).values()] == [True, True]


def test_tags_are_joined_by_commas_under_the_word_cap(tmp_path, qwen):
    folder = dataset(tmp_path / "tags", 2)
    report = run(folder, qwen, mode="tags", trigger="zfox", max_words=3, dry_run=True)
    for proposal in report.proposals:
        first, *tags = proposal.caption.split(", ")
        assert first == "[trigger]" and tags and sum(len(t.split()) for t in tags) <= 3
        assert all(t == t.strip() and t for t in tags)
    assert "Lowercase tags" in instruction("tags") and "at most 3 words" in instruction("tags", max_words=3)
    assert instruction("style", prompt="Say what you see.") == "Say what you see."


def test_existing_captions_are_kept_unless_overwrite_and_corrupt_images_are_named(tmp_path, qwen):
    folder = dataset(tmp_path / "mixed", 3)
    (folder / "img0.txt").write_text("a caption someone wrote")
    (folder / "img1.txt").write_text("  \n")  # empty: counts as missing
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    good = io.BytesIO()
    picture(9).save(good, format="JPEG")
    (folder / "cut.jpg").write_bytes(good.getvalue()[:200])
    report = run(folder, qwen, max_words=4, batch=2)
    assert report.skipped == ["img0.png"] and report.written == ["img1.png", "img2.png"]
    assert (folder / "img0.txt").read_text() == "a caption someone wrote"
    assert (folder / "img1.txt").read_text().strip()
    assert not (folder / "broken.txt").exists() and not (folder / "cut.txt").exists()
    problems = {p.file: p.problem for p in report.problems}
    assert set(problems) == {"broken.png", "cut.jpg"}
    assert all("unreadable image, skipped" in message for message in problems.values())

    again = run(folder, qwen, max_words=4, overwrite=True)
    assert "img0.png" in again.written and (folder / "img0.txt").read_text() != "a caption someone wrote"


def test_rerun_gives_the_same_captions(tmp_path, qwen):
    folder = dataset(tmp_path / "twice", 3)
    first = [p.caption for p in run(folder, qwen, dry_run=True, max_words=8, batch=3).proposals]
    second = [p.caption for p in run(folder, qwen, dry_run=True, max_words=8, batch=3).proposals]
    assert first == second and all(first)


def test_every_image_reaches_the_processor_upright_rgb(tmp_path, qwen, monkeypatch):
    folder = tmp_path / "kinds"
    folder.mkdir()
    halves = np.zeros((20, 40, 3), np.uint8)
    halves[:, :20] = (255, 0, 0)  # stored: red left half, blue right half
    halves[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: red on top
    Image.fromarray(halves).save(folder / "phone.jpg", exif=exif.tobytes(), quality=95)
    Image.fromarray(halves).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    Image.fromarray((np.arange(40)[None, :].repeat(20, 0) * 1600).astype(np.uint16)).save(folder / "deep16.png")
    palette = Image.new("P", (40, 20))
    palette.putpalette([0, 255, 0] + [0, 0, 0] * 255)  # index 0 is green
    palette.save(folder / "palette.png")
    clear = np.zeros((20, 40, 4), np.uint8)
    clear[:, 20:] = (0, 0, 255, 255)  # left half fully transparent black, right half opaque blue
    Image.fromarray(clear, "RGBA").save(folder / "alpha.png")

    seen = {}
    prepare = qwen.prepare

    def recording(images, request):
        for image in images:
            seen[len(seen)] = image.copy()
        return prepare(images, request)

    monkeypatch.setattr(qwen, "prepare", recording)
    report = run(folder, qwen, dry_run=True, max_words=3, batch=2)
    order = [p.file for p in report.proposals]
    assert order == ["alpha.png", "cmyk.jpg", "deep16.png", "palette.png", "phone.jpg"] and not report.problems
    images = dict(zip(order, seen.values(), strict=True))
    assert all(image.mode == "RGB" for image in images.values())
    px = {name: np.asarray(image).astype(int) for name, image in images.items()}
    assert images["phone.jpg"].size == (20, 40)  # upright: portrait
    assert px["phone.jpg"][5, 10, 0] > 200 and px["phone.jpg"][35, 10, 2] > 200  # red on top, blue below
    assert px["cmyk.jpg"][10, 5, 0] > 200 and px["cmyk.jpg"][10, 35, 2] > 200
    assert abs(px["deep16.png"][0, 39, 0] - 39 * 1600 / 256) <= 1 and len(set(px["deep16.png"][0, :, 0])) > 20
    assert tuple(px["palette.png"][0, 0]) == (0, 255, 0)
    assert tuple(px["alpha.png"][10, 5]) == (255, 255, 255) and tuple(px["alpha.png"][10, 35]) == (0, 0, 255)


def test_refusals_and_empty_answers_are_reported_and_not_written(tmp_path, qwen, monkeypatch):
    folder = dataset(tmp_path / "refuse", 3)
    answers = iter(["I'm sorry, but I can't help with that.", "", "The image shows a red fox."])
    monkeypatch.setattr("zimage_lora.captioning.captioner.max_new_tokens", lambda max_words: 2)  # answers are faked
    monkeypatch.setattr(qwen, "decode", lambda output, inputs: [next(answers) for _ in range(len(output))])
    report = run(folder, qwen)
    problems = {p.file: p.problem for p in report.problems}
    assert problems == {
        "img0.png": "the model refused: 'I'm sorry, but I can't help with that.'",
        "img1.png": "the model gave an empty answer",
    }
    assert caption_files(folder) == {"img2.txt": "A red fox.\n"}


def test_captions_over_the_zimage_prompt_limit_are_reported(tmp_path, qwen, monkeypatch, tiny_model_dir):
    assert zimage_prompt_limit() == 512
    count = zimage_token_counter(str(tiny_model_dir))  # the tiny Z-Image's byte-level tokenizer: a token per byte
    assert count("a fox") == count("") + 5
    folder = dataset(tmp_path / "long", 2)
    long_answer = "A fox " + "sits " * 400
    monkeypatch.setattr(qwen, "decode", lambda output, inputs: [long_answer, "A fox."][: len(output)])
    monkeypatch.setattr("zimage_lora.captioning.captioner.max_new_tokens", lambda max_words: 2)
    opts = CaptionOptions(batch=2)
    exact = caption_folder(plan(folder, False), qwen, opts, count_tokens=count, progress=False)
    (problem,) = [p.problem for p in exact.problems]
    assert exact.problems[0].file == "img0.png" and f"{count(exact.proposals[0].caption)} tokens" in problem
    assert "over Z-Image's 512" in problem and len(caption_files(folder)) == 2  # written all the same
    estimated = caption_folder(plan(folder, True), qwen, opts, progress=False)
    assert "(estimated; --zimage-model counts them)" in estimated.problems[0].problem


def test_quantized_captioner_answers(qwen_dir):
    from zimage_lora.models.quant import QuantLinear

    with load_captioner(str(qwen_dir), device="cpu", quantize="nf4") as quantized:
        layers = [m for m in quantized.model.modules() if isinstance(m, QuantLinear)]
        assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down of each language-model layer
        assert all(quantized.answer([picture(0)], quantized.request("object", max_words=4), 12))
    with pytest.raises(UserError, match="--quantize: 'fp8' is not one of nf4, int8"):
        load_captioner(str(qwen_dir), device="cpu", quantize="fp8")


# --- the command ----------------------------------------------------------------------------------------------------
def test_cli_dry_run_writes_only_the_proposals_json(tmp_path, qwen_dir):
    folder = dataset(tmp_path / "ui", 3)
    (folder / "img1.txt").write_text("kept as it is")
    out = tmp_path / "proposals.json"
    proc = run_cli("caption", folder, "--dry-run", "--json", out, "--model", qwen_dir, "--mode", "tags",
                   "--trigger", "zfox", "--skip-existing", "--device", "cpu", "--max-words", "5")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert caption_files(folder) == {"img1.txt": "kept as it is"}
    proposals = json.loads(out.read_text())
    assert [sorted(p) for p in proposals] == [["caption", "existing", "file", "problem"]] * 3
    assert [p["file"] for p in proposals] == ["img0.png", "img1.png", "img2.png"]
    assert proposals[1] == {"file": "img1.png", "caption": None, "existing": "kept as it is", "problem": None}
    assert all(p["caption"].startswith("[trigger], ") for p in (proposals[0], proposals[2]))
    assert "img0.png: [trigger], " in proc.stdout and "proposed 2 caption(s)" in proc.stdout
    assert "img/s" in proc.stderr or "s/img" in proc.stderr  # the progress bar, with its rate

    bad = run_cli("caption", folder, "--skip-existing", "--overwrite", "--model", qwen_dir)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: --skip-existing and --overwrite")


def test_cli_killed_mid_run_keeps_whole_files_and_a_rerun_finishes(tmp_path, qwen_dir):
    folder = dataset(tmp_path / "killed", 4)
    args = ("caption", folder, "--model", qwen_dir, "--device", "cpu", "--max-words", "6", "--no-progress")
    killed = run_cli(*args, fault="kill@caption.file:2")
    assert killed.returncode == -9
    first = caption_files(folder)
    assert sorted(first) == ["img0.txt", "img1.txt"] and not list(folder.glob("*.tmp"))
    assert all(text.endswith("\n") and text.strip() for text in first.values())
    rerun = run_cli(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert "wrote 2 caption(s)" in rerun.stdout and "kept 2 existing" in rerun.stdout
    after = caption_files(folder)
    assert sorted(after) == [f"img{i}.txt" for i in range(4)] and {k: after[k] for k in first} == first


# --- pure parts -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("answer", "caption"),
    [
        ("The image shows a woman in a red coat standing on a bridge.", "A woman in a red coat standing on a bridge."),
        ("This image depicts two cats asleep on a sofa.", "Two cats asleep on a sofa."),
        ("In this picture, a man rides a bicycle.", "A man rides a bicycle."),
        ("In the image, we see a lighthouse at dusk.", "A lighthouse at dusk."),
        ("The image is a close-up photo of a ceramic mug.", "A close-up photo of a ceramic mug."),
        ("The scene is set in a forest.", "The scene is set in a forest."),  # no preamble there
        ('Here is a caption: "A dog on a beach."', "A dog on a beach."),
        ("**Caption:** A vase of tulips.", "A vase of tulips."),
        ("<think>the user wants a caption</think>\nA boat on a lake.", "A boat on a lake."),
        ("A girl\nwith a kite,\n- running", "A girl with a kite, running"),
    ],
)
def test_preambles_and_formatting_are_stripped(answer, caption):
    assert clean_caption(answer, "character").caption == caption


@pytest.mark.parametrize(
    "answer",
    ["I'm sorry, I can't describe this image.", "I cannot help with that.", "I\u2019m unable to caption this.",
     "Sorry, this picture is not something I can describe.", "As an AI, I cannot see images."],
)  # fmt: skip
def test_refusals_give_no_caption(answer):
    cleaned = clean_caption(answer, "character", "[trigger]")
    assert cleaned.caption is None and cleaned.problem.startswith("the model refused: ")


def test_clean_caption_rules():
    assert clean_caption("  \n ", "style").problem == "the model gave an empty answer"
    assert clean_caption("The image shows", "style").caption is None  # only a preamble
    assert clean_caption("...", "style").problem.startswith("the model gave no caption")
    tags = clean_caption("1. red hair\n2. Red hair; smile, outdoors.\n- daylight", "tags", "zfox")
    assert tags.caption == "zfox, red hair, smile, outdoors, daylight"
    assert clean_caption("red hair, green eyes, smile", "tags", max_words=4).caption == "red hair, green eyes"
    assert clean_caption("zfox, a fox in snow", "object", "zfox").caption == "zfox, a fox in snow"  # not twice
    long = "A fox sits in the snow. It looks at the camera with bright amber eyes and a bushy tail."
    assert clean_caption(long, "object", max_words=8).caption == "A fox sits in the snow."  # whole sentence
    cut = clean_caption(long, "object", max_words=14).caption  # a sentence of 6 words is too short a part of 14
    assert cut == "A fox sits in the snow. It looks at the camera with bright amber"
    assert clean_caption("zfoxes run", "object", "zfox").caption == "zfox, zfoxes run"
    assert clean_caption("A fox, a hare, a crow and an owl", "object", max_words=3).caption == "A fox, a"


def test_default_model_size_from_its_published_config():
    counts = registry.parameter_counts(registry.QWEN3_VL_8B)
    assert round(sum(counts.values()) / 1e9, 2) == 8.77  # the model card's 8.77B
    assert registry.DEFAULT.licence == "Apache-2.0" and registry.DEFAULT.ref == "Qwen/Qwen3-VL-8B-Instruct@main"
    bf16 = registry.weight_bytes(registry.QWEN3_VL_8B)
    assert bf16 == 2 * sum(counts.values())
    assert (
        registry.weight_bytes(registry.QWEN3_VL_8B, "nf4")
        < 0.45 * bf16
        < registry.weight_bytes(registry.QWEN3_VL_8B, "int8")
    )


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_size_formula_matches_the_quantized_layer(mode):
    import torch

    from zimage_lora.models.quant import QuantLinear

    layer = QuantLinear(torch.randn(48, 80), None, mode, "cpu")
    assert registry.quantized_linear_bytes(48, 80, mode) == layer.stored_bytes()


def test_dataset_check_counts_missing_captions_and_suggests_the_command(tmp_path):
    from zimage_lora.data.check import check_dataset, format_report

    folder = dataset(tmp_path / "my data", 3)
    (folder / "img0.txt").write_text("[trigger] a picture")
    (folder / "img1.txt").write_text("")
    text = format_report(check_dataset(folder, [64], "zfox"), "zfox")
    assert "captions: 2 of 3 readable images have none (missing or empty)" in text
    assert f"zimage-lora caption '{folder}' --trigger zfox" in text
    (folder / "img1.txt").write_text("[trigger] b")
    (folder / "img2.txt").write_text("[trigger] c")
    assert "captions:" not in format_report(check_dataset(folder, [64], "zfox"), "zfox")
