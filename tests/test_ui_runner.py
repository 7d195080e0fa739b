"""The UI's runner: trainers outlive the UI and a restarted UI re-attaches to them (the real server, SIGTERM and
SIGKILL), a killed trainer is marked failed with its last log lines, finished processes are judged by their own
run.json only, the database's migrations and lock, and the `zimage-lora ui` command's refusals."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import cli_env, run_cli
from test_ui_api import data_dir, job_config, open_client, wait_for, wait_status  # noqa: F401 - data_dir: a fixture

from zimage_lora.errors import UserError
from zimage_lora.ui.db import MIGRATIONS, Store
from zimage_lora.ui.runner import Runner, alive, start_time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data: Path, port: int, log: Path, holds: Path | None = None) -> subprocess.Popen:
    """``zimage-lora ui`` as a user starts it; returns once it answers. With ``holds``, its trainers stop after step 3
    until ``holds/release-step-3`` exists (the ``wait`` fault), so they cannot finish while the test is not looking."""
    env = {**cli_env("wait@step:3" if holds else None), "OMP_NUM_THREADS": "1"}
    if holds:
        env["ZIMAGE_LORA_FAULT_DIR"] = str(holds)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "zimage_lora.cli", "ui", "--data", str(data), "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/jobs", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"the UI did not start: {log.read_text()}")


def trainer(data: Path, name: str) -> tuple[int, int]:
    """The trainer's pid and /proc start time, as the UI recorded them."""
    with sqlite3.connect(f"file:{data / 'ui.db'}?mode=ro", uri=True) as db:
        return db.execute("SELECT pid, pid_start FROM jobs WHERE name = ?", (name,)).fetchone()


def raw_get(port: int, path: str) -> str:
    """An HTTP request sent as written (``..`` and all), as curl --path-as-is would."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode("latin-1")


def follow_events(http: httpx.Client, name: str) -> tuple[list[str], list[int]]:
    """Read the job's event stream until a ``job`` event says it stopped running: (event names, metric steps)."""
    events, steps, event = [], [], None
    with http.stream("GET", f"/api/jobs/{name}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: "):
                payload = json.loads(line[len("data: ") :])
                events.append(event)
                if event == "metrics":
                    steps += [row["step"] for row in payload["metrics"]]
                if event == "job" and payload["status"] != "running":
                    break
    return events, steps


def test_a_restarted_ui_reattaches_to_its_running_trainer(data_dir, tiny_adapter, tmp_path):  # noqa: F811
    port = free_port()
    log = tmp_path / "server.log"
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    holds = tmp_path / "holds"
    holds.mkdir()
    server = start_server(data_dir, port, log, holds)  # its trainer waits after step 3 for the test
    pid = None
    try:
        config = job_config("survivor", tiny_adapter, {"train": {"steps": 500}, "save": {"every": 1000}})
        assert http.post("/api/jobs", json={"config": config}).status_code == 201
        assert http.post("/api/jobs/survivor/start").status_code == 200
        wait_for(lambda: http.get("/api/jobs/survivor").json()["status"] == "running", 60, "running")
        pid, pid_start = trainer(data_dir, "survivor")
        assert alive(pid, pid_start)

        server.send_signal(signal.SIGTERM)  # a polite shutdown (uvicorn re-raises the signal once it is done)
        assert server.wait(timeout=30) in (0, -signal.SIGTERM)
        assert alive(pid, pid_start)  # the trainer runs in its own session: it outlives the UI
        server = start_server(data_dir, port, log)
        assert http.get("/api/jobs/survivor").json()["status"] == "running"  # re-attached, not failed
        assert trainer(data_dir, "survivor") == (pid, pid_start)

        for path in ("/files/../ui.db", "/files/datasets/../ui.db", "/files/datasets/fox/../../../ui.db"):
            response = raw_get(port, path)
            assert response.startswith("HTTP/1.1 404"), path
            assert "SQLite" not in response, path

        server.kill()  # a crash: no shutdown at all
        server.wait(timeout=30)
        assert alive(pid, pid_start)
        server = start_server(data_dir, port, log)
        assert http.get("/api/jobs/survivor").json()["status"] == "running"
        wait_for(lambda: (holds / "held-step-3").exists(), 60, "the trainer held after step 3")
        seen = http.get("/api/jobs/survivor").json()["step"]
        (holds / "release-step-3").touch()

        events, steps = follow_events(http, "survivor")  # live, until the job is no longer running
        assert events[0] == "job" and events.count("metrics") > 1 and steps == sorted(set(steps))
        job = http.get("/api/jobs/survivor").json()  # the server is fine after the stream's client went away
        assert job["status"] == "done", job
        assert job["step"] == 500 == steps[-1] > seen and job["exit_code"] is None  # not its child: no exit code
        assert not alive(pid, pid_start)
        files = http.get("/api/jobs/survivor/checkpoints").json()["checkpoints"]
        assert files[-1]["file"] == "survivor.safetensors"
    finally:
        server.kill()
        server.wait(timeout=30)
        (holds / "release-step-3").touch()
        if pid is not None and alive(pid, pid_start):
            os.kill(pid, signal.SIGKILL)
        http.close()


