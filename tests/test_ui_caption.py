"""Issue 20 in the web UI's API: captioning a dataset. A captioning run (``zimage-lora caption --dry-run``, run by the
UI's queue on a tiny random Qwen3-VL captioner in DATA/models) holds its device like a job, proposes a caption per
image, and writes nothing into the dataset; accepting proposals (as proposed or edited) writes the images' .txt
files, keeping a caption an image has unless told to replace it. A random model's words are noise: what is tested is
what the UI controls (the queue, the files, the refusals)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import demo_dataset, wait_status_of
from test_ui_api import end_processes, open_client

from zimage_lora.ui import runs
from zimage_lora.ui.runner import start_time

EXISTING = "[trigger], a cartoon fox head on a blue sky"  # fox_01's caption


@pytest.fixture(scope="module")
def tiny_captioner(tmp_path_factory) -> Path:
    from zimage_lora.models.tiny_captioner import build_tiny_qwen3_vl

    return build_tiny_qwen3_vl(tmp_path_factory.mktemp("captioner") / "captioner")


@pytest.fixture
def data_dir(tmp_path, tiny_captioner, monkeypatch) -> Path:
    """A data folder with the tiny captioner in models/captioner and dataset ``pets``: three demo images, only the
    first with a caption. Offline, one thread (the processes the UI starts inherit it)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("ZIMAGE_LORA_UI_DEVICES", raising=False)
    data = tmp_path / "data"
    shutil.copytree(tiny_captioner, data / "models" / "captioner")
    pets = demo_dataset(data / "datasets" / "pets", 3)
    (pets / "fox_02.txt").unlink()
    (pets / "fox_03.txt").unlink()
    (pets / "fox_01.txt").write_text(EXISTING)
    return data


@pytest.fixture
def client(data_dir):
    with open_client(data_dir) as c:
        try:
            yield c
        finally:
            end_processes(c)


def run_status(client, cap_id: str) -> str:
    return client.get(f"/api/captions/{cap_id}").json()["status"]


def wait_run(client, cap_id: str, *statuses: str, timeout: float = 120) -> dict:
    path = f"/api/captions/{cap_id}"
    return wait_status_of(lambda: client.get(path).json(), f"captioning run {cap_id}", statuses, timeout)


