"""Datasets: aspect buckets, crops, captions, discovery, image decoding and the order of batches."""

import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zimage_lora.config import DatasetSection
from zimage_lora.data.dataset import (
    ImageItem,
    Sample,
    bucket_sizes,
    build_samples,
    crop_to_bucket,
    discover,
    epoch_batches,
    load_rgb,
    nearest_bucket,
    read_caption,
)
from zimage_lora.errors import UserError

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)
RESOLUTIONS = (512, 768, 1024)


def save_image(path: Path, size=(24, 16), color=RED, **save_args) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, **save_args)
    return path


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


# --- buckets -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("res", RESOLUTIONS)
def test_buckets_are_multiples_of_16_of_about_res_squared(res):
    buckets = bucket_sizes(res)
    assert len(buckets) == len(set(buckets)) > 20
    assert (res, res) in buckets
    for w, h in buckets:
        assert w % 16 == 0 and h % 16 == 0
        assert 1 / 4 <= w / h <= 4
        # one side is area / other side, rounded to the nearest multiple of 16: off by at most 8 lines
        assert abs(w * h - res * res) <= 8 * max(w, h)
    # which bounds the area within 16 / res of res^2 (3.1% at 512, 1.6% at 1024)
    worst = max(abs(w * h / res**2 - 1) for w, h in buckets)
    assert worst <= 16 / res
    # and the set spans the whole aspect range
    aspects = [w / h for w, h in buckets]
    assert min(aspects) < 0.27 and max(aspects) > 3.7


@pytest.mark.parametrize("res", RESOLUTIONS)
def test_square_images_go_to_the_square_bucket(res):
    assert nearest_bucket(300, 300, res) == (res, res)
    assert nearest_bucket(4000, 4000, res) == (res, res)


@pytest.mark.parametrize("res", RESOLUTIONS)
def test_three_by_two_goes_to_the_closest_landscape_bucket(res):
    w, h = nearest_bucket(1500, 1000, res)
    assert w > h
    best = min(abs(math.log(bw / bh / 1.5)) for bw, bh in bucket_sizes(res))
    assert abs(math.log(w / h / 1.5)) == pytest.approx(best)
    assert w / h == pytest.approx(1.5, rel=0.03)


@pytest.mark.parametrize("res", RESOLUTIONS)
def test_bucket_set_is_closed_under_transposition(res):
    # every landscape bucket has its portrait twin, so a photo and its 90-degree rotation can crop alike
    buckets = set(bucket_sizes(res))
    assert sorted((w, h) for h, w in buckets if (w, h) not in buckets) == []


@pytest.mark.parametrize("res", RESOLUTIONS)
def test_portrait_images_get_the_transposed_bucket_of_the_same_landscape_image(res):
    for w, h in [(1500, 1000), (1200, 900), (1600, 900), (2000, 1000), (1250, 1000), (2100, 900), (1400, 1000)]:
        landscape = nearest_bucket(w, h, res)
        assert nearest_bucket(h, w, res) == (landscape[1], landscape[0]), (w, h)


def test_crop_gives_exactly_the_bucket_size():
    image = Image.new("RGB", (1000, 667), RED)
    for bucket in [(512, 512), (624, 416), (416, 624), (1024, 256), (256, 1024)]:
        assert crop_to_bucket(image, bucket).size == bucket
    # an image smaller than the bucket is scaled up to cover it
    assert crop_to_bucket(Image.new("RGB", (30, 20), RED), (624, 416)).size == (624, 416)


