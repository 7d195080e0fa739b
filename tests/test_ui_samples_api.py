"""The samples list of the UI's API (GET /api/jobs/<name>/samples, docs/ui-api.md) carries each preview's settings
read from its PNG text chunks, which the sample viewer shows. The previews are written by the trainer's own
``save_png``/``png_info`` into a created job's run folder, so no training run is needed here (the browser test of the
viewer looks at a trained job's)."""

from __future__ import annotations

import json

import pytest
from test_ui_api import data_dir, job_config, open_client  # noqa: F401 - data_dir: a fixture

from zimage_lora.sampling.previews import PreviewPrompt, png_info, save_png
from zimage_lora.sampling.sampler import SampleSettings
from zimage_lora.training.run_folder import RunFolder
from zimage_lora.ui import runs


def write_preview(run: RunFolder, step: int, index: int, prompt: str, seed: int, lora_scale: float, color) -> None:
    from PIL import Image

    settings = SampleSettings(width=64, height=48, steps=2, guidance=1.5, seed=seed)
    info = png_info(PreviewPrompt(prompt, "blurry", settings, lora_scale), step, "zimage_turbo_adapter", 3.0)
    run.samples_dir.mkdir(parents=True, exist_ok=True)
    save_png(run.sample_path(step, index), Image.new("RGB", (64, 48), color), info)


@pytest.fixture
def job(data_dir, tiny_adapter):  # noqa: F811 - data_dir is the fixture imported above
    """A UI client with a created (never started) job ``fox`` and its run folder."""
    with open_client(data_dir) as client:
        assert client.post("/api/jobs", json={"config": job_config("fox", tiny_adapter)}).status_code == 201
        yield client, RunFolder(client.app.state.ui.runner.job_dir("fox"), "fox")


def test_samples_carry_the_settings_their_pngs_hold(job):
    client, run = job
    write_preview(run, 0, 0, "a photo of zfox sitting", 42, 1.0, (200, 80, 40))
    write_preview(run, 2, 0, "a photo of zfox sitting", 42, 1.0, (180, 90, 40))
    write_preview(run, 2, 1, "a red car in the snow", 43, 0.8, (20, 80, 200))
    (run.samples_dir / "000000004_00.png").write_bytes(b"not a png at all")  # a foreign file of the preview's name

    body = client.get("/api/jobs/fox/samples").json()
    rows = {(s["step"], s["index"]): s for s in body["samples"]}
    assert list(rows) == [(0, 0), (2, 0), (2, 1), (4, 0)]
    assert rows[(2, 1)]["url"] == "/files/jobs/fox/samples/000000002_01.png"  # the fields it had stay
    assert rows[(2, 1)]["meta"] == {
        "prompt": "a red car in the snow",
        "negative_prompt": "blurry",
        "seed": 43,
        "steps": 2,
        "guidance": 1.5,
        "lora_scale": 0.8,
        "width": 64,
        "height": 48,
        "shift": 3.0,
        "arch": "zimage_turbo_adapter",
        "training_step": 2,
    }
    assert rows[(0, 0)]["meta"]["prompt"] == "a photo of zfox sitting" and rows[(0, 0)]["meta"]["training_step"] == 0
    assert rows[(4, 0)]["meta"] is None  # unreadable: no settings, and the list still answers
    assert client.get(rows[(2, 1)]["url"]).status_code == 200

    # The job page's live stream sends the same list.
    with client.stream("GET", "/api/jobs/fox/events?once=1") as stream:
        text = "".join(stream.iter_text())
    event = text.split("event: samples\ndata: ", 1)[1].split("\n", 1)[0]
    assert json.loads(event) == body


def test_settings_come_from_the_chunks_alone_and_are_read_again_when_the_file_changes(job, monkeypatch):
    _, run = job
    write_preview(run, 6, 0, "first words", 1, 1.0, (0, 0, 0))
    path = run.sample_path(6, 0)

    # Pixels that cannot be decoded do not matter: only the text chunks before them are read.
    data = bytearray(path.read_bytes())
    idat = data.index(b"IDAT") + 4
    data[idat : idat + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))
    reads = []
    read = runs._read_sample_meta
    monkeypatch.setattr(runs, "_read_sample_meta", lambda p: reads.append(p) or read(p))
    assert runs.sample_meta(path)["prompt"] == "first words"
    assert runs.sample_meta(path)["prompt"] == "first words"
    assert reads == [path]  # the second ask came from the cache

    write_preview(run, 6, 0, "other words, a longer prompt", 5, 0.5, (9, 9, 9))  # a new run wrote it again
    meta = runs.sample_meta(path)
    assert (meta["prompt"], meta["seed"], meta["lora_scale"]) == ("other words, a longer prompt", 5, 0.5)
    assert reads == [path, path]


def test_the_single_text_keys_stand_in_for_a_missing_parameters_chunk(tmp_path):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    for key, value in {"prompt": "only keys", "seed": "7", "guidance": "3.5", "steps": "many"}.items():
        meta.add_text(key, value)
    path = tmp_path / "000000001_00.png"
    Image.new("RGB", (32, 16)).save(path, pnginfo=meta)
    # "many" is no step count: left out, not guessed; the size comes from the image when the text lacks it
    assert runs.sample_meta(path) == {"prompt": "only keys", "seed": 7, "guidance": 3.5, "width": 32, "height": 16}