def test_caption_a_dataset_behind_a_job_then_accept_edit_and_ignore(client, data_dir):
    """A run queued while a job holds the CPU waits (a run queued after it too, and leaves the queue when stopped);
    once the job ends it runs, proposes one entry per image (the captioned one shows its caption and, without
    overwrite, gets no proposal), and writes nothing; accepting writes the .txt files: an image's caption is kept
    unless the item says overwrite; an image not accepted gets none."""
    store, runner = client.app.state.ui.store, client.app.state.ui.runner
    pets = data_dir / "datasets" / "pets"
    before = sorted(p.name for p in pets.iterdir())
    sleeper = subprocess.Popen(["sleep", "60"])  # a job's live process, holding the CPU
    try:
        pid = {"pid": sleeper.pid, "pid_start": start_time(sleeper.pid)}
        store.insert("jobs", name="busy", config={"datasets": []}, status="running", device="cpu", created="t", **pid)
        body = {"model": "models/captioner", "mode": "character", "trigger": "zfox", "max_words": 8, "device": "cpu"}
        queued = client.post("/api/datasets/pets/caption", json=body)
        assert queued.status_code == 201, queued.json()
        cap_id = queued.json()["id"]
        assert queued.json()["status"] == "queued"
        later = client.post("/api/datasets/pets/caption", json={**body, "overwrite": True}).json()["id"]
        runner.tick()
        runner.tick()
        run = client.get(f"/api/captions/{cap_id}").json()
        assert run["status"] == "queued" and run["device"] == "cpu"
        assert run["progress"] == {"done": 0, "total": 2, "per_s": None}  # fox_01 has a caption: it is kept
        assert run["proposals"] is None
        assert run["options"] == {**body, "trigger_style": None, "overwrite": False}
        assert client.post(f"/api/captions/{later}/stop").json() == {"id": later, "status": "stopped"}
        refused = client.delete("/api/datasets/pets?confirm=pets")
        assert refused.status_code == 409 and f"captioning run {cap_id!r} (queued)" in refused.json()["error"]
        listed = client.get("/api/datasets/pets/captions").json()["captions"]
        assert [(r["id"], r["status"]) for r in listed] == [(cap_id, "queued"), (later, "stopped")]
    finally:
        sleeper.kill()
        sleeper.wait()

    run = wait_run(client, cap_id, "done", "failed", "stopped")
    assert run["status"] == "done", run["error"]
    assert run["started"] >= store.get("jobs", "busy")["finished"]
    assert sorted(p.name for p in pets.iterdir()) == before  # a dry run: nothing written into the dataset
    proposals = {p["file"]: p for p in run["proposals"]}
    assert sorted(proposals) == ["fox_01.png", "fox_02.png", "fox_03.png"]
    assert run["progress"]["done"] == run["progress"]["total"] == 2
    bar = runs.bar_progress(data_dir / "captions" / cap_id / "ui-process.log", "img")  # what it shows while running
    assert (bar["done"], bar["total"]) == (2, 2) and bar["per_s"] > 0
    assert proposals["fox_01.png"] | {"url": None, "thumb": None} == {
        "file": "fox_01.png",
        "caption": None,  # without overwrite it was not captioned
        "existing": EXISTING,
        "problem": None,
        "url": None,
        "thumb": None,
    }
    for file in ("fox_02.png", "fox_03.png"):
        assert proposals[file]["existing"] is None and isinstance(proposals[file]["caption"], str)
        assert proposals[file]["thumb"] == f"/api/datasets/pets/thumb/{file}"
        assert client.get(proposals[file]["thumb"]).status_code == 200

    proposed = proposals["fox_02.png"]["caption"] or "zfox, a fox"  # a random model may say nothing
    items = [
        {"file": "fox_02.png", "caption": proposed},
        {"file": "fox_01.png", "caption": "  zfox, an edited fox  "},
    ]
    accepted = client.post(f"/api/captions/{cap_id}/accept", json={"items": items}).json()
    assert accepted == {
        "written": [{"file": "fox_02.png", "caption": proposed.strip()}],
        "kept": [{"file": "fox_01.png", "caption": EXISTING}],
    }
    assert (pets / "fox_02.txt").read_text() == proposed.strip()
    (pets / "fox_01.txt").write_text(EXISTING)
    items = [{"file": "fox_01.png", "caption": "zfox, an edited fox", "overwrite": True}]
    accepted = client.post(f"/api/captions/{cap_id}/accept", json={"items": items}).json()
    assert accepted == {"written": [{"file": "fox_01.png", "caption": "zfox, an edited fox"}], "kept": []}
    assert (pets / "fox_01.txt").read_text() == "zfox, an edited fox"
    assert not (pets / "fox_03.txt").exists()  # ignored: no file
    shown = {i["file"]: i["caption"] for i in client.get("/api/datasets/pets").json()["images"]}
    assert shown == {"fox_01.png": "zfox, an edited fox", "fox_02.png": proposed.strip(), "fox_03.png": ""}
    again = client.get(f"/api/captions/{cap_id}").json()["proposals"]
    assert [p["existing"] for p in again] == ["zfox, an edited fox", proposed.strip(), None]  # the captions now

    # a file that is not an image of the dataset, or an empty caption: nothing is written
    for file, status in (("fox_09.png", 422), ("../../models/captioner/config.json", 422), ("fox_01.txt", 422)):
        items = [{"file": "fox_03.png", "caption": "zfox"}, {"file": file, "caption": "zfox"}]
        refused = client.post(f"/api/captions/{cap_id}/accept", json={"items": items})
        assert refused.status_code == status and refused.json()["field"] == "items.1.file", refused.json()
    refused = client.post(f"/api/captions/{cap_id}/accept", json={"items": [{"file": "fox_03.png", "caption": " "}]})
    assert refused.status_code == 422 and refused.json()["field"] == "items.0.caption"
    assert not (pets / "fox_03.txt").exists()
    refused = client.post(f"/api/captions/{later}/accept", json={"items": [{"file": "fox_03.png", "caption": "x"}]})
    assert refused.status_code == 409  # it never ran