def red_blue_red(size: tuple[int, int], horizontal: bool) -> Image.Image:
    """Red outer thirds, blue centre third (left-centre-right, or top-centre-bottom)."""
    w, h = size
    image = Image.new("RGB", size, RED)
    box = (w // 3, 0, 2 * w // 3, h) if horizontal else (0, h // 3, w, 2 * h // 3)
    image.paste(BLUE, box)
    return image


def test_crop_keeps_the_centre_of_a_wide_image():
    out = pixels(crop_to_bucket(red_blue_red((1536, 512), horizontal=True), (512, 512)))
    # away from the resampled edges, the whole crop is the blue centre third
    inner = out[:, 8:-8]
    assert (inner[..., 2] > 240).all() and (inner[..., 0] < 15).all()
    # and the crop is symmetric: the left and right edge columns are alike
    assert np.abs(out[:, 0] - out[:, -1]).max() <= 2


def test_crop_keeps_the_centre_of_a_tall_image():
    out = pixels(crop_to_bucket(red_blue_red((400, 1200), horizontal=False), (256, 256)))
    inner = out[8:-8]
    assert (inner[..., 2] > 240).all() and (inner[..., 0] < 15).all()


# --- captions ----------------------------------------------------------------------------------------------------


def test_sidecar_caption_is_used_with_whitespace_collapsed(tmp_path):
    image = save_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("  a photo\n of\ta   dog \n", encoding="utf-8")
    assert read_caption(image, "txt", "default", None) == "a photo of a dog"


def test_caption_extension_is_configurable(tmp_path):
    image = save_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("wrong file", encoding="utf-8")
    (tmp_path / "a.caption").write_text("right file", encoding="utf-8")
    assert read_caption(image, "caption", "", None) == "right file"
    assert read_caption(image, ".caption", "", None) == "right file"


@pytest.mark.parametrize("content", [None, "", "  \n\t "])
def test_missing_or_empty_caption_falls_back_to_the_default(tmp_path, content):
    image = save_image(tmp_path / "a.png")
    if content is not None:
        (tmp_path / "a.txt").write_text(content, encoding="utf-8")
    assert read_caption(image, "txt", "a photo", None) == "a photo"


def test_trigger_placeholder_is_replaced(tmp_path):
    image = save_image(tmp_path / "a.png")
    assert read_caption(image, "txt", "[trigger] on a beach", "ohwx") == "ohwx on a beach"
    (tmp_path / "a.txt").write_text("[trigger] and [trigger] again", encoding="utf-8")
    assert read_caption(image, "txt", "", "ohwx") == "ohwx and ohwx again"


def test_trigger_placeholder_without_trigger_word_is_a_user_error(tmp_path):
    image = save_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("[trigger] smiling", encoding="utf-8")
    with pytest.raises(UserError, match=r"a\.txt.*trigger_word"):
        read_caption(image, "txt", "", None)
    with pytest.raises(UserError, match="trigger_word"):
        read_caption(save_image(tmp_path / "b.png"), "txt", "[trigger]", "")


def test_latin1_caption_is_read(tmp_path):
    image = save_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("café crème, naïve".encode("latin-1"))
    assert read_caption(image, "txt", "", None) == "café crème, naïve"


def test_utf8_caption_with_bom_is_read_without_it(tmp_path):
    image = save_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("\ufeff猫 on a mat".encode())
    assert read_caption(image, "txt", "", None) == "猫 on a mat"


# --- discovery ---------------------------------------------------------------------------------------------------


def dataset(path: Path, **fields) -> DatasetSection:
    return DatasetSection(path=str(path), **fields)


def test_discover_finds_images_with_any_case_extension_and_ignores_the_rest(tmp_path):
    folder = tmp_path / "data"
    for name in ["a.PNG", "b.JPG", "c.jpeg", "d.webp", "e.bmp", "f.png"]:
        save_image(folder / name)
    (folder / "notes.md").write_text("not an image", encoding="utf-8")
    (folder / "f.txt").write_text("caption of f", encoding="utf-8")
    (folder / "sub").mkdir()
    save_image(folder / "sub" / "nested.png")
    save_image(folder / ".zimage_cache" / "x.png")
    items = discover([dataset(folder, default_caption="dflt")], None)
    assert [i.path.name for i in items] == ["a.PNG", "b.JPG", "c.jpeg", "d.webp", "e.bmp", "f.png"]
    assert [i.caption for i in items] == ["dflt"] * 5 + ["caption of f"]
    assert {i.dataset for i in items} == {0}


def test_discover_repeats_multiply_items(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    save_image(one / "a.png"), save_image(one / "b.png"), save_image(two / "c.png")
    items = discover([dataset(one, repeats=3), dataset(two, repeats=2, default_caption="[trigger] dog")], "sks")
    assert Counter(i.path.name for i in items) == {"a.png": 3, "b.png": 3, "c.png": 2}
    assert [i.dataset for i in items] == [0] * 6 + [1] * 2
    assert {i.caption for i in items if i.dataset == 1} == {"sks dog"}


def test_discover_empty_folder_names_the_dataset(tmp_path):
    full, empty = tmp_path / "full", tmp_path / "empty"
    save_image(full / "a.png")
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here", encoding="utf-8")
    with pytest.raises(UserError, match=r"datasets\[1\]"):
        discover([dataset(full), dataset(empty)], None)


# --- decoding ----------------------------------------------------------------------------------------------------


def test_exif_rotated_jpeg_comes_out_upright(tmp_path):
    stored = Image.new("RGB", (64, 32), RED)
    stored.paste(BLUE, (32, 0, 64, 32))  # left half red, right half blue as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: display rotated 90 degrees clockwise
    stored.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    out = load_rgb(tmp_path / "r.jpg")
    assert out.mode == "RGB" and out.size == (32, 64)
    px = pixels(out)
    # turned clockwise, the stored left (red) is on top and the right (blue) at the bottom
    assert px[8, 16, 0] > 200 and px[8, 16, 2] < 60
    assert px[56, 16, 2] > 200 and px[56, 16, 0] < 60


def test_transparency_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (3, 1))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # transparent black
    rgba.putpixel((1, 0), (255, 0, 0, 255))  # opaque red
    rgba.putpixel((2, 0), (0, 0, 255, 128))  # half-transparent blue
    rgba.save(tmp_path / "t.png")
    px = pixels(load_rgb(tmp_path / "t.png"))[0]
    assert px[0].tolist() == [255, 255, 255]
    assert px[1].tolist() == [255, 0, 0]
    assert np.abs(px[2] - [127, 127, 255]).max() <= 2


def test_palette_transparency_is_composited_on_white(tmp_path):
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    p.save(tmp_path / "p.png", transparency=0)
    assert pixels(load_rgb(tmp_path / "p.png"))[0].tolist() == [[255, 255, 255], [0, 255, 0]]


def test_grayscale_and_palette_become_rgb(tmp_path):
    Image.new("L", (4, 4), 77).save(tmp_path / "g.png")
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * (256 * 3 - 6))
    p.save(tmp_path / "p.bmp")
    g = load_rgb(tmp_path / "g.png")
    assert g.mode == "RGB" and (pixels(g) == 77).all()
    q = load_rgb(tmp_path / "p.bmp")
    assert q.mode == "RGB" and (pixels(q) == [10, 20, 30]).all()


