"""Datasets as users bring them: a generated messy folder through discovery, training, caches and `dataset check`."""

from __future__ import annotations

import gc
import io
import os
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import run_cli
from PIL import Image

from zimage_lora.config import load_job
from zimage_lora.data import cache as cache_module
from zimage_lora.data.dataset import build_samples, discover, epoch_batches, list_images, load_rgb
from zimage_lora.errors import UserError
from zimage_lora.training import recipe
from zimage_lora.training.recipe import train


def gradient(size, seed=0) -> np.ndarray:
    """A smooth picture with some structure (distinct per seed), uint8 RGB."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    a, b, c = rng.uniform(0.02, 0.2, 3)
    img = np.stack([np.sin(xx * a + seed), np.cos(yy * b + seed), np.sin((xx + yy) * c)], -1)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((w, h), Image.BILINEAR)
    return ((img + 1) * 40 + np.asarray(coarse) * 0.68).clip(0, 255).astype(np.uint8)  # distinct layouts per seed


def make_messy_folder(root: Path) -> Path:
    """Every kind of file a real dataset folder turns up with."""
    root.mkdir(parents=True)
    rgb = lambda seed, size=(96, 80): Image.fromarray(gradient(size, seed))  # noqa: E731
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait (a phone photo)
    rgb(1, (96, 72)).save(root / "phone.JPG", exif=exif.tobytes())
    alpha = rgb(2).convert("RGBA")
    alpha.putalpha(Image.fromarray(np.where(np.arange(96)[None, :] < 48, 0, 255).astype(np.uint8).repeat(80, 0)))
    alpha.save(root / "alpha.png")
    rgb(3).convert("L").save(root / "gray.png")
    rgb(4).convert("P", palette=Image.Palette.ADAPTIVE).save(root / "palette.png")
    rgb(5).convert("CMYK").save(root / "cmyk.jpg")
    deep = gradient((96, 80), 6)[..., 0].astype(np.uint16) * 257
    Image.fromarray(deep).save(root / "deep16.png")  # 16-bit greyscale
    rgb(7).convert("LA").save(root / "grey_alpha.png")
    rgb(8).save(root / "upper.PNG")
    rgb(9).save(root / "photo.jpeg")
    rgb(10).save(root / "web.webp")
    rgb(11).save(root / "bitmap.bmp")
    rgb(12, (40, 40)).save(root / "tiny.png")  # too small for 64 px training
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    good = io.BytesIO()
    rgb(13).save(good, format="JPEG")
    (root / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (root / "notes.txt").write_text("not a caption: no image of that name")
    (root / "sub").mkdir()
    rgb(14).save(root / "sub" / "nested.png")
    # captions: UTF-8 with BOM, Latin-1 (invalid UTF-8), empty, missing (upper.PNG), with [trigger], without it
    (root / "phone.txt").write_bytes("\ufeff[trigger] on a  phone,\n taken outside".encode())
    (root / "alpha.txt").write_bytes("[trigger] café crème".encode("latin-1"))
    (root / "gray.txt").write_text("   ")
    (root / "palette.txt").write_text("a palette image without the trigger")
    for name in ("cmyk", "deep16", "grey_alpha", "photo", "web", "bitmap", "tiny"):
        (root / f"{name}.txt").write_text(f"[trigger] {name}")
    return root


class _Dataset:
    def __init__(self, path, **kw):
        self.path, self.caption_ext, self.default_caption, self.repeats = path, "txt", "a default", 1
        self.recursive, self.cache_dir = False, None
        self.__dict__.update(kw)


@pytest.fixture
def messy(tmp_path) -> Path:
    return make_messy_folder(tmp_path / "messy")


READABLE = (
    "phone.JPG",
    "alpha.png",
    "gray.png",
    "palette.png",
    "cmyk.jpg",
    "deep16.png",
    "grey_alpha.png",
    "upper.PNG",
    "photo.jpeg",
    "web.webp",
    "bitmap.bmp",
)


def test_discovery_finds_every_image_kind(messy):
    names = {p.name for p in list_images(messy)}
    assert names == {*READABLE, "tiny.png", "corrupt.png", "truncated.jpg"}
    assert {p.name for p in list_images(messy, recursive=True)} == names | {"nested.png"}
    (messy / ".zimage_cache").mkdir()
    Image.new("RGB", (64, 64)).save(messy / ".zimage_cache" / "x.png")
    assert "x.png" not in {p.name for p in list_images(messy, recursive=True)}  # the cache folder is skipped


def test_every_readable_image_becomes_8bit_rgb_the_right_way_up(messy):
    for name in READABLE:
        image = load_rgb(messy / name)
        assert image.mode == "RGB", name
    assert load_rgb(messy / "phone.JPG").size == (72, 96)  # EXIF rotation applied
    alpha = np.asarray(load_rgb(messy / "alpha.png"))
    assert (alpha[:, :48] == 255).all()  # transparent half composited on white
    assert not (alpha[:, 48:] == 255).all()
    deep = np.asarray(load_rgb(messy / "deep16.png"))[..., 0].astype(int)
    assert np.abs(deep - gradient((96, 80), 6)[..., 0]).max() <= 1  # 16 bit scaled to 8, not clipped
    cmyk = np.asarray(load_rgb(messy / "cmyk.jpg")).astype(int)
    assert np.abs(cmyk - gradient((96, 80), 5)).mean() < 12  # CMYK back to the RGB it came from
    for name in ("corrupt.png", "truncated.jpg"):
        with pytest.raises(UserError, match=name):
            load_rgb(messy / name)


def test_captions_defaults_triggers_and_encodings(messy):
    warnings: list[str] = []
    items = {it.path.name: it.caption for it in discover([_Dataset(str(messy))], "zfox", warnings.append)}
    assert items["phone.JPG"] == "zfox on a phone, taken outside"  # BOM gone, whitespace collapsed
    assert items["alpha.png"] == "zfox café crème"  # Latin-1 read...
    assert any("alpha.txt" in w and "UTF-8" in w for w in warnings)  # ...and reported by name
    assert items["gray.png"] == "a default"  # empty caption
    assert items["upper.PNG"] == "a default"  # missing caption
    assert items["palette.png"] == "a palette image without the trigger"
    with pytest.raises(UserError, match=r"alpha\.txt uses \[trigger\] but job\.trigger_word"):
        discover([_Dataset(str(messy))], None)


def test_corrupt_and_too_small_images_are_skipped_by_name(messy):
    warnings: list[str] = []
    items = discover([_Dataset(str(messy))], "zfox")
    samples = build_samples(items, [[64, 96]], warnings.append)
    trained = {items[s.item].path.name for s in samples}
    assert "corrupt.png" not in trained and "truncated.jpg" not in trained and "tiny.png" not in trained
    assert len(trained) == 11
    text = "\n".join(warnings)
    assert "corrupt.png" in text and "truncated.jpg" in text and "tiny.png (40x40)" in text
    # 96 px needs more than 5% upscaling of the 96x80 images: dropped for them, with a warning naming each
    assert {s.resolution for s in samples if items[s.item].path.name == "upper.PNG"} == {64}
    assert "upper.PNG (96x80) is too small for resolution 96" in text
    # nothing trainable left is an error
    with pytest.raises(UserError, match="no image can train"):
        build_samples(items, [[512]])


def test_missing_or_empty_folder_is_an_error(tmp_path):
    with pytest.raises(UserError, match="folder not found"):
        discover([_Dataset(str(tmp_path / "nope"))], None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"datasets\[0\].path: no images"):
        discover([_Dataset(str(tmp_path / "empty"))], None)


def test_repeats_and_several_datasets(tmp_path, messy):
    other = tmp_path / "other"
    other.mkdir()
    Image.fromarray(gradient((128, 128), 20)).save(other / "big.png")
    items = discover([_Dataset(str(messy)), _Dataset(str(other), repeats=3, default_caption="other [trigger]")], "zf")
    assert [it.caption for it in items if it.dataset == 1] == ["other zf"] * 3
    samples = build_samples(items, [[64], [64, 128]])
    assert sorted(s.resolution for s in samples if items[s.item].dataset == 1) == [64, 64, 64, 128, 128, 128]


# --- training on it ---------------------------------------------------------------------------------------------
def write_job(root: Path, model_dir: Path, dataset: Path, **train) -> Path:
    job = {
        "version": 1,
        "job": {"name": "messy", "trigger_word": "zfox", "output_dir": "./output", "device": "cpu", "seed": 3},
        "model": {"arch": "zimage_deturbo", "name_or_path": str(model_dir)},
        "target": {"rank": 4},
        "save": {"dtype": "fp32", "every": 100, "keep": 1},
        "train": {
            "batch_size": 2,
            "steps": 4,
            "optimizer": "adamw",
            "lr": 1e-3,
            "gradient_checkpointing": False,
            "cache_text_embeddings": True,
            **train,
        },
        "datasets": [{"path": str(dataset), "resolutions": [64, 96], "caption_dropout": 0.0}],
    }
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def count_vae_encodes(monkeypatch) -> list[int]:
    """Count VAE encodes (images) by wrapping the real function, which still runs."""
    calls: list[int] = []
    real = cache_module.encode_latents

    def counting(vae, pixels):
        calls.append(pixels.shape[0])
        return real(vae, pixels)

    monkeypatch.setattr(cache_module, "encode_latents", counting)
    return calls


def test_messy_folder_trains_with_batch_2_and_two_resolutions(tmp_path, messy, tiny_model_dir, monkeypatch):
    calls = count_vae_encodes(monkeypatch)
    result = train(load_job(write_job(tmp_path, tiny_model_dir, messy)), progress=False)
    log = (result.run_dir / "train.log").read_text()
    assert "corrupt.png" in log and "truncated.jpg" in log and "alpha.txt" in log and "tiny.png" in log
    assert len((result.run_dir / "metrics.jsonl").read_text().splitlines()) == 4
    # 11 readable images at 64, and at 96 those large enough: 96x80 ones are dropped, the 72x96 phone photo too
    assert sum(calls) == 11 and max(calls) <= 4  # encoded in batches
    assert "latents: 11 encoded, 0 reused" in log


def test_latent_cache_is_reused_and_follows_changed_files(tmp_path, tiny_model_dir, monkeypatch):
    from conftest import demo_dataset

    dataset = demo_dataset(tmp_path / "dataset", 4)
    calls = count_vae_encodes(monkeypatch)
    job = write_job(tmp_path, tiny_model_dir, dataset)
    first = train(load_job(job), progress=False)
    assert sum(calls) == 8  # 4 images x 2 resolutions
    calls.clear()
    second = train(load_job(job), progress=False, overwrite=True)
    assert sum(calls) == 0  # everything from the cache
    assert second.final_lora.read_bytes() == first.final_lora.read_bytes()
    # another job on the same data (other output folder), with the same VAE copied elsewhere, reuses the cache too
    calls.clear()
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other / "model_copy")
    train(load_job(write_job(other, other / "model_copy", dataset)), progress=False)
    assert sum(calls) == 0
    # touching one image re-encodes exactly that image (at both resolutions)
    changed = sorted(dataset.glob("*.png"))[0]
    image = Image.open(changed).convert("RGB")
    image.putpixel((0, 0), (1, 2, 3))
    image.save(changed)
    calls.clear()
    train(load_job(job), progress=False, overwrite=True)
    assert sum(calls) == 2
    # a damaged entry (an interrupted write from an older tool, a full disk) is re-encoded, never trusted
    entries = (dataset / ".zimage_cache").glob("*.safetensors")
    entry = max(entries, key=lambda p: p.stat().st_mtime_ns)  # one just written for the changed image: in use
    entry.write_bytes(entry.read_bytes()[:40])
    calls.clear()
    train(load_job(job), progress=False, overwrite=True)
    assert sum(calls) == 1


def test_cache_entries_are_written_atomically(tmp_path, monkeypatch):
    import torch

    target = tmp_path / "cache" / "entry.safetensors"
    cache_module.write_entry(target, torch.ones(2, 2), Path("a.png"))
    before = target.read_bytes()

    def die(*args):
        raise OSError("killed mid-rename")

    monkeypatch.setattr(os, "replace", die)
    with pytest.raises(OSError):
        cache_module.write_entry(target, torch.zeros(2, 2), Path("a.png"))
    assert target.read_bytes() == before  # the old entry is intact; the half-done one is only a .tmp
    assert cache_module.read_entry(target) is not None


def test_text_encoder_leaves_after_caching(tmp_path, tiny_model_dir):
    """Through the public lifecycle: the recipe gets the loaded components, we keep only a weak reference to the
    text encoder; with the cache it is gone from memory (so from the device) before the first step, without it it
    stays to encode each batch."""
    from conftest import demo_dataset

    from zimage_lora.models.loading import load_components

    dataset = demo_dataset(tmp_path / "dataset", 2)
    for cache, alive_after_setup in ((True, False), (False, True)):
        cfg = load_job(write_job(tmp_path, tiny_model_dir, dataset, steps=2, cache_text_embeddings=cache))
        components = load_components(cfg.model.name_or_path)
        encoder = weakref.ref(components.text_encoder)
        run = recipe.LoraRecipe(cfg, overwrite=True, progress=False)
        run.setup(components=components)
        del components
        try:
            for step in (1, 2):
                gc.collect()
                assert (encoder() is not None) == alive_after_setup, (cache, step)
                metrics = run.train_step(run.data.next(run.state, step))
                assert metrics.step == step and metrics.loss > 0
        finally:
            run.close()


def test_caption_dropout_uses_the_empty_prompt_with_cached_embeddings(tmp_path, tiny_model_dir):
    from conftest import demo_dataset

    dropped_dir = tmp_path / "dropped"
    dropped_dir.mkdir()
    dropped = write_job(dropped_dir, tiny_model_dir, demo_dataset(dropped_dir / "dataset", 3))
    data = yaml.safe_load(dropped.read_text())
    data["datasets"][0]["caption_dropout"] = 1.0  # every caption dropped
    dropped.write_text(yaml.safe_dump(data))
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    dataset = demo_dataset(empty_dir / "dataset", 3)
    for caption in dataset.glob("*.txt"):
        caption.write_text("")
    empty = write_job(empty_dir, tiny_model_dir, dataset)
    data = yaml.safe_load(empty.read_text())
    data["datasets"][0]["default_caption"] = ""
    empty.write_text(yaml.safe_dump(data))
    a = train(load_job(dropped), progress=False)
    b = train(load_job(empty), progress=False)
    assert a.final_lora.read_bytes() == b.final_lora.read_bytes()


def test_batches_hold_one_bucket(messy):
    items = discover([_Dataset(str(messy))], "zfox")
    samples = build_samples(items, [[64, 96]])
    for epoch in range(3):
        batches = epoch_batches(samples, 2, seed=5, epoch=epoch)
        assert all(len({samples[i].bucket for i in b}) == 1 for b in batches)
        assert sorted(i for b in batches for i in b) == list(range(len(samples)))
    assert epoch_batches(samples, 2, 5, 0) == epoch_batches(samples, 2, 5, 0)
    assert epoch_batches(samples, 2, 5, 0) != epoch_batches(samples, 2, 5, 1)


# --- dataset check ----------------------------------------------------------------------------------------------
def test_dataset_check_names_every_problem(messy):
    Image.open(messy / "photo.jpeg").resize((192, 160)).save(messy / "photo_big_copy.png")  # a near-duplicate
    proc = run_cli("dataset", "check", str(messy), "--resolutions", "64,96", "--trigger", "zfox")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "15 image files, 13 readable" in out
    assert "unreadable: corrupt.png" in out and "unreadable: truncated.jpg" in out
    assert "missing caption: upper.PNG" in out and "missing caption: photo_big_copy.png" in out
    assert "empty caption: gray.txt" in out
    assert "caption not UTF-8: alpha.txt" in out
    assert "caption without the trigger ('zfox' or [trigger]): palette.txt" in out
    assert "near-duplicates: photo.jpeg and photo_big_copy.png" in out
    assert "smallest: tiny.png (40x40)" in out
    assert "too small for 64: tiny.png 40x40" in out and "too small for 96: upper.PNG 96x80" in out
    assert "resolution 64: 12 images in buckets" in out
    assert "formats:" in out and "JPEG CMYK x1" in out and "PNG I;16" in out
    assert "advice: 12 images is in the usual range" in out
    # no near-duplicate claims among the distinct generated pictures
    assert out.count("near-duplicates:") == 1


def test_dataset_check_fails_only_when_nothing_can_train(tmp_path):
    folder = tmp_path / "small"
    folder.mkdir()
    Image.fromarray(gradient((40, 40), 1)).save(folder / "a.png")
    (folder / "b.png").write_bytes(b"garbage")
    proc = run_cli("dataset", "check", str(folder))
    assert proc.returncode == 2
    assert "cannot train" in proc.stdout and "unreadable: b.png" in proc.stdout


def test_dataset_check_gives_the_guides_advice_for_a_small_set(tmp_path):
    """Under 10 images: the guide's 1500-2200 steps and a learning rate of 1e-4 or less (warned, never refused)."""
    folder = tmp_path / "few"
    folder.mkdir()
    for seed in range(3):
        Image.fromarray(gradient((96, 96), seed)).save(folder / f"{seed}.png")
    proc = run_cli("dataset", "check", str(folder), "--resolutions", "64")
    assert proc.returncode == 0, proc.stderr
    assert "advice: 3 images is few" in proc.stdout
    assert "the guide suggests train.steps 1500-2200 (not 3000) and train.lr at 1e-4 or below" in proc.stdout
    bad = run_cli("dataset", "check", str(folder), "--resolutions", "64,100")
    assert bad.returncode == 2 and "--resolutions: each must be a multiple of 16 from 64 to 4096" in bad.stderr


@pytest.mark.parametrize("res", [512, 768, 1024])
def test_the_chosen_bucket_is_the_nearest_in_aspect_ratio(res):
    import math

    from zimage_lora.data.dataset import bucket_sizes, nearest_bucket

    rng = np.random.default_rng(res)
    buckets = bucket_sizes(res)
    for w, h in rng.integers(100, 6000, size=(300, 2)):
        chosen = nearest_bucket(int(w), int(h), res)
        gap = abs(math.log(chosen[0] / chosen[1]) - math.log(w / h))
        assert all(gap <= abs(math.log(bw / bh) - math.log(w / h)) + 1e-12 for bw, bh in buckets)
        assert abs(chosen[0] * chosen[1] - res * res) <= 0.1 * res * res