def test_a_running_captioning_run_stops_at_once(client, data_dir):
    cap_id = client.post("/api/datasets/pets/caption", json={"model": "models/captioner", "device": "cpu"}).json()["id"]
    wait_run(client, cap_id, "running", "done", "failed")
    stopping = client.post(f"/api/captions/{cap_id}/stop").json()
    assert stopping["status"] in ("stopping", "stopped")
    run = wait_run(client, cap_id, "stopped", "failed", "done", timeout=30)
    assert run["status"] == "stopped" and run["proposals"] is None
    assert client.post(f"/api/captions/{cap_id}/stop").status_code == 409  # nothing to stop
    assert sorted(p.name for p in (data_dir / "datasets" / "pets").glob("*.txt")) == ["fox_01.txt"]


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"mode": "poem"}, "mode", "mode: 'poem' is not one of"),
        ({"trigger_style": "loud"}, "trigger_style", "trigger_style: 'loud' is not one of"),
        ({"device": "cuda:9"}, "device", "device: cuda:9 is not on this machine (it has cpu"),
        ({"model": "models/nothing"}, "model", "model: no folder 'models/nothing' in the data folder"),
        ({"model": "/etc"}, "model", "is neither models/<name> (a folder of the data folder), a hub id such as"),
        ({"trigger": "two words"}, "trigger", "not one word"),
        ({"max_words": 0}, "max_words", "max_words: input should be greater than or equal to 1"),
        ({"moed": "tags"}, "moed", "moed: extra inputs are not permitted"),
    ],
)
def test_a_captioning_request_with_a_mistake_is_refused_in_one_sentence(client, body, field, words):
    refused = client.post("/api/datasets/pets/caption", json=body)
    assert refused.status_code == 422 and refused.json()["field"] == field, refused.json()
    assert words in refused.json()["error"] and "\n" not in refused.json()["error"]
    assert client.app.state.ui.store.select("captions") == []


def test_captioning_what_is_not_there(client, data_dir):
    facts = client.get("/api/captioning").json()
    assert facts["default_model"] and facts["modes"] and facts["trigger_styles"]
    assert client.post("/api/datasets/nothing/caption", json={}).status_code == 404
    assert client.get("/api/datasets/nothing/captions").status_code == 404
    (data_dir / "datasets" / "empty").mkdir()
    empty = client.post("/api/datasets/empty/caption", json={})
    assert empty.status_code == 422 and "has no images" in empty.json()["error"]
    for path in ("/api/captions/nope", "/api/captions/..%2Fx"):
        assert client.get(path).status_code == 404
    assert client.post("/api/captions/nope/accept", json={"items": []}).status_code == 404
    assert client.post("/api/captions/nope/stop").status_code == 404


def test_a_captioning_run_that_fails_shows_the_captioners_sentence(client):
    """A hub model that is not in the (offline) cache: the run fails, its error the captioner's own last lines."""
    body = {"model": "nobody/no-such-captioner", "device": "cpu"}
    cap_id = client.post("/api/datasets/pets/caption", json=body).json()["id"]
    run = wait_run(client, cap_id, "failed", "done", "stopped")
    assert run["status"] == "failed" and run["exit_code"] not in (0, None) and run["proposals"] is None
    headline, rest = run["error"].split("\n", 1)
    assert "nobody/no-such-captioner" in headline  # the captioner's own sentence comes first, on its own line
    assert rest.startswith("the captioner ended before finishing (exit code") and "nobody/no-such-captioner" in rest
    refused = client.post(f"/api/captions/{cap_id}/accept", json={"items": [{"file": "fox_02.png", "caption": "x"}]})
    assert refused.status_code == 409
