"""The UI's device lock: each queue item holds a set of devices; items on disjoint sets run at once, an item that
shares a device with a running one waits, and a waiting item keeps its place (FIFO per device). The machine's
devices come from GET /api/devices (``ZIMAGE_LORA_UI_DEVICES`` replaces them here: the test machine has no GPUs);
a job or generation on a device the machine lacks is refused in one sentence."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import wait_for
from test_ui_api import client, data_dir, end_processes, job_config, wait_status  # noqa: F401 - fixtures

from zimage_lora.models.devices import cuda_count
from zimage_lora.ui.db import Store
from zimage_lora.ui.runner import Runner, start_time

DEVICES = "cpu,cuda:0,cuda:1,cuda:2"
MACHINE = "cpu, cuda:0, cuda:1, cuda:2"


def generation(device: str) -> dict:
    return {"model": "models/tiny", "prompt": "zfox", "width": 64, "height": 64, "steps": 1, "device": device}


def status(client, name: str) -> str:  # noqa: F811
    return client.get(f"/api/jobs/{name}").json()["status"]


def held(folder: Path) -> bool:
    """A trainer of this job is held by ``wait@setup``: ``held-setup``, or ``held-setup.rankR`` per process."""
    return any(folder.glob("held-setup*"))


def test_the_device_endpoint_and_a_device_the_machine_lacks(client, tiny_adapter, monkeypatch):  # noqa: F811
    monkeypatch.delenv("ZIMAGE_LORA_UI_DEVICES", raising=False)
    assert client.get("/api/devices").json() == {"devices": ["cpu", *(f"cuda:{i}" for i in range(cuda_count()))]}
    monkeypatch.setenv("ZIMAGE_LORA_UI_DEVICES", DEVICES)
    assert client.get("/api/devices").json() == {"devices": DEVICES.split(",")}

    config = job_config("far", tiny_adapter, {"job": {"device": ["cuda:1", "cuda:7"]}})
    assert client.post("/api/jobs", json={"config": config}).status_code == 201  # a job may be written for elsewhere
    refused = client.post("/api/jobs/far/start")
    assert refused.status_code == 422 and refused.json()["field"] == "job.device"
    assert (
        refused.json()["error"] == f"job.device: cuda:7 is not on this machine (it has {MACHINE}); choose one of those"
    )
    assert status(client, "far") == "draft"
    checked = client.post("/api/config/validate", json={"config": config}).json()  # the form's live check says so
    missing = f"job.device: cuda:7 is not on this machine (it has {MACHINE}); choose one of those"
    assert not checked["ok"] and checked["errors"] == [{"key": "job.device", "message": missing}]
    here = {**config, "job": {**config["job"], "device": ["cuda:1", "cuda:2"]}}
    assert client.post("/api/config/validate", json={"config": here}).json()["ok"]
    refused = client.post("/api/generate", json=generation("cuda:3"))
    assert refused.status_code == 422 and refused.json()["field"] == "device"
    assert refused.json()["error"] == f"device: cuda:3 is not on this machine (it has {MACHINE}); choose one of those"
    assert client.app.state.ui.store.select("generations") == []


def test_a_row_of_an_older_ui_holds_its_one_device_and_a_waiting_item_keeps_its_place(tmp_path, monkeypatch):
    """Rows as the database holds them, no process started: a running row written by an older UI (``device`` one
    name) keeps a two-GPU job that shares that GPU waiting, and a one-GPU item queued after it on the job's other GPU
    waits behind it (free now, but it would overtake an older item that wants it)."""
    monkeypatch.setenv("ZIMAGE_LORA_UI_DEVICES", DEVICES)
    data = tmp_path / "data"
    store = Store(data)
    runner = Runner(data, store)
    sleeper = subprocess.Popen(["sleep", "60"])  # the old row's live process
    try:
        config = {"train": {"steps": 5}, "job": {"device": "cuda:1"}}
        pid = {"pid": sleeper.pid, "pid_start": start_time(sleeper.pid)}
        store.insert("jobs", name="old", config=config, status="running", device="cuda:1", created="t", **pid)
        store.insert("jobs", name="wide", config=config, status="queued", device="cuda:0,cuda:1", created="t", queued=1)
        store.insert("generations", id="g", request={}, status="queued", device="cuda:0", created="t", queued=2)
        runner.tick()
        assert store.get("jobs", "old")["status"] == "running"
        assert store.get("jobs", "wide")["status"] == "queued"
        assert store.get("generations", "g")["status"] == "queued"
    finally:
        sleeper.kill()
        sleeper.wait()
        store.close()


def test_disjoint_device_sets_run_at_once_and_an_overlapping_one_waits(client, data_dir, tiny_adapter, monkeypatch):  # noqa: F811
    """Real trainers, held by the ``wait`` fault at ``setup`` (the start of the recipe, before a trainer resolves its
    device), so that "running at the same time" is a fact on disk: each writes ``held-setup*`` into its own job
    folder (``ZIMAGE_LORA_FAULT_DIR=.`` is relative to the trainer's working folder, which the runner sets to the
    job folder; the two-GPU job starts one process per GPU through accelerate, each holding). The machine's list
    (``ZIMAGE_LORA_UI_DEVICES``) names three GPUs the test machine lacks: the trainers never get past ``setup``, as
    each job is stopped while held (SIGTERM: the job and any processes it started end, and the UI records it
    ``stopped``). What is tested is the queue's rule, on the sets the UI derives from each job's config:

    A [cuda:0, cuda:1] and B cuda:2 run together; C [cuda:1, cuda:2] waits for both; generation G2 on cuda:2 waits
    (behind B, then behind the older C); generation G0 on cuda:0 waits for A, then starts while C still waits (its
    device is free and no older item wants it)."""
    monkeypatch.setenv("ZIMAGE_LORA_UI_DEVICES", DEVICES)
    monkeypatch.setenv("ZIMAGE_LORA_FAULT", "wait@setup")
    monkeypatch.setenv("ZIMAGE_LORA_FAULT_DIR", ".")
    monkeypatch.setenv("ZIMAGE_LORA_FAULT_WAIT_S", "120")  # a test that died leaves no trainer waiting for long
    runner = client.app.state.ui.runner
    jobs = data_dir / "jobs"
    for name, device in (("a", ["cuda:0", "cuda:1"]), ("b", "cuda:2"), ("c", ["cuda:1", "cuda:2"])):
        config = job_config(name, tiny_adapter, {"job": {"device": device}})
        assert client.post("/api/jobs", json={"config": config}).status_code == 201
    client.post("/api/jobs/a/start")
    client.post("/api/jobs/b/start")
    wait_status(client, "a", "running")
    wait_status(client, "b", "running")
    wait_for(lambda: held(jobs / "a") and held(jobs / "b"), 60, "A and B held at setup")
    client.post("/api/jobs/c/start")
    g2 = client.post("/api/generate", json=generation("cuda:2")).json()["id"]
    g0 = client.post("/api/generate", json=generation("cuda:0")).json()["id"]
    gen = lambda gen_id: client.get(f"/api/generate/{gen_id}").json()["status"]  # noqa: E731
    runner.tick()
    assert [status(client, n) for n in "abc"] == ["running", "running", "queued"]
    assert (gen(g2), gen(g0)) == ("queued", "queued")
    listed = {job["name"]: job["device"] for job in client.get("/api/jobs").json()["jobs"]}
    assert listed == {"a": "cuda:0, cuda:1", "b": "cuda:2", "c": "cuda:1, cuda:2"}

    client.post("/api/jobs/a/stop")
    assert wait_status(client, "a", "stopped", "failed")["status"] == "stopped"
    runner.tick()  # the tick that recorded A's end started what could start; this one changes nothing
    assert status(client, "b") == "running" and status(client, "c") == "queued"  # B still holds cuda:2
    assert gen(g2) == "queued" and gen(g0) != "queued"  # G0 overtook C: their devices are disjoint

    client.post("/api/jobs/b/stop")
    assert wait_status(client, "b", "stopped", "failed")["status"] == "stopped"
    wait_status(client, "c", "running")
    wait_for(lambda: held(jobs / "c"), 60, "C held at setup")
    runner.tick()
    assert gen(g2) == "queued"  # C holds cuda:2 now

    client.post("/api/jobs/c/stop")
    c = wait_status(client, "c", "stopped", "failed")
    assert c["status"] == "stopped"
    wait_for(lambda: gen(g2) != "queued", 30, "G2 to start once C ended")
    store = client.app.state.ui.store
    assert store.get("generations", g2)["started"] >= c["finished"]
    assert store.get("generations", g0)["started"] <= store.get("jobs", "c")["started"]
    assert store.get("jobs", "c")["started"] >= store.get("jobs", "b")["finished"]
    end_processes(client)  # the generations: their outcome is not this test's subject (without the GPUs they fail)
