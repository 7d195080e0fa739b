"""The playground's API (docs/ui-api.md): the same request twice queues one generation, past generations are listed
newest first, an empty base model is the arch's default, and a model an offline machine lacks is refused at once in
the request's terms.

The server runs without its runner thread here (no lifespan): what is queued stays queued, so what the queue holds
is known exactly. The browser test (test_ui_browser_playground.py) runs real generations."""

from __future__ import annotations

import shutil

import huggingface_hub.constants
import pytest
from test_ui_api import data_dir, open_client  # noqa: F401 - data_dir: the fixture

from zimage_lora.errors import UserError
from zimage_lora.models.arch import ARCHS
from zimage_lora.models.hub import resolve_model_dir
from zimage_lora.ui.server import playground_error

TURBO = ARCHS["zimage_turbo"].default_model
OFFLINE = "is not downloaded and this machine is offline; download it or choose a local folder under models/"


@pytest.fixture
def queue(data_dir, tmp_path, monkeypatch):  # noqa: F811 - the fixture imported above
    """A client whose server queues but never starts anything, and whose hub cache is empty (offline: the data_dir
    fixture sets HF_HUB_OFFLINE)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    client = open_client(data_dir)
    yield client
    client.app.state.ui.store.close()


def request(**changes) -> dict:
    return {"model": "models/tiny", "arch": "zimage_turbo", "prompt": "a fox", "width": 64, "height": 64,
            "steps": 1, "seed": 3, "device": "cpu", **changes}  # fmt: skip


def test_the_same_request_again_answers_the_queued_one(queue):
    store = queue.app.state.ui.store
    first = queue.post("/api/generate", json=request())
    assert first.status_code == 202, first.text
    again = queue.post("/api/generate", json=request())
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    assert len(store.select("generations")) == 1
    other = queue.post("/api/generate", json=request(seed=4)).json()["id"]  # another seed is another generation
    assert other != first.json()["id"]
    assert len(store.select("generations")) == 2
    # once the first has ended, the same request is a new generation
    store.update("generations", first.json()["id"], status="done")
    later = queue.post("/api/generate", json=request()).json()["id"]
    assert later not in (first.json()["id"], other)
    assert len(store.select("generations")) == 3


def test_generations_are_listed_newest_first_with_their_request(queue):
    ids = [queue.post("/api/generate", json=request(prompt=f"fox {n}", seed=n)).json()["id"] for n in range(3)]
    listed = queue.get("/api/generations").json()
    assert listed["total"] == 3
    assert [g["id"] for g in listed["generations"]] == ids[::-1]
    newest = listed["generations"][0]
    assert newest["status"] == "queued" and newest["images"] == [] and newest["error"] is None
    assert newest["created"] and newest["log"] is None
    assert {k: newest["request"][k] for k in ("prompt", "seed", "width", "height", "loras", "model")} == {
        "prompt": "fox 2", "seed": 2, "width": 64, "height": 64, "loras": [], "model": "models/tiny",
    }  # fmt: skip
    assert "args" not in newest["request"]
    page = queue.get("/api/generations?limit=2&offset=2").json()
    assert [g["id"] for g in page["generations"]] == ids[:1] and page["total"] == 3
    assert queue.get("/api/generations?limit=0").json()["field"] == "limit"
    assert queue.get(f"/api/generate/{ids[0]}").json() == listed["generations"][2]


def test_an_empty_base_model_is_the_arch_default(queue, tmp_path, tiny_model_dir):
    refused = queue.post("/api/generate", json=request(model=None))
    assert refused.status_code == 422
    assert refused.json() == {"error": f"model: {TURBO} {OFFLINE}", "field": "model"}
    base = queue.post("/api/generate", json=request(model="", arch="zimage_base")).json()
    assert base["error"] == f"model: {ARCHS['zimage_base'].default_model} {OFFLINE}"
    assert queue.get("/api/generations").json()["total"] == 0

    # the hub default in the hub cache (the tiny model as its snapshot): queued with that model
    repo = tmp_path / "hub-cache" / f"models--{TURBO.replace('/', '--')}"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    queued = queue.post("/api/generate", json=request(model=None))
    assert queued.status_code == 202, queued.text
    assert queued.json()["request"]["model"] == TURBO
    row = queue.app.state.ui.store.get("generations", queued.json()["id"])
    assert f"--model={TURBO}" in row["request"]["args"]


def test_a_failed_generation_says_why_in_the_request_terms(queue, data_dir):  # noqa: F811
    """The runner records a generate process's end; the API says the CLI's sentence about the model in the request's
    terms (``model``, not the job file's ``model.name_or_path``), with the field, and links the whole log."""
    with pytest.raises(UserError) as said:  # what the generate process prints offline for the hub default
        resolve_model_dir(TURBO, key="--model")
    assert "--model" in str(said.value)
    gen_id = queue.post("/api/generate", json=request()).json()["id"]
    ui = queue.app.state.ui
    folder = ui.runner.gen_dir(gen_id)
    folder.mkdir(parents=True)
    (folder / "gen.log").write_text(f"loading the model\nerror: {said.value}\n")
    ui.runner._finish_generation(ui.store.get("generations", gen_id), 2)
    failed = queue.get(f"/api/generate/{gen_id}").json()
    assert failed["status"] == "failed"
    assert failed["error"] == f"model: {TURBO} {OFFLINE}" and failed["field"] == "model"
    assert failed["log"] == f"/files/generations/{gen_id}/gen.log"
    # other sentences keep their words, the key said as the request's
    message, field = playground_error("model.name_or_path folder /x does not exist: fix the path")
    assert (message, field) == ("model folder /x does not exist: fix the path", "model")
    message, field = playground_error("--model /x: no model_index.json or transformer/ in it; give a model folder")
    assert (message, field) == ("model /x: no model_index.json or transformer/ in it; give a model folder", "model")
    assert playground_error("width: must be a multiple of 16") == ("width: must be a multiple of 16", None)
