"""The dataset API's answers to what the dataset page shows: caption files without an image (orphans), deleting a
caption file, and `dataset check` grouped by kind, with no trigger check when no trigger word is given."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from conftest import demo_dataset
from PIL import Image

from zimage_lora.data.check import check_dataset, format_report
from zimage_lora.ui.server import create_app


def png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 90, 20)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def client(tmp_path):
    from fastapi.testclient import TestClient

    data = tmp_path / "data"
    demo_dataset(data / "datasets" / "fox", 3)
    (data / "datasets" / "other").mkdir()
    (data / "datasets" / "other" / "keep.txt").write_text("another dataset's caption")
    with TestClient(create_app(data, poll_s=0.1), base_url="http://127.0.0.1:8675") as c:
        c.folder = data / "datasets" / "fox"
        yield c


def test_a_caption_without_its_image_is_listed_named_and_pairs_when_the_image_comes(client):
    alone = client.post("/api/datasets/fox/upload", files=[("files", ("fox_09.txt", b"[trigger], a fox at night"))])
    assert alone.status_code == 200  # kept: the image may come in the next upload
    message = "fox_09.txt has no image fox_09.*; upload the image too or delete the caption"
    assert alone.json() == {
        "saved": ["fox_09.txt"],
        "rejected": [],
        "orphan_captions": [{"file": "fox_09.txt", "message": message}],
    }
    dataset = client.get("/api/datasets/fox").json()
    assert dataset["orphan_captions"] == [
        {"file": "fox_09.txt", "caption": "[trigger], a fox at night", "bytes": 25, "message": message}
    ]
    assert [i["file"] for i in dataset["images"]] == ["fox_01.png", "fox_02.png", "fox_03.png"]

    # the image arrives: the caption is its caption, no orphan any more
    paired = client.post("/api/datasets/fox/upload", files=[("files", ("fox_09.png", png((96, 96))))]).json()
    assert paired["orphan_captions"] == []
    dataset = client.get("/api/datasets/fox").json()
    assert dataset["orphan_captions"] == []
    assert {i["file"]: i["caption"] for i in dataset["images"]}["fox_09.png"] == "[trigger], a fox at night"

    # an image and its caption in one upload: no orphan; a caption of an upper-case image extension pairs too
    both = [("files", ("fox_10.txt", b"x")), ("files", ("fox_10.png", png((64, 64))))]
    assert client.post("/api/datasets/fox/upload", files=both).json()["orphan_captions"] == []
    (client.folder / "fox_11.JPG").write_bytes(png((64, 64)))
    assert (
        client.post("/api/datasets/fox/upload", files=[("files", ("fox_11.txt", b"y"))]).json()["orphan_captions"] == []
    )


def test_deleting_a_caption_file_and_nothing_else(client):
    folder = client.folder
    (folder / "lonely.txt").write_text("no picture")
    assert client.delete("/api/datasets/fox/captions/lonely.txt").json() == {"deleted": "lonely.txt"}
    assert not (folder / "lonely.txt").exists()
    assert client.get("/api/datasets/fox").json()["orphan_captions"] == []

    # an image's name: its caption goes, the image stays
    assert client.delete("/api/datasets/fox/captions/fox_01.png").json() == {"deleted": "fox_01.txt"}
    assert (folder / "fox_01.png").is_file() and not (folder / "fox_01.txt").exists()
    gone = client.delete("/api/datasets/fox/captions/fox_01.png")  # no caption left to delete
    assert gone.status_code == 404 and "fox_01.png" in gone.json()["error"]

    # nothing outside the dataset, nothing that is not a caption
    for path in ("../other/keep.txt", "..%2Fother%2Fkeep.txt", "%2E%2E/other/keep.txt", "missing.txt", "fox_02.PNG"):
        assert client.delete(f"/api/datasets/fox/captions/{path}").status_code == 404, path
    (folder / "notes.md").write_text("not a caption")
    assert client.delete("/api/datasets/fox/captions/notes.md").status_code == 404
    assert (folder.parent / "other" / "keep.txt").is_file() and (folder / "notes.md").is_file()
    assert (folder / "fox_02.txt").is_file()
    assert client.delete("/api/datasets/nobody/captions/fox_02.txt").status_code == 404


def test_check_groups_problems_by_kind_fatal_first_and_checks_the_trigger_only_when_given(client):
    for file in ("fox_01.txt", "fox_02.txt"):
        (client.folder / file).write_text("a cartoon fox head")  # no trigger in these two

    plain = client.get("/api/datasets/fox/check?resolutions=64,1024").json()
    assert not [p for p in plain["problems"] if p["kind"] == "without_trigger"]
    assert not [g for g in plain["groups"] if g["kind"] == "without_trigger"]
    small = next(g for g in plain["groups"] if g["kind"] == "too_small")
    assert small["title"] == "Too small for 1024 px" and not small["fatal"]
    assert [i["label"] for i in small["items"]] == ["fox_01.png", "fox_02.png", "fox_03.png"]
    assert small["count"] == 3 and small["items"][0]["detail"] == "128x128"
    assert plain["trainable"] == 3 and plain["images"] == 3
    assert client.get("/api/datasets/fox/check?resolutions=64&trigger=%20%20").json()["groups"] == []  # blank

    triggered = client.get("/api/datasets/fox/check?resolutions=64&trigger=zfox").json()
    (group,) = [g for g in triggered["groups"] if g["kind"] == "without_trigger"]
    assert group["title"] == "Captions without the trigger ('zfox' or [trigger])"
    assert [i["label"] for i in group["items"]] == ["fox_01.txt", "fox_02.txt"]

    # nothing fills 512, 768 or 1024: the one fatal group comes first; each too-small file once, not per resolution
    fatal = client.get("/api/datasets/fox/check?resolutions=512,768,1024").json()
    assert [g["key"] for g in fatal["groups"]] == ["cannot_train", "too_small-512-768-1024"]
    assert fatal["groups"][0]["fatal"] and "lower them to" in fatal["groups"][0]["hint"]
    assert fatal["groups"][1]["title"] == "Too small for 512, 768 and 1024 px" and fatal["groups"][1]["count"] == 3
    assert len([p for p in fatal["problems"] if p["kind"] == "too_small"]) == 9  # the problems stay one per line
    empty = client.get("/api/datasets/other/check").json()  # a caption, no image
    assert [(g["key"], g["hint"]) for g in empty["groups"]] == [
        ("cannot_train", "There is no readable image; add images.")
    ]


def test_the_cli_report_without_a_trigger_word_has_no_trigger_lines(tmp_path: Path):
    folder = demo_dataset(tmp_path / "fox", 2)
    (folder / "fox_01.txt").write_text("a cartoon fox head")
    assert "without the trigger" not in format_report(check_dataset(folder, [64]))
    with_word = format_report(check_dataset(folder, [64], "zfox"), "zfox")
    assert "caption without the trigger ('zfox' or [trigger]): fox_01.txt" in with_word
    assert "fox_02.txt" not in with_word  # its caption has [trigger]