def test_sixteen_bit_grayscale_is_scaled_to_eight_bits(tmp_path):
    values = np.array([[0, 256 * 100, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "d.png")
    with Image.open(tmp_path / "d.png") as raw:
        assert raw.mode == "I;16"
    out = load_rgb(tmp_path / "d.png")
    assert out.mode == "RGB"
    assert pixels(out)[0].tolist() == [[0] * 3, [100] * 3, [128] * 3, [255] * 3]


def test_corrupt_image_is_a_user_error_naming_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    with pytest.raises(UserError, match="broken.png"):
        load_rgb(bad)


def test_truncated_image_is_a_user_error_naming_the_file(tmp_path):
    good = save_image(tmp_path / "whole.png", size=(64, 64))
    data = good.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cut.png"):
        load_rgb(cut)


# --- samples and batches -----------------------------------------------------------------------------------------


def test_build_samples_makes_one_sample_per_item_and_resolution(tmp_path):
    wide = save_image(tmp_path / "wide.png", size=(300, 200))
    square = save_image(tmp_path / "square.png", size=(200, 200))
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = save_image(tmp_path / "rotated.jpg", size=(300, 200), exif=exif.tobytes())  # displays as 200 x 300
    items = [ImageItem(wide, "", 0), ImageItem(square, "", 0), ImageItem(rotated, "", 1), ImageItem(wide, "", 1)]
    samples = build_samples(items, [[128, 192], [224]])
    assert samples == [
        Sample(0, 128, nearest_bucket(300, 200, 128)),
        Sample(0, 192, nearest_bucket(300, 200, 192)),
        Sample(1, 128, (128, 128)),
        Sample(1, 192, (192, 192)),
        Sample(2, 224, nearest_bucket(200, 300, 224)),
        Sample(3, 224, nearest_bucket(300, 200, 224)),
    ]
    assert samples[4].bucket[1] > samples[4].bucket[0]  # the rotated image trains in portrait


def make_samples() -> list[Sample]:
    buckets = [(512, 512)] * 11 + [(624, 416)] * 7 + [(416, 624)] * 5 + [(768, 768)] * 1
    return [Sample(i, 512, b) for i, b in enumerate(buckets)]


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_epoch_covers_every_sample_once_in_single_bucket_batches(batch_size):
    samples = make_samples()
    batches = epoch_batches(samples, batch_size, seed=3, epoch=0)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(samples)))
    assert all(1 <= len(b) <= batch_size for b in batches)
    assert all(len({samples[i].bucket for i in b}) == 1 for b in batches)
    # only the last batch of each bucket may be short
    sizes = Counter(samples[i].bucket for i in range(len(samples)))
    assert len(batches) == sum(math.ceil(n / batch_size) for n in sizes.values())


def test_epoch_order_is_reproducible_and_changes_with_the_epoch():
    samples = make_samples()
    first = epoch_batches(samples, 2, seed=3, epoch=0)
    assert epoch_batches(samples, 2, seed=3, epoch=0) == first
    assert epoch_batches(samples, 2, seed=3, epoch=1) != first
    assert epoch_batches(samples, 2, seed=4, epoch=0) != first
    # the batch order mixes buckets, not one bucket after another
    order = [samples[b[0]].bucket for b in epoch_batches(samples, 1, seed=3, epoch=0)]
    runs = sum(1 for a, b in zip(order, order[1:], strict=False) if a != b)
    assert runs > 5


def test_epoch_order_does_not_depend_on_the_process(tmp_path):
    # str seeds of random.Random are hashed with sha512, not hash(): the order survives a restart (resume)
    import subprocess
    import sys

    code = (
        "from zimage_lora.data.dataset import Sample, epoch_batches\n"
        "s = [Sample(i, 512, (512, 512) if i % 3 else (624, 416)) for i in range(12)]\n"
        "print(epoch_batches(s, 2, 3, 5))\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="123")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    samples = [Sample(i, 512, (512, 512) if i % 3 else (624, 416)) for i in range(12)]
    assert out.strip() == str(epoch_batches(samples, 2, 3, 5))
