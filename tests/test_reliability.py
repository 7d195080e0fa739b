"""Never lose work: the trainer is interrupted, killed and starved on purpose, then resumed.

Failures are placed deterministically with ``ZIMAGE_LORA_FAULT`` (see ``zimage_lora.faults``), except the random
SIGKILL test, which kills a real process at random moments.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import cli_env

from zimage_lora.config import load_job
from zimage_lora.errors import ConfigError
from zimage_lora.lora.io import read_lora

STEPS = 8
OVERRIDE = {"train": {"steps": STEPS, "optimizer": "adamw8bit"}, "save": {"every": 2, "keep": 2}}


def cli(*args, fault: str | None = None) -> subprocess.CompletedProcess:
    from conftest import run_cli

    return run_cli(*args, "--no-progress", fault=fault)


def run_folder(job: Path) -> Path:
    return job.parent / "output" / "tiny"


def final_bytes(job: Path) -> bytes:
    return (run_folder(job) / "tiny.safetensors").read_bytes()


def every_top_level_file_loads(job: Path) -> None:
    for path in run_folder(job).glob("*.safetensors"):
        assert read_lora(path).modules, path  # a half-written file would fail here


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, tiny_adapter):
    """The uninterrupted run every interrupted one must reproduce, byte for byte."""
    from conftest import BASE_JOB, demo_dataset, merge

    root = tmp_path_factory.mktemp("reference")
    demo_dataset(root / "dataset", 3)
    data = merge(BASE_JOB, {"model": {"name_or_path": str(tiny_model_dir), "training_adapter": str(tiny_adapter)}})
    (root / "job.yaml").write_text(yaml.safe_dump(merge(data, OVERRIDE), sort_keys=False))
    proc = cli("train", str(root / "job.yaml"))
    assert proc.returncode == 0, proc.stderr
    return final_bytes(root / "job.yaml")


def test_sigint_saves_and_resume_gives_the_same_lora(make_job, reference):
    job = make_job(OVERRIDE)
    stopped = cli("train", str(job), fault="sigint@step:3")
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped at step 3" in stopped.stdout and "--resume" in stopped.stdout
    assert (run_folder(job) / "state" / "000000003.pt").is_file()
    assert not (run_folder(job) / "tiny.safetensors").exists()
    every_top_level_file_loads(job)
    resumed = cli("train", str(job), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert final_bytes(job) == reference


@pytest.mark.parametrize(
    "point", ["save.lora.tmp", "save.lora.renamed", "save.state.tmp", "save.state.renamed", "save.rotated"]
)
def test_killed_in_any_save_phase_resumes_to_the_same_lora(point, make_job, reference):
    job = make_job(OVERRIDE)
    killed = cli("train", str(job), fault=f"kill@{point}:4")
    assert killed.returncode == -signal.SIGKILL
    every_top_level_file_loads(job)  # a .tmp is never taken for a checkpoint
    resumed = cli("train", str(job), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert final_bytes(job) == reference
    assert not list(run_folder(job).rglob("*.tmp"))


def test_second_sigint_exits_at_once_without_damage(make_job, reference):
    job = make_job(OVERRIDE)
    proc = cli("train", str(job), fault="sigint2@step:3")
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr
    every_top_level_file_loads(job)
    assert cli("train", str(job), "--resume").returncode == 0
    assert final_bytes(job) == reference


def test_killed_while_caching_latents(make_job, reference):
    job = make_job(OVERRIDE)
    assert cli("train", str(job), fault="kill@cache.entry:2").returncode == -signal.SIGKILL
    cache = job.parent / "dataset" / ".zimage_cache"
    assert len(list(cache.glob("*.safetensors"))) == 2 and not list(cache.glob("*.tmp"))
    proc = cli("train", str(job), "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "1 encoded, 2 reused" in proc.stderr
    assert final_bytes(job) == reference


def last_logged_step(job: Path) -> int:
    """The last step ``metrics.jsonl`` records (a line still being written is skipped)."""
    path = run_folder(job) / "metrics.jsonl"
    steps = [0]
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass
    return max(steps)


def last_saved_step(job: Path) -> int:
    return max((int(p.stem) for p in (run_folder(job) / "state").glob("*.pt")), default=0)


def test_random_sigkills_always_resume_and_finish(make_job, tmp_path):
    """Ten kills at random points of a 60-step run, placed by the run's progress, not by the clock.

    Each kill waits until the run logs a random step one to six steps past both its checkpoint and what the killed
    run before it logged, then a random fraction of a step more, so on a machine of any speed the kills land inside
    steps and saves and every run is killed before it ends.
    """
    override = {**OVERRIDE, "train": {**OVERRIDE["train"], "steps": 60}, "save": {"every": 3, "keep": 2}}
    straight = make_job(override, folder=tmp_path / "straight")
    started = time.monotonic()
    assert cli("train", str(straight)).returncode == 0
    step_time = (time.monotonic() - started) / 60  # an upper bound: start-up is counted too
    job = make_job(override, folder=tmp_path / "killed")
    rng = random.Random(1234)
    env = cli_env()
    kills = 0
    errors = tmp_path / "stderr.txt"
    for _attempt in range(40):
        with errors.open("wb") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-m", "zimage_lora.cli", "train", str(job), "--resume", "--no-progress"],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env=env,
            )
        if kills < 10:
            target = min(max(last_saved_step(job), last_logged_step(job)) + rng.randint(1, 6), 48)
            while proc.poll() is None and last_logged_step(job) < target:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.5) * step_time)
            assert proc.poll() is None, f"it ended before step {target}: {errors.read_text()}"
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=300)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, errors.read_text()
        every_top_level_file_loads(job)
    assert proc.returncode == 0 and kills == 10
    assert final_bytes(job) == final_bytes(straight)  # ten kills later, the very same LoRA
    every_top_level_file_loads(job)


def test_out_of_memory_disk_full_and_nan(make_job):
    job = make_job(OVERRIDE)
    oom = cli("train", str(job), fault="oom@step:2")
    assert oom.returncode == 2 and "out of memory" in oom.stderr and "try:" in oom.stderr
    assert "Traceback" not in oom.stderr
    full = cli("train", str(job), "--overwrite", fault="diskfull@save.lora.tmp:4")
    assert full.returncode == 2 and "disk full" in full.stderr and "--resume" in full.stderr
    assert (run_folder(job) / "tiny_000000002.safetensors").is_file()  # the earlier save is intact
    assert not list(run_folder(job).glob("*.tmp"))
    every_top_level_file_loads(job)
    nan = cli("train", str(job), "--overwrite", fault="nan@loss:5")
    assert nan.returncode == 3 and "step 5" in nan.stderr and "learning rate" in nan.stderr
    assert sorted(p.name for p in run_folder(job).glob("*.safetensors")) == [
        "tiny_000000002.safetensors",
        "tiny_000000004.safetensors",
    ]
    every_top_level_file_loads(job)


def test_resume_refuses_changes_that_break_the_run(make_job):
    job = make_job(OVERRIDE)
    assert cli("train", str(job), fault="sigint@step:3").returncode == 0
    for override, key in [
        ("target.rank=8", "target.rank"),
        ("train.lr=0.5", "train.lr"),
        ("datasets.0.resolutions=[96]", "datasets.0.resolutions"),
    ]:
        proc = cli("train", str(job), "--resume", "--set", override)
        assert proc.returncode == 2 and f"--resume: {key}" in proc.stderr, proc.stderr
    accepted = cli("train", str(job), "--resume", "--set", "train.steps=10", "--set", "sample.every=5")
    assert accepted.returncode == 0, accepted.stderr


def test_unwritable_output_folder_is_reported_before_loading(make_job):
    job = make_job()
    (job.parent / "output").write_text("a file where the output folder should be")
    start = time.perf_counter()
    proc = cli("train", str(job))
    assert proc.returncode == 2 and "job.output_dir" in proc.stderr and "Traceback" not in proc.stderr
    assert "zimage-lora 0.1.0: job" not in proc.stderr  # stopped before any model work began
    assert time.perf_counter() - start < 60


# --- config fuzz ------------------------------------------------------------------------------------------------
def malformed_jobs(base: dict) -> list[tuple[str, bytes]]:
    """At least 200 broken job files: wrong types, out-of-range values, unknown keys at every level, bad bytes."""
    rng = random.Random(7)
    cases: list[tuple[str, bytes]] = [
        ("empty", b""),
        ("list", b"- a\n- b\n"),
        ("scalar", b"42\n"),
        ("non-utf8", b"job:\n  name: \xff\xfe\n"),
        ("tabs", b"job:\n\tname: x\n"),
        ("unclosed", b"job: {name: x\n"),
        ("duplicate", b"version: 1\nversion: 1\n"),
        ("binary", bytes(range(256))),
    ]
    bad_values = [None, -1, 0, 10**12, -(10**12), 1e309, "x", "", [], {}, [1, 2], {"a": 1}, True, 3.5, "nan"]
    paths = []

    def walk(node, path):
        if isinstance(node, dict):
            for key, value in node.items():
                paths.append(path + [key])
                walk(value, path + [key])
        elif isinstance(node, list) and node and isinstance(node[0], dict):
            walk(node[0], path + [0])

    walk(base, [])
    for path in paths:
        for value in rng.sample(bad_values, 7):
            cases.append((f"{'.'.join(map(str, path))}={value!r}", _with(base, path, value)))
    containers = [p for p in [[]] + paths if isinstance(_get(base, p), dict)]
    for path in containers:
        cases.append((f"{'.'.join(map(str, path))}.bogus", _with(base, path + ["bogus_key"], 1)))
    return cases


def _get(node, path):
    for key in path:
        node = node[key]
    return node


def _with(base, path, value) -> bytes:
    import copy

    data = copy.deepcopy(base)
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return yaml.safe_dump(data, allow_unicode=True).encode()


def test_config_fuzz_every_malformed_job_is_one_line(make_job, tmp_path):
    base = yaml.safe_load(make_job().read_text())
    cases = malformed_jobs(base)
    assert len(cases) >= 200
    accepted = []
    for name, content in cases:
        path = tmp_path / "fuzz.yaml"
        path.write_bytes(content)
        try:
            load_job(path)
        except ConfigError as e:
            message = str(e)
            assert message and "\n" not in message and "Traceback" not in message, (name, message)
            continue
        accepted.append(name)
    # some "bad" values are legal for some keys: any text is a name, trigger word or folder; 0 or 10^12 is a seed;
    # an empty or null section means its defaults, an empty model means the arch's default; lr 3.5 is silly, not wrong
    legal = (
        "job.name=",
        "job.trigger_word=",
        "job.output_dir=",
        "job.seed=",
        "model.name_or_path=''",
        "target={}",
        "save=None",
        "save={}",
        "train=None",
        "train.lr=3.5",
    )
    assert all(name.startswith(legal) for name in accepted), accepted
    for name, content in cases[:8]:
        path = tmp_path / "cli.yaml"
        path.write_bytes(content)
        proc = cli("train", str(path))
        assert proc.returncode == 2, (name, proc.stderr)
        assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1 and "Traceback" not in proc.stderr


def test_sigterm_from_outside_stops_and_saves(make_job, tmp_path):
    """SIGTERM (a scheduler, the web UI's Stop) while a step is under way: that step finishes, is saved, and the
    trainer exits 0. The trainer is held inside step 2 while the signal arrives, so this holds at any speed."""
    job = make_job({**OVERRIDE, "train": {**OVERRIDE["train"], "steps": 5000}})
    holds = tmp_path / "holds"
    proc = start_held_trainer(job, "wait@step:2", holds)
    try:
        _wait_for(holds / "held-step-2", proc)
        proc.send_signal(signal.SIGTERM)  # handled (a flag) before the held step goes on to its after-step control
        (holds / "release-step-2").touch()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped at step 2," in out
    assert (run_folder(job) / "state" / f"{2:09d}.pt").is_file()
    every_top_level_file_loads(job)


def test_request_files_save_sample_and_stop_a_running_trainer(make_job):
    """The web UI's controls: ``requests/save``, ``requests/sample`` and ``requests/stop`` in the run folder."""
    job = make_job(
        {
            "train": {"steps": 5000, "optimizer": "adamw"},
            "save": {"every": 1000, "keep": 10},
            "sample": {"every": 1000, "steps": 2, "prompts": ["a fox"]},
        }
    )
    run = run_folder(job)
    (run / "requests").mkdir(parents=True)
    stale = run / "requests" / "stop"
    stale.touch()  # left from an earlier run (a minute before this one starts): must not stop this one
    os.utime(stale, (time.time() - 60, time.time() - 60))
    proc = subprocess.Popen(
        [sys.executable, "-m", "zimage_lora.cli", "train", str(job), "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("latents:"):
            (run / "requests" / "save").touch()
            (run / "requests" / "sample").touch()
            (run / "requests" / "bogus").touch()
        if line.startswith("request: sample"):
            (run / "requests" / "stop").touch()
        if line.startswith("request: stop"):
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, "".join(seen) + err
    saved_at = int(next(line for line in seen if line.startswith("request: save")).split("step ")[1])
    stopped_at = int(out.split("stopped at step ")[1].split(",")[0])
    assert 0 < saved_at < stopped_at < 5000
    assert (run / f"tiny_{saved_at:09d}.safetensors").is_file()  # not a multiple of save.every: the request did it
    assert (run / "samples" / f"{saved_at:09d}_00.png").is_file()
    assert (run / "state" / f"{stopped_at:09d}.pt").is_file()
    assert not any((run / "requests").iterdir())  # every request, the unknown one too, was taken
    log = (run / "train.log").read_text()
    assert "stale request dropped: stop, made at " in log and "request: stop at step" in log


def start_held_trainer(job: Path, faults: str, holds: Path, *args: str) -> subprocess.Popen:
    """``zimage-lora train JOB`` in its own process, held at the ``wait`` faults named (files in ``holds``)."""
    holds.mkdir(exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "zimage_lora.cli", "train", str(job), "--no-progress", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**cli_env(faults), "ZIMAGE_LORA_FAULT_DIR": str(holds)},
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the trainer ended (exit {proc.returncode}) before {path.name}"
        assert time.monotonic() < deadline, f"no {path.name} after {timeout} s"
        time.sleep(0.05)


def test_requests_made_while_loading_act_at_the_first_step_and_late_ones_are_answered(make_job, tmp_path):
    """The web UI's Start runs ``train --overwrite``; a click on Save now or Sample now while the trainer still
    loads must act at the first step (nothing clears it), and one that comes after the last step is answered in the
    log with the final LoRA, and leaves nothing behind. The trainer is held at both moments (the ``wait`` fault),
    so the test does not depend on how fast this machine trains."""
    job = make_job({"train": {"steps": 3}, "sample": {"every": 1000, "steps": 2, "prompts": ["a fox"]}})
    run = run_folder(job)
    holds = tmp_path / "holds"
    proc = start_held_trainer(job, "wait@setup,wait@finished", holds, "--overwrite")
    try:
        _wait_for(holds / "held-setup", proc)
        (run / "requests").mkdir(parents=True, exist_ok=True)
        (run / "requests" / "save").touch()
        (run / "requests" / "sample").touch()
        (holds / "release-setup").touch()
        _wait_for(holds / "held-finished", proc)
        assert (run / "tiny.safetensors").is_file()  # the run is over, the process not yet
        (run / "requests" / "save").touch()
        (run / "requests" / "stop").touch()
        (holds / "release-finished").touch()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    log = (run / "train.log").read_text()
    assert "request: sample at step 1" in log and "request: save at step 1" in log
    assert (run / "tiny_000000001.safetensors").is_file() and (run / "samples" / "000000001_00.png").is_file()
    for action in ("save", "stop"):
        assert f"request: {action} after the last step: the run has finished; its final LoRA is {run}" in log
    assert not any((run / "requests").iterdir())  # nothing is left to fire on a later --resume
    assert "stale request" not in log


def _folder_digest(folder: Path) -> dict[str, str]:
    """Every file of a run folder, with a hash of its bytes."""
    import hashlib

    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_resume_writes_the_final_files_a_kill_left_out_and_then_has_nothing_to_do(make_job, tmp_path):
    """Killed after the last state was saved but before the final files: --resume writes them (the final LoRA,
    the last previews, the contact sheet, README.md, run.json) without taking a step again. Resumed again (scripts
    on pre-emptible machines re-run --resume blindly), the finished run exits 0, says so, and changes no file."""
    job_override = {**OVERRIDE, "sample": {"every": 1000, "steps": 2, "prompts": ["a fox", "a red car"]}}
    straight = make_job(job_override, folder=tmp_path / "straight")
    assert cli("train", str(straight)).returncode == 0
    job = make_job(job_override, folder=tmp_path / "killed")
    killed = cli("train", str(job), fault=f"kill@save.state.renamed:{STEPS}")  # the final save's state
    assert killed.returncode == -signal.SIGKILL
    run = run_folder(job)
    assert (run / "state" / f"{STEPS:09d}.pt").is_file() and not (run / "README.md").exists()
    assert json.loads((run / "run.json").read_text())["status"] == "running"
    resumed = cli("train", str(job), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert final_bytes(job) == final_bytes(straight)
    assert json.loads((run / "run.json").read_text())["status"] == "done" and (run / "README.md").is_file()
    for name in (f"{STEPS:09d}_00.png", f"{STEPS:09d}_01.png"):
        assert (run / "samples" / name).read_bytes() == (run_folder(straight) / "samples" / name).read_bytes()
    assert (run / "samples" / "contact_sheet.png").is_file()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # no step taken twice

    before = _folder_digest(run)
    again = cli("train", str(job), "--resume")
    assert again.returncode == 0, again.stderr
    assert "the run is complete" in again.stdout and str(run / "tiny.safetensors") in again.stdout
    assert _folder_digest(run) == before  # (asked for more steps, it goes on: test_resume_continues_to_the_same_lora)