def test_a_killed_trainer_is_failed_with_its_last_log_lines(data_dir, tiny_adapter):  # noqa: F811
    with open_client(data_dir) as client:
        store = client.app.state.ui.store
        config = job_config("victim", tiny_adapter, {"train": {"steps": 100_000}, "save": {"every": 100_000}})
        client.post("/api/jobs", json={"config": config})
        client.post("/api/jobs/victim/start")
        wait_for(lambda: client.get("/api/jobs/victim/metrics").json()["metrics"], what="the first step")
        os.kill(store.get("jobs", "victim")["pid"], signal.SIGKILL)
        job = wait_status(client, "victim", "failed", "done", "stopped", timeout=30)
        assert job["status"] == "failed" and job["exit_code"] == -signal.SIGKILL
        assert "last log lines" in job["error"] and "latents: " in job["error"]
        assert job["finished"] is not None
        assert job["resumable"] is False  # killed before its first save: the page offers Start over, not Resume
        refused = client.post("/api/jobs/victim/resume")
        assert refused.status_code == 409 and refused.json()["error"] == (
            "job 'victim' has no saved state to resume from (it ended before its first save); start it over"
        )
        assert client.post("/api/jobs/victim/start").json()["status"] == "queued"
        client.post("/api/jobs/victim/stop")
        wait_status(client, "victim", "stopped", "failed", timeout=120)


def test_a_gone_process_is_judged_by_its_own_run_json(tmp_path):
    """run.json says done only for the process that wrote it; a leftover from an earlier run means nothing."""
    data = tmp_path / "data"
    store = Store(data)
    runner = Runner(data, store)
    sleeper = subprocess.Popen(["sleep", "30"])
    gone = (sleeper.pid, start_time(sleeper.pid))
    sleeper.kill()
    sleeper.wait()
    assert not alive(*gone)
    config = {"train": {"steps": 5}, "job": {"device": "cpu"}}
    for name, writer, status in [("old", gone[0] + 1, "running"), ("own", gone[0], "running"), ("halt", 0, "stopping")]:
        folder = data / "jobs" / name
        folder.mkdir(parents=True)
        (folder / "run.json").write_text(json.dumps({"pid": writer, "status": "done"}))
        (folder / "ui-process.log").write_text("loading\nsomething broke\n")
        store.insert("jobs", name=name, config=config, status=status, pid=gone[0], pid_start=gone[1], created="t")
    runner.tick()
    old, own, halt = (store.get("jobs", n) for n in ("old", "own", "halt"))
    assert old["status"] == "failed" and old["error"].endswith("loading\nsomething broke")
    assert own["status"] == "done" and own["error"] is None
    assert halt["status"] == "stopped"  # asked to stop, ended before it trained: stopped, not failed
    store.close()


def test_process_identity_uses_the_proc_start_time():
    me = start_time(os.getpid())
    assert isinstance(me, int) and alive(os.getpid(), me)
    assert not alive(os.getpid(), me + 1)  # same pid, another start: a reused pid is not our trainer
    assert not alive(None, me) and start_time(2**22 + 12345) is None


def test_store_migrates_once_and_refuses_a_second_ui(tmp_path):
    store = Store(tmp_path)
    store.insert("jobs", name="a", config={"x": 1}, status="draft", created="t")
    with pytest.raises(UserError, match="another zimage-lora ui is serving this folder"):
        Store(tmp_path)
    store.close()
    again = Store(tmp_path)  # the lock went with the first store
    assert again.get("jobs", "a")["config"] == {"x": 1}
    versions = [tuple(r) for r in again.conn.execute("SELECT version FROM schema_version")]
    assert versions == [(v,) for v in range(1, len(MIGRATIONS) + 1)]  # each migration ran once
    assert again.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again.close()


def test_ui_command_refuses_to_serve_the_network_without_a_token(tmp_path):
    result = run_cli("ui", "--host", "0.0.0.0", "--data", str(tmp_path / "d"), timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--token" in result.stderr
    assert not (tmp_path / "d").exists()  # refused before anything was created
