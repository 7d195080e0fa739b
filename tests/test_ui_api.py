"""The web UI's HTTP API (docs/ui-api.md) through FastAPI's TestClient, with real trainer and generate processes
on the tiny model: jobs to done, save/sample now, stop, resume, the device lock, downloads, and the security rules."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import yaml
from conftest import BASE_JOB, demo_dataset, merge, wait_for, wait_status_of
from fastapi.testclient import TestClient
from PIL import Image

from zimage_lora.config import JobConfig, preset_names
from zimage_lora.lora.io import read_lora
from zimage_lora.models.arch import ARCHS
from zimage_lora.ui.runner import alive, error_headline
from zimage_lora.ui.schema import PANELS
from zimage_lora.ui.security import Sessions
from zimage_lora.ui.server import create_app

BASE_URL = "http://127.0.0.1:8675"


@pytest.fixture
def data_dir(tmp_path, tiny_model_dir, monkeypatch) -> Path:
    """A data folder with the tiny model in models/tiny and three demo images (with captions) in datasets/fox.

    The trainers and generations the UI starts inherit the environment: offline, one thread (a tiny model gains
    nothing from more, and the tests share two cores)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = tmp_path / "data"
    shutil.copytree(tiny_model_dir, data / "models" / "tiny")
    demo_dataset(data / "datasets" / "fox", 3)
    return data


def open_client(data: Path, **options) -> TestClient:
    return TestClient(create_app(data, poll_s=0.1, **options), base_url=BASE_URL)


def end_processes(client: TestClient) -> None:
    """Kill whatever trainer, comparison, generation or captioning run a failed test left running."""
    store = client.app.state.ui.store
    for table in ("jobs", "comparisons", "generations", "captions"):
        for row in store.select(table):
            if alive(row["pid"], row["pid_start"]):
                os.kill(row["pid"], signal.SIGKILL)


@pytest.fixture
def client(data_dir):
    with open_client(data_dir) as c:
        try:
            yield c
        finally:
            end_processes(c)


def job_config(name: str, adapter: Path, override: dict | None = None) -> dict:
    """BASE_JOB as the UI sends it: the model and dataset named inside the data folder."""
    config = merge(
        BASE_JOB,
        {
            "job": {"name": name},
            "model": {"name_or_path": "models/tiny", "training_adapter": str(adapter)},
            "datasets": [{"path": "datasets/fox"}],
        },
    )
    return merge(config, override or {})


def wait_status(client: TestClient, name: str, *statuses: str, timeout: float = 120) -> dict:
    return wait_status_of(lambda: client.get(f"/api/jobs/{name}").json(), f"job {name}", statuses, timeout)


def wait_generation(client: TestClient, gen_id: str, timeout: float = 120) -> dict:
    return wait_for(
        lambda: (g := client.get(f"/api/generate/{gen_id}").json())["status"] in ("done", "failed") and g,
        timeout,
        f"generation {gen_id}",
    )


def png_bytes(size=(64, 64), color=(200, 80, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


# --- schema and config ------------------------------------------------------------------------------------------------


def _leaf_keys(model, prefix: str) -> set[str]:
    keys = set()
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            keys |= _leaf_keys(annotation, f"{prefix}.{name}")
        else:
            keys.add(f"{prefix}.{name}")
    return keys


def test_schema_panels_come_from_the_pydantic_models(client):
    body = client.get("/api/schema").json()
    assert [p["id"] for p in body["panels"]] == [
        "JOB", "MODEL", "QUANTIZATION", "TARGET", "SAVE", "TRAINING", "DATASETS", "SAMPLE", "ADVANCED",
    ]  # fmt: skip
    assert {section for _, section, _ in PANELS} == set(JobConfig.model_fields) - {"version"}
    fields = {f["key"]: f for p in body["panels"] for f in p["fields"]}
    expected = {"datasets"} | {
        key
        for section in JobConfig.model_fields
        if section not in ("version", "datasets")
        for key in _leaf_keys(JobConfig.model_fields[section].annotation, section)
    }
    assert set(fields) == expected  # every setting of the schema, nothing invented
    train = JobConfig.model_fields["train"].annotation.model_fields
    assert fields["train.steps"]["default"] == train["steps"].default
    assert fields["train.lr"].items() >= {"type": "number", "min": 0, "min_exclusive": True}.items()
    assert fields["train.lr"]["description"] == train["lr"].description
    assert fields["model.arch"]["type"] == "enum" and set(fields["model.arch"]["enum"]) == set(ARCHS)
    assert fields["sample.width"].items() >= {"type": "integer", "min": 64, "max": 4096, "multiple_of": 16}.items()
    assert fields["sample.steps"]["nullable"] and fields["sample.steps"]["default"] is None
    assert fields["train.ema.decay"]["max_exclusive"] is True
    assert fields["sample.prompts"]["type"] == "prompts"
    assert "seed" in {f["key"] for f in fields["sample.prompts"]["item_fields"]}
    dataset_fields = {f["key"]: f for f in fields["datasets"]["item_fields"]}
    assert dataset_fields["resolutions"]["item_bounds"] == {"min": 64, "max": 4096, "multiple_of": 16}
    assert fields["job.name"]["required"] and fields["job.name"]["pattern"]
    archs = body["archs"]
    assert archs["zimage_deturbo"].items() >= {"sample_steps": 25, "sample_guidance": 3.0, "adapters": {}}.items()
    adapters = archs["zimage_turbo_adapter"]["adapters"]
    assert list(adapters) == ["v2", "v1"] and adapters["v1"].endswith("_v1.safetensors")
    assert archs["zimage_turbo_adapter"]["default_model"] == ARCHS["zimage_turbo_adapter"].default_model


def test_presets_are_listed_as_ui_configs(client):
    presets = client.get("/api/presets").json()["presets"]
    assert [p["name"] for p in presets] == preset_names()
    by_name = {p["name"]: p["config"] for p in presets}
    v1 = by_name["turbo-adapter-v1"]
    assert v1["job"]["output_dir"] == "jobs" and v1["train"]["steps"] == 3000
    assert v1["model"]["training_adapter"].endswith("_v1.safetensors")


def test_config_validate_round_trips_config_yaml_config(client, tiny_adapter):
    config = job_config("round", tiny_adapter, {"sample": {"prompts": ["[trigger] fox", {"prompt": "x", "seed": 3}]}})
    first = client.post("/api/config/validate", json={"config": config}).json()
    assert first["ok"] and first["errors"] == []
    assert first["config"]["model"]["name_or_path"] == "models/tiny"  # paths stay relative to the data folder
    assert first["config"]["datasets"][0]["path"] == "datasets/fox"
    assert first["config"]["job"]["output_dir"] == "jobs"
    assert first["config"]["train"]["lr"] == config["train"]["lr"]
    assert yaml.safe_load(first["yaml"])["sample"]["prompts"] == ["[trigger] fox", {"prompt": "x", "seed": 3}]
    second = client.post("/api/config/validate", json={"yaml": first["yaml"]}).json()
    assert second["ok"] and second["config"] == first["config"] and second["yaml"] == first["yaml"]
    third = client.post("/api/config/validate", json={"config": second["config"]}).json()
    assert third["config"] == first["config"]


@pytest.mark.parametrize(
    ("override", "key", "words"),
    [
        ({"train": {"lr": -1}}, "train.lr", "must be >"),
        ({"train": {"lrr": 1}}, "train.lrr", "did you mean 'lr'"),
        ({"datasets": [{"path": "datasets/nothing"}]}, "datasets[0].path", "folder not found"),
        ({"model": {"name_or_path": "models/missing"}}, "model.name_or_path", "not found"),
        ({"model": {"arch": "zimage_deturbo"}}, "model.training_adapter", "only used with arch"),
        ({"job": {"name": "../x"}}, "job.name", "not allowed"),
        ({"datasets": [{"resolutions": [1024]}]}, "datasets[0].resolutions", "no image is large enough for 1024"),
    ],
)
def test_config_validate_reports_the_clis_error_by_key(client, tiny_adapter, override, key, words):
    sent = job_config("v", tiny_adapter, override)
    body = client.post("/api/config/validate", json={"config": sent}).json()
    assert body["ok"] is False and body["config"] == sent  # as sent, so the form keeps what the user typed
    assert body["errors"][0]["key"] == key and words in body["errors"][0]["message"]
    # the YAML view of the same invalid config, and back: same error, and the form gets the config to show
    again = client.post("/api/config/validate", json={"yaml": body["yaml"]}).json()
    assert again["ok"] is False and again["config"] == sent and again["errors"] == body["errors"]


def test_config_validate_warns_beside_the_field_and_still_accepts(client, tiny_adapter):
    sent = job_config("v", tiny_adapter, {"train": {"lr": 3e-4}})
    body = client.post("/api/config/validate", json={"config": sent}).json()
    assert body["ok"] is True and body["errors"] == []
    [warning] = [w for w in body["warnings"] if w["key"] == "train.lr"]
    assert "the guide warns that 0.0002 and above" in warning["message"]
    calm = client.post("/api/config/validate", json={"config": job_config("v", tiny_adapter, {"train": {"lr": 1e-4}})})
    assert not [w for w in calm.json()["warnings"] if w["key"] == "train.lr"]


def test_config_validate_marks_every_field_in_error_at_once(client, tiny_adapter):
    sent = job_config("v", tiny_adapter, {"train": {"lr": -1, "steps": 0}, "sample": {"every": 0}})
    body = client.post("/api/config/validate", json={"config": sent}).json()
    assert body["ok"] is False
    assert [e["key"] for e in body["errors"]] == ["train.steps", "train.lr", "sample.every"]
    assert all(e["message"].startswith(e["key"] + ":") and "more)" not in e["message"] for e in body["errors"])
    create = client.post("/api/jobs", json={"config": sent})  # saving refuses it with the same list
    assert create.status_code == 422 and create.json()["field"] == "train.steps"
    assert [e["key"] for e in create.json()["errors"]] == [e["key"] for e in body["errors"]]


def test_config_validate_refuses_bad_yaml_and_ambiguous_bodies(client):
    body = client.post("/api/config/validate", json={"yaml": "job: [unclosed"}).json()
    assert body["ok"] is False and "syntax error at line" in body["errors"][0]["message"] and body["config"] is None
    body = client.post("/api/config/validate", json={"yaml": "job:\n  name: a\n  name: b\n"}).json()
    assert body["ok"] is False and "duplicate key 'name'" in body["errors"][0]["message"]
    response = client.post("/api/config/validate", json={"yaml": "a: 1", "config": {}})
    assert response.status_code == 400 and response.json()["field"] == "config"
    response = client.post("/api/config/validate", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422 and "error" in response.json() and "Traceback" not in response.text


# --- jobs without training --------------------------------------------------------------------------------------------


def test_job_create_update_clone_delete(client, data_dir, tiny_adapter):
    config = job_config("alpha", tiny_adapter)
    assert client.post("/api/jobs", json={"config": config}).status_code == 201
    job_yaml = yaml.safe_load((data_dir / "jobs" / "alpha" / "job.yaml").read_text())
    assert job_yaml["job"]["output_dir"] == str(data_dir / "jobs")  # what the trainer runs: absolute paths
    assert job_yaml["model"]["name_or_path"] == str(data_dir / "models" / "tiny")
    assert job_yaml["datasets"][0]["path"] == str(data_dir / "datasets" / "fox")
    taken = client.post("/api/jobs", json={"config": config})
    assert taken.status_code == 409 and taken.json()["field"] == "job.name"
    bad = client.post("/api/jobs", json={"config": merge(config, {"job": {"name": "b"}, "train": {"steps": 0}})})
    assert bad.status_code == 422 and bad.json()["field"] == "train.steps" and bad.json()["errors"]

    listed = client.get("/api/jobs").json()["jobs"]
    assert [(j["name"], j["status"], j["step"], j["steps"], j["device"]) for j in listed] == [
        ("alpha", "draft", 0, 6, "cpu")
    ]
    job = client.get("/api/jobs/alpha").json()
    assert job["config"]["train"]["steps"] == 6 and "steps: 6" in job["yaml"] and job["log_tail"] == []

    changed = merge(job["config"], {"train": {"steps": 9}})
    assert client.put("/api/jobs/alpha", json={"config": changed}).status_code == 200
    assert client.get("/api/jobs/alpha").json()["steps"] == 9
    assert yaml.safe_load((data_dir / "jobs" / "alpha" / "job.yaml").read_text())["train"]["steps"] == 9
    renamed = client.put("/api/jobs/alpha", json={"config": merge(changed, {"job": {"name": "other"}})})
    assert renamed.status_code == 422 and renamed.json()["field"] == "job.name"

    assert client.post("/api/jobs/alpha/clone", json={"name": "beta"}).status_code == 201
    assert client.get("/api/jobs/beta").json()["config"]["job"]["name"] == "beta"
    assert client.post("/api/jobs/alpha/clone", json={"name": "beta"}).status_code == 409
    assert client.post("/api/jobs/alpha/clone", json={"name": "../gamma"}).status_code == 400

    assert client.post("/api/jobs/alpha/save").status_code == 409  # not running
    assert client.post("/api/jobs/alpha/stop").status_code == 409
    assert client.delete("/api/jobs/alpha").status_code == 400  # no confirm
    assert client.delete("/api/jobs/alpha?confirm=beta").status_code == 400
    assert client.delete("/api/jobs/alpha?confirm=alpha").json() == {"deleted": "alpha"}
    assert not (data_dir / "jobs" / "alpha").exists()
    missing = client.get("/api/jobs/alpha")
    assert missing.status_code == 404 and missing.json()["field"] == "name"


def test_a_queued_job_is_dequeued_by_stop(client, tiny_adapter):
    """While one job holds the device, a second one queues; stopping it puts it back as it was."""
    client.post("/api/jobs", json={"config": job_config("first", tiny_adapter, {"train": {"steps": 5000}})})
    client.post("/api/jobs", json={"config": job_config("second", tiny_adapter)})
    client.post("/api/jobs/first/start")
    wait_status(client, "first", "running")
    assert client.post("/api/jobs/second/start").json()["status"] == "queued"
    time.sleep(0.5)
    assert client.get("/api/jobs/second").json()["status"] == "queued"  # the device is busy
    assert client.post("/api/jobs/second/start").status_code == 409
    assert client.put("/api/jobs/second", json={"config": job_config("second", tiny_adapter)}).status_code == 409
    assert client.delete("/api/jobs/first?confirm=first").status_code == 409
    assert client.post("/api/jobs/second/stop").json()["status"] == "draft"
    client.post("/api/jobs/first/stop")  # perhaps while it still loads: then it just ends
    assert wait_status(client, "first", "stopped")["exit_code"] in (0, -signal.SIGTERM)


# --- training for real ------------------------------------------------------------------------------------------------


def test_job_runs_to_done_and_its_lora_generates(client, data_dir, tiny_adapter, tmp_path):
    config = job_config("fox", tiny_adapter, {"sample": {"every": 3, "steps": 2, "prompts": ["[trigger] head"]}})
    assert client.post("/api/jobs", json={"config": config}).status_code == 201
    assert client.post("/api/jobs/fox/start").status_code == 200
    job = wait_status(client, "fox", "done", "failed")
    assert job["status"] == "done" and job["exit_code"] == 0 and job["error"] is None
    assert job["step"] == job["steps"] == 6 and job["sec_per_it"] > 0 and job["eta_s"] is None
    assert any(line.startswith("done: ") for line in job["log_tail"])
    assert client.get("/api/jobs").json()["jobs"][0].items() >= {"name": "fox", "status": "done", "step": 6}.items()

    metrics = client.get("/api/jobs/fox/metrics").json()["metrics"]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "lr", "grad_norm", "sec"} <= set(m) for m in metrics)
    assert [m["step"] for m in client.get("/api/jobs/fox/metrics?after=4").json()["metrics"]] == [5, 6]
    assert "done: " in "\n".join(client.get("/api/jobs/fox/log?lines=5").json()["lines"])

    samples = client.get("/api/jobs/fox/samples").json()
    assert [(s["step"], s["index"]) for s in samples["samples"]] == [(0, 0), (3, 0), (6, 0)]
    assert Image.open(io.BytesIO(client.get(samples["samples"][-1]["url"]).content)).size == (64, 64)
    assert client.get(samples["contact_sheet"]).headers["content-type"] == "image/png"

    checkpoints = client.get("/api/jobs/fox/checkpoints").json()["checkpoints"]
    assert [(c["step"], c["final"]) for c in checkpoints] == [(2, False), (4, False), (None, True)]
    final = checkpoints[-1]
    assert final["url"] == "/files/jobs/fox/fox.safetensors?download=1"
    download = client.get(final["url"])
    assert download.status_code == 200 and "attachment" in download.headers["content-disposition"]
    assert len(download.content) == final["bytes"]
    (tmp_path / "fox.safetensors").write_bytes(download.content)
    lora = read_lora(tmp_path / "fox.safetensors")
    assert lora.modules and all(w.rank == 4 for w in lora.modules.values())

    with client.stream("GET", "/api/jobs/fox/events?once=1") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        text = "".join(stream.iter_text())
    events = [line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("event: ")]
    assert events == ["job", "samples", "checkpoints", "metrics", "log"]
    assert '"status": "done"' in text and '"step": 6' in text

    loras = client.get("/api/loras").json()["loras"]
    final_lora = next(item for item in loras if item["final"])
    assert final_lora.items() >= {"job": "fox", "path": "jobs/fox/fox.safetensors", "base_model": "models/tiny"}.items()
    # trained with the training adapter, used on plain Turbo (the playground offers the arch LoRAs are used with)
    assert (final_lora["trained_arch"], final_lora["arch"]) == ("zimage_turbo_adapter", "zimage_turbo")
    assert client.get("/api/models").json() == {"models": [{"name": "tiny", "path": "models/tiny"}]}

    request = {
        "model": "models/tiny",
        "arch": "zimage_turbo_adapter",
        "loras": [{"path": final_lora["path"], "weight": 0.8}],
        "prompt": "zfox head",
        "width": 64,
        "height": 64,
        "steps": 2,
        "count": 2,
        "device": "cpu",
    }
    response = client.post("/api/generate", json=request)
    assert response.status_code == 202
    generation = wait_generation(client, response.json()["id"])
    assert generation["status"] == "done", generation["error"]
    assert len(generation["images"]) == 2
    assert Image.open(io.BytesIO(client.get(generation["images"][0]).content)).size == (64, 64)
    # the playground's memory switches reach the generator (recorded in the PNG's settings)
    small = client.post("/api/generate", json={**request, "count": 1, "quantize": "int8"}).json()["id"]
    generation = wait_generation(client, small)
    assert generation["status"] == "done", generation["error"]
    text = Image.open(io.BytesIO(client.get(generation["images"][0]).content)).text
    assert text["quantize"] == "int8" and text["lora_fused"] == "false"  # a quantized base keeps branches
    branches = client.post("/api/generate", json={**request, "count": 1, "fuse": False, "compile": True}).json()["id"]
    args = client.app.state.ui.store.get("generations", branches)["request"]["args"]
    assert "--no-fuse" in args and "--compile" in args
    generation = wait_generation(client, branches)
    assert generation["status"] == "done", generation["error"]
    assert Image.open(io.BytesIO(client.get(generation["images"][0]).content)).text["lora_fused"] == "false"
    refused = client.post("/api/generate", json={**request, "quantize": "int4"})
    assert refused.status_code == 422 and refused.json()["field"] == "quantize"

    assert client.delete("/api/jobs/fox?confirm=fox").status_code == 200
    assert client.get("/api/loras").json() == {"loras": []}


def test_save_sample_stop_resume_and_the_device_lock(client, data_dir, tiny_adapter, tmp_path, monkeypatch):
    """Save/sample now act at an unscheduled step; stop saves; resume finishes; a generation waits for the job. The
    trainer is held after steps 3 and 6 (``wait`` faults) while the requests are made, so they land at those steps
    on any machine."""
    holds = tmp_path / "holds"
    holds.mkdir()
    monkeypatch.setenv("ZIMAGE_LORA_FAULT", "wait@step:3,wait@step:6")  # the trainers the runner starts see it
    monkeypatch.setenv("ZIMAGE_LORA_FAULT_DIR", str(holds))
    override = {
        "train": {"steps": 300},
        "save": {"every": 1000, "keep": 10},
        "sample": {"every": 1000, "steps": 2, "prompts": ["[trigger] head"]},
    }
    client.post("/api/jobs", json={"config": job_config("long", tiny_adapter, override)})
    client.post("/api/jobs/long/start")
    wait_status(client, "long", "running")
    wait_for(lambda: (holds / "held-step-3").exists(), what="the trainer held after step 3")
    assert client.post("/api/jobs/long/save").json() == {"name": "long", "requested": "save"}
    assert client.post("/api/jobs/long/sample").status_code == 200
    (holds / "release-step-3").touch()

    def unscheduled_checkpoint():
        found = client.get("/api/jobs/long/checkpoints").json()["checkpoints"]
        return next((c for c in found if c["step"] and c["step"] % 1000), None)

    checkpoint = wait_for(unscheduled_checkpoint, 60, "the requested checkpoint")
    assert checkpoint["step"] == 3
    wait_for(lambda: any(s["step"] == 3 for s in client.get("/api/jobs/long/samples").json()["samples"]), 60)
    wait_for(lambda: (holds / "held-step-6").exists(), what="the trainer held after step 6")
    assert client.post("/api/jobs/long/stop").json()["status"] == "stopping"
    (holds / "release-step-6").touch()
    stopped = wait_status(client, "long", "stopped", "failed", "done")
    assert stopped["status"] == "stopped" and stopped["exit_code"] == 0
    stopped_at = stopped["step"]
    assert stopped_at == 6
    assert (data_dir / "jobs" / "long" / "state" / f"{stopped_at:09d}.pt").is_file()
    assert stopped["resumable"] is True  # the page offers Resume
    assert client.post("/api/jobs/long/save").status_code == 409  # not running

    assert client.post("/api/jobs/long/resume").json()["status"] == "queued"
    wait_status(client, "long", "running")
    generate = {
        "model": "models/tiny",
        "loras": [{"path": f"jobs/long/{checkpoint['file']}"}],
        "prompt": "zfox",
        "width": 64,
        "height": 64,
        "steps": 1,
        "device": "cpu",
    }
    gen_id = client.post("/api/generate", json=generate).json()["id"]
    time.sleep(1.0)
    assert client.get(f"/api/generate/{gen_id}").json()["status"] == "queued"  # the job holds the cpu
    assert client.get("/api/jobs/long").json()["status"] == "running"
    done = wait_status(client, "long", "done", "failed")
    assert done["status"] == "done" and done["step"] == 300
    late = client.post("/api/jobs/long/sample")  # after the end: answered, pointing at the final LoRA
    assert late.status_code == 409 and late.json()["error"].endswith("its final LoRA is jobs/long/long.safetensors")
    assert not (data_dir / "jobs" / "long" / "requests" / "sample").exists()
    generation = wait_generation(client, gen_id)  # the device was freed
    assert generation["status"] == "done" and len(generation["images"]) == 1
    started = client.app.state.ui.store.get("generations", gen_id)["started"]
    assert started >= client.app.state.ui.store.get("jobs", "long")["finished"]

    steps = [m["step"] for m in client.get("/api/jobs/long/metrics").json()["metrics"]]
    assert steps == list(range(1, 301))  # resumed where it stopped, no step twice
    files = [(c["step"], c["final"]) for c in client.get("/api/jobs/long/checkpoints").json()["checkpoints"]]
    assert (checkpoint["step"], False) in files and files[-1] == (None, True)
    log = "\n".join(client.get("/api/jobs/long/log?lines=1000").json()["lines"])
    assert "request: save" in log and "request: sample" in log and "stopped at step" in log


def test_force_stop_kills_the_trainer_keeps_its_checkpoints_and_resume_continues(
    client, data_dir, tiny_adapter, tmp_path, monkeypatch
):
    """A trainer that does not come back (here: held after step 12 by a ``wait`` fault, as a hung device would hold
    it) is killed by a force stop; its checkpoints stay whole and a resume goes on from the last one."""
    holds = tmp_path / "holds"
    holds.mkdir()
    monkeypatch.setenv("ZIMAGE_LORA_FAULT", "wait@step:12")
    monkeypatch.setenv("ZIMAGE_LORA_FAULT_DIR", str(holds))
    override = {
        "train": {"steps": 400},
        "save": {"every": 5, "keep": 3},
        "sample": {"every": 1000, "steps": 2, "prompts": ["[trigger] head"]},
    }
    client.post("/api/jobs", json={"config": job_config("stuck", tiny_adapter, override)})
    client.post("/api/jobs/stuck/start")
    wait_status(client, "stuck", "running")
    wait_for(lambda: (holds / "held-step-12").exists(), what="the trainer stuck after step 12")
    pid = client.app.state.ui.store.get("jobs", "stuck")["pid"]
    assert client.post("/api/jobs/stuck/stop", json={"force": True}).json()["status"] == "stopping"
    stopped = wait_status(client, "stuck", "stopped", "failed", "done")
    assert stopped["status"] == "stopped" and stopped["exit_code"] == -signal.SIGKILL
    assert "force-stopped" in stopped["error"] and "last checkpoint" in stopped["error"]
    assert not alive(pid, None)
    folder = data_dir / "jobs" / "stuck"
    assert json.loads((folder / "run.json").read_text())["status"] == "running"  # killed: it could not say otherwise
    saved = sorted(folder.glob("stuck_*.safetensors"))
    assert saved and all(read_lora(path) for path in saved)  # every file it left is whole
    last = int(saved[-1].stem.split("_")[-1])
    assert client.post("/api/jobs/stuck/resume").json()["status"] == "queued"
    wait_status(client, "stuck", "running")
    assert client.get("/api/jobs/stuck").json()["error"] is None

    def resumed_at():
        log = "\n".join(client.get("/api/jobs/stuck/log?lines=2000").json()["lines"])
        found = re.search(r"resumed from step (\d+)", log)
        return found and int(found[1])

    resumed = wait_for(resumed_at, what="the resumed trainer")
    assert resumed == last == 10  # its last save before it got stuck
    client.post("/api/jobs/stuck/stop", json={"force": True})
    assert wait_status(client, "stuck", "stopped", "failed")["status"] == "stopped"


# --- datasets ---------------------------------------------------------------------------------------------------------


def test_datasets_create_list_upload_caption_thumb_check_delete(client, data_dir):
    assert client.post("/api/datasets", json={"name": "cats"}).status_code == 201
    assert client.post("/api/datasets", json={"name": "cats"}).status_code == 409
    assert client.post("/api/datasets", json={"name": ".hidden"}).status_code == 400
    files = [
        ("files", ("Cat One.PNG", png_bytes((96, 64)), "image/png")),
        ("files", ("Cat One.txt", b"a [trigger] cat", "text/plain")),
        ("files", ("two.jpg", _jpeg(), "image/jpeg")),
    ]
    result = client.post("/api/datasets/cats/upload", files=files).json()
    assert result == {"saved": ["Cat_One.png", "Cat_One.txt", "two.jpg"], "rejected": [], "orphan_captions": []}
    listed = {d["name"]: d for d in client.get("/api/datasets").json()["datasets"]}
    assert listed["cats"] == {"name": "cats", "images": 2, "captioned": 1}
    assert listed["fox"]["images"] == 3

    images = {i["file"]: i for i in client.get("/api/datasets/cats").json()["images"]}
    assert images["Cat_One.png"].items() >= {"caption": "a [trigger] cat", "width": 96, "height": 64}.items()
    assert images["two.jpg"]["caption"] == "" and images["two.jpg"]["url"] == "/files/datasets/cats/two.jpg"
    thumb = client.get(images["Cat_One.png"]["thumb"])
    assert thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 256
    assert any((data_dir / ".thumbs").iterdir())

    assert client.put("/api/datasets/cats/captions/two.jpg", json={"caption": "zcat sleeping"}).status_code == 200
    assert (data_dir / "datasets" / "cats" / "two.txt").read_text() == "zcat sleeping"
    assert client.put("/api/datasets/cats/captions/none.png", json={"caption": "x"}).status_code == 404

    check = client.get("/api/datasets/cats/check?resolutions=64&trigger=zcat").json()
    assert "dataset " in check["report"] and "resolution 64" in check["report"]
    assert check["problems"] and all(p["message"] in check["report"] for p in check["problems"])
    # problems come as data, not as lines to match: by kind and file (the two plain pictures look alike)
    kinds = {(p["kind"], p["file"]) for p in check["problems"]}
    assert ("near_duplicate", "Cat_One.png") in kinds and not any(p["fatal"] for p in check["problems"])
    assert check["trainable"] == 2
    assert client.get("/api/datasets/cats").json()["upload_exts"] == [".png", ".jpg", ".jpeg", ".webp", ".bmp", ".txt"]
    assert client.get("/api/datasets/cats/check?resolutions=50").status_code == 400

    assert client.delete("/api/datasets/cats/images/Cat_One.png").status_code == 200
    assert not (data_dir / "datasets" / "cats" / "Cat_One.txt").exists()
    assert client.delete("/api/datasets/cats").status_code == 400
    assert client.delete("/api/datasets/cats?confirm=cats").status_code == 200
    assert not (data_dir / "datasets" / "cats").exists()
    assert client.get("/api/datasets/cats").status_code == 404


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (80, 80), (10, 120, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_uploads_are_refused_by_type_content_size_and_name(data_dir):
    with open_client(data_dir, max_upload_bytes=20_000) as client:
        folder = data_dir / "datasets" / "fox"
        before = sorted(p.name for p in folder.iterdir())

        def upload(name: str, content: bytes):
            return client.post("/api/datasets/fox/upload", files=[("files", (name, content))])

        wrong_type = upload("virus.exe", b"MZ")
        assert wrong_type.status_code == 415 and wrong_type.json()["rejected"][0]["file"] == "virus.exe"
        assert upload("anim.gif", b"GIF89a").status_code == 415
        fake = upload("fake.png", b"this is not a png at all")
        assert fake.status_code == 415 and "Pillow" in fake.json()["error"]
        truncated = upload("cut.png", png_bytes((64, 64))[:60])
        assert truncated.status_code == 415
        assert upload("big.txt", b"x" * 20_001).status_code == 413
        assert upload("big.png", os.urandom(30_000)).status_code == 413
        assert upload("../escape.png", png_bytes()).status_code == 400
        assert upload("sub/dir.png", png_bytes()).status_code == 400
        assert upload("???.png", png_bytes()).status_code == 400
        assert upload("", png_bytes()).status_code == 400
        assert client.post("/api/datasets/fox/upload", data={"other": "x"}).json()["field"] == "files"
        assert sorted(p.name for p in folder.iterdir()) == before  # nothing was written
        assert not (data_dir / "datasets" / "escape.png").exists()

        mixed = client.post(
            "/api/datasets/fox/upload",
            files=[("files", ("ok.png", png_bytes())), ("files", ("bad.png", b"nope"))],
        )
        assert mixed.status_code == 200
        assert mixed.json()["saved"] == ["ok.png"] and mixed.json()["rejected"][0]["file"] == "bad.png"
        assert client.post("/api/datasets/nothing/upload", files=[("files", ("a.png", png_bytes()))]).status_code == 404


# --- files and security -----------------------------------------------------------------------------------------------


def test_files_serve_inside_data_and_refuse_every_escape(client, data_dir, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("outside")
    (data_dir / "datasets" / "fox" / "link.png").symlink_to(secret)
    (data_dir / "datasets" / "fox" / "inside.png").symlink_to(data_dir / "datasets" / "fox" / "fox_01.png")

    ok = client.get("/files/datasets/fox/fox_01.png")
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"
    assert ok.headers["x-content-type-options"] == "nosniff" and "sandbox" in ok.headers["content-security-policy"]
    assert "attachment" in client.get("/files/datasets/fox/fox_01.png?download=1").headers["content-disposition"]
    assert client.get("/files/datasets/fox/inside.png").status_code == 200  # a link that stays inside is fine

    escapes = [
        "/files/datasets/fox/link.png",  # symlink out of DATA
        "/files/ui.db",  # inside DATA but not a served folder
        "/files/datasets/../ui.db",
        "/files/datasets/%2e%2e/ui.db",
        "/files/datasets/fox/%2e%2e%2f%2e%2e%2f%2e%2e%2fsecret.txt",
        "/files/datasets/%252e%252e%252fui.db",  # double-encoded
        "/files/datasets/fox/..%2f..%2f..%2fsecret.txt",
        f"/files/{secret}",  # absolute
        f"/files/%2F{str(secret).lstrip('/')}",
        f"/files/datasets/{secret}",
        "/files/datasets/fox/%00.png",
        "/files/datasets/fox",  # a folder
    ]
    for url in escapes:
        response = client.get(url)
        assert response.status_code == 404, url
        assert "outside" not in response.text and "SQLite" not in response.text, url
        assert set(response.json()) == {"error", "field"}, url


def test_dataset_file_routes_refuse_escapes(client, data_dir, tmp_path):
    victim = tmp_path / "victim.png"
    victim.write_bytes(png_bytes())
    (data_dir / "datasets" / "fox" / "out.png").symlink_to(victim)
    rel = os.path.relpath(victim, data_dir / "datasets" / "fox")
    encoded = rel.replace("/", "%2f").replace(".", "%2e")
    for file in [encoded, rel.replace("/", "%2f"), "out.png", f"%252e%252e%252f{victim.name}", str(victim)]:
        assert client.get(f"/api/datasets/fox/thumb/{file}").status_code == 404, file
        assert client.put(f"/api/datasets/fox/captions/{file}", json={"caption": "x"}).status_code == 404, file
        assert client.delete(f"/api/datasets/fox/images/{file}").status_code == 404, file
    assert victim.is_file() and not victim.with_suffix(".txt").exists()
    assert client.get("/api/datasets/%2e%2e/thumb/fox_01.png").status_code in (400, 404)
    assert client.post("/api/datasets", json={"name": "../x"}).status_code == 400


def test_foreign_host_and_origin_are_refused(client):
    assert client.get("/api/jobs").status_code == 200
    foreign_host = client.get("/api/jobs", headers={"host": "evil.example:8675"})
    assert foreign_host.status_code == 400 and "evil.example" in foreign_host.json()["error"]
    assert client.get("/api/jobs", headers={"host": "localhost:8675"}).status_code == 200
    assert client.get("/api/jobs", headers={"host": "127.0.0.1:9999"}).status_code == 400
    assert client.get("/api/jobs", headers={"origin": "http://127.0.0.1:8675"}).status_code == 200
    for origin in ("http://evil.example", "http://127.0.0.1:9999", "null"):
        refused = client.post("/api/datasets", json={"name": "x"}, headers={"origin": origin})
        assert refused.status_code == 403, origin
    assert client.get("/api/datasets/x").status_code == 404  # the refused request did nothing


def test_a_token_is_required_by_header_or_cookie(data_dir, tiny_adapter):
    with open_client(data_dir, token="s3cret") as client:
        assert client.get("/api/jobs").status_code == 401
        assert client.get("/api/jobs").json()["error"].startswith("missing or wrong token")
        assert client.get("/files/datasets/fox/fox_01.png").status_code == 401
        assert client.get("/api/jobs", headers={"authorization": "Bearer nope"}).status_code == 401
        assert client.get("/api/jobs", headers={"authorization": "Bearer s3cret"}).status_code == 200
        page = client.get("/", follow_redirects=False)
        assert page.status_code == 303 and page.headers["location"] == "/login"
        assert client.get("/login").status_code == 200
        assert client.get("/static/index.html").status_code in (200, 404)  # open, whether or not the page exists

        client.post(
            "/api/jobs", json={"config": job_config("t", tiny_adapter)}, headers={"authorization": "Bearer s3cret"}
        )
        events = "/api/jobs/t/events?once=1"
        assert client.get(events).status_code == 401
        client.cookies.set("zl_token", "wrong")
        assert client.get(events).status_code == 401
        client.cookies.set("zl_token", "s3cret")  # the cookie holds a sign-in's session, never the token itself
        assert client.get(events).status_code == 401
        client.cookies.clear()
        assert client.get("/api/session").status_code == 401

        assert client.post("/api/login", json={"token": "nope"}).status_code == 401
        login = client.post("/api/login", json={"token": "s3cret"})
        assert login.status_code == 200
        cookie = login.headers["set-cookie"].lower()
        assert "zl_token=" in cookie and "s3cret" not in cookie and "httponly" in cookie and "samesite=strict" in cookie
        assert client.get("/api/session").json() == {"token_required": True, "signed_in": True}
        header_only = {"authorization": "Bearer s3cret", "cookie": ""}
        assert client.get("/api/session", headers=header_only).json() == {"token_required": True, "signed_in": False}
        with client.stream("GET", events) as stream:  # EventSource sends the cookie, not a header
            assert stream.status_code == 200 and "event: job" in "".join(stream.iter_text())
        assert client.get("/", follow_redirects=False).status_code == 200
        client.cookies.clear()

        form = client.post("/api/login", data={"token": "nope"}, follow_redirects=False)
        assert form.status_code == 303 and form.headers["location"] == "/login?error=1"
        form = client.post("/api/login", data={"token": "s3cret"}, follow_redirects=False)
        assert form.status_code == 303 and form.headers["location"] == "/"
        assert client.get("/api/jobs").status_code == 200  # the cookie from the form login
        old = client.cookies.get("zl_token")
        assert client.post("/api/logout").status_code == 200
        client.cookies.set("zl_token", old)  # the cookie signed out, kept by hand: refused
        assert client.get("/api/jobs").status_code == 401
        assert client.post("/api/logout").status_code == 401
        client.cookies.clear()
        assert client.get("/api/jobs").status_code == 401


def test_an_open_server_has_no_sign_in(client):
    assert client.get("/api/session").json() == {"token_required": False, "signed_in": False}


def test_errors_are_one_sentence_json(client):
    unknown = client.get("/api/nothing")
    assert unknown.status_code == 404 and unknown.json() == {"error": "nothing at /api/nothing", "field": None}
    bad = client.post("/api/generate", json={"model": "models/tiny", "prompt": "x", "width": 65})
    assert bad.status_code == 422 and bad.json()["field"] == "width" and "multiple of 16" in bad.json()["error"]
    missing = client.post("/api/generate", json={"model": "models/none", "prompt": "x"})
    assert missing.status_code == 422 and missing.json()["field"] == "model"
    escape = client.post("/api/generate", json={"model": "models/tiny", "prompt": "x", "loras": [{"path": "../x"}]})
    assert escape.status_code == 422 and escape.json()["field"] == "loras.0.path"
    assert client.post("/api/generate", json={"model": "m", "prompt": "x", "arch": "sdxl"}).json()["field"] == "arch"
    assert client.get("/api/generate/nope").status_code == 404
    assert client.post("/api/jobs", content=b"[]", headers={"content-type": "application/json"}).status_code == 422


def test_sign_in_sessions_expire_and_the_oldest_go_beyond_the_limit():
    sessions = Sessions(max_age_s=3600, limit=2)
    first, second = sessions.open(), sessions.open()
    assert first != second and sessions.valid(first) and sessions.valid(second)
    third = sessions.open()  # over the limit: the oldest goes
    assert not sessions.valid(first) and sessions.valid(second) and sessions.valid(third)
    sessions.close(second)
    assert not sessions.valid(second) and not sessions.valid("") and not sessions.valid("made-up")
    expired = Sessions(max_age_s=-1)  # already past its age when it is checked
    assert not expired.valid(expired.open())


def test_a_failures_headline_is_the_clis_sentence_else_the_tracebacks_last_error():
    traceback = ["loading", "Traceback (most recent call last):", '  File "x.py", line 1', "ValueError: bad shape"]
    assert error_headline(traceback) == "ValueError: bad shape"
    said = ["error: model.arch: xyz is not one of zimage_turbo; pick one", *traceback]
    assert error_headline(said) == "model.arch: xyz is not one of zimage_turbo; pick one"  # the sentence wins
    assert error_headline(["step 3 loss 0.2", "Killed"]) is None
