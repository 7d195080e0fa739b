"""The queue and the runner: trainers, comparisons, playground generations and captioning runs, each holding a set of
devices while it runs.

Jobs, comparisons, generations and captioning runs wait as ``queued`` rows in the database. Each row names the
devices it will hold (its ``device`` column: the sorted names joined by commas, e.g. ``cuda:0,cuda:1``; a row of an
older UI holds the one name it has). A background thread (``Runner.run``) looks every half second (and at once when
the API pokes it): it finishes the processes that have ended, then goes through the queued items oldest first and
starts each one whose devices nothing holds. That is the device lock, the same rule for every kind of item: items
whose sets do not overlap run at the same time; an item that shares a device with a running item waits. A waiting
item keeps its place: the devices it waits for count as taken for every item queued after it, so a later item never
overtakes an older one that shares a device with it (a two-GPU job is not starved by a stream of one-GPU
generations), while a later item on other devices starts at once. Each item runs as its own ``python -m
zimage_lora.cli train|compare|generate|caption`` process in a new session, with stdout and stderr in a log file, so
the UI can exit or crash without stopping it. A comparison (``zimage-lora compare``: its job trained once per value
of one setting) holds its job's devices, and runs on a snapshot of the job file taken when it was created, in
DATA/comparisons/<id>. A captioning run (``zimage-lora caption --dry-run``: a captioning model's proposal per image
of a dataset) holds the device it captions on and writes only its own folder, DATA/captions/<id> (proposals.json,
ui-process.log): the dataset's captions change only when the user accepts proposals (the server writes those).

The machine's devices are ``cpu`` and one ``cuda:N`` per GPU (``machine_devices``); an item that names a device
the machine lacks is refused when it is queued, in one sentence that names the device and the machine's devices.

The database keeps each process's pid and its start time from /proc/<pid>/stat: a restarted UI re-attaches to a
process only when both match (a reused pid is never mistaken for the trainer). A trainer that has ended is ``done``
or ``stopped`` as its run.json says (when run.json was written by that very process and it did not exit with an
error), ``stopped`` when the user asked it to stop, else ``failed`` with its last log lines as the error; a
comparison the same way by its compare.json; a captioning run is ``done`` when its process exited cleanly and left
proposals.json (written atomically, last), else ``stopped`` or ``failed`` the same way.

Every change of status goes through this module, under ``Runner.lock``, so an API call never races the thread.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from zimage_lora.errors import UserError
from zimage_lora.models.devices import device_name
from zimage_lora.ui import runs
from zimage_lora.ui.db import Store, now
from zimage_lora.ui.security import ApiError

log = logging.getLogger(__name__)

ACTIVE = ("running", "stopping")
ERROR_LINES = 12
PROPOSALS = "proposals.json"  # what a captioning run leaves in DATA/captions/<id>
PREFIXES = {"jobs": "job", "comparisons": "cmp", "generations": "gen", "captions": "cap"}  # process keys: "cap:<id>"


# --- processes ------------------------------------------------------------------------------------------------------


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat); None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name in (...) may hold spaces
    if fields[0] in ("Z", "X"):  # a zombie has exited already
        return None
    return int(fields[19])


def alive(pid: int | None, pid_start: int | None) -> bool:
    return pid is not None and pid_start is not None and start_time(pid) == pid_start


DEVICES_ENV = "ZIMAGE_LORA_UI_DEVICES"  # tests only: replaces the machine's devices (e.g. cpu,cuda:0,cuda:1)


@functools.cache
def _gpus() -> int:
    from zimage_lora.models.devices import cuda_count

    return cuda_count()


def machine_devices() -> list[str]:
    """The devices this machine has, as the UI offers and locks them: ``cpu``, then ``cuda:0`` to ``cuda:N-1``.

    ``ZIMAGE_LORA_UI_DEVICES`` (comma-separated names) replaces them, so that tests can queue jobs on GPUs the test
    machine lacks; only the UI reads it, the trainer always asks torch."""
    listed = os.environ.get(DEVICES_ENV, "").strip()
    if listed:
        return [name.strip().lower() for name in listed.split(",") if name.strip()]
    return ["cpu", *(f"cuda:{index}" for index in range(_gpus()))]


def _device_order(name: str) -> tuple[bool, int]:
    return name != "cpu", int(name.partition(":")[2] or 0)


def device_set(spec: str | list[str], field: str) -> list[str]:
    """The devices a queue item will hold, sorted and each once, resolved as the trainer resolves them
    (``device_name``: ``auto`` is the first GPU, or the CPU without one); ApiError 422 on ``field`` for a device this
    machine lacks."""
    machine = machine_devices()
    gpus = sum(name.startswith("cuda:") for name in machine)
    held = set()
    for one in [spec] if isinstance(spec, str) else spec:
        try:
            name = device_name(one, gpus)
        except UserError:
            name = None
        if name not in machine:
            raise ApiError(
                422, f"{field}: {one} is not on this machine (it has {', '.join(machine)}); choose one of those", field
            )
        held.add(name)
    return sorted(held, key=_device_order)


def holds(row: dict[str, Any]) -> set[str]:
    """The devices a queue row holds: its ``device`` column split at the commas (one name in an older UI's row)."""
    return set(filter(None, (row["device"] or "").split(",")))


def _spawn(args: list[str], log_file: Path, append: bool) -> tuple[subprocess.Popen, int | None]:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # HF_HUB_OFFLINE, HF_TOKEN and the like pass through
    with open(log_file, "ab" if append else "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "zimage_lora.cli", *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=log_file.parent,
            env=env,
            start_new_session=True,
        )
    return proc, start_time(proc.pid)


def _last_lines(path: Path) -> str:
    return "\n".join(line for line in runs.log_tail(path, ERROR_LINES * 3) if line.strip())[-4000:]


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b: .+")


def error_headline(lines: list[str]) -> str | None:
    """The line of a process's output that says what went wrong: the last ``error: ...`` line the CLI printed (a
    user mistake, in one sentence), else the last ``SomethingError: ...`` line of a traceback."""
    for pattern in (re.compile(r"^error: (.+)"), _EXCEPTION_LINE):
        for line in reversed(lines):
            found = pattern.match(line.strip())
            if found:
                return found.group(1) if found.re is not _EXCEPTION_LINE else found.group(0)
    return None


def failure(what: str, code: int | None, log_file: Path) -> str:
    """The error of a process that ended before finishing: the line that says why first, on its own line, then
    how it ended and its last log lines (the UI shows the first line as the headline and the rest below it)."""
    how = f"exit code {code}" if code is not None else "it was gone when the UI looked"
    tail = _last_lines(log_file)
    ended = f"{what} ended before finishing ({how}); its last log lines:\n{tail}"
    headline = error_headline(tail.splitlines())
    return f"{headline}\n{ended}" if headline else ended


# --- the runner -----------------------------------------------------------------------------------------------------


class Runner:
    def __init__(self, data: Path, store: Store, poll_s: float = 0.5):
        self.data, self.store, self.poll_s = data, store, poll_s
        self.lock = threading.RLock()
        self.procs: dict[str, subprocess.Popen] = {}  # processes this UI started, by key: "job:<name>", "cmp:<id>", ...
        self.forced: set[str] = set()  # the same keys, of items killed by a force stop until their end is recorded
        self.wake = threading.Event()
        self.closing = threading.Event()
        self.thread: threading.Thread | None = None

    def job_dir(self, name: str) -> Path:
        return self.data / "jobs" / name

    def gen_dir(self, gen_id: str) -> Path:
        return self.data / "generations" / gen_id

    def cmp_dir(self, cmp_id: str) -> Path:
        return self.data / "comparisons" / cmp_id

    def cap_dir(self, cap_id: str) -> Path:
        return self.data / "captions" / cap_id

    # --- the thread ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="zimage-lora-runner", daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop watching; the processes go on (a later UI re-attaches to them)."""
        self.closing.set()
        self.wake.set()
        if self.thread is not None:
            self.thread.join(timeout=10)

    def poke(self) -> None:
        self.wake.set()

    def run(self) -> None:
        while not self.closing.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the runner must outlive any one bad row
                log.exception("runner: tick failed")
            self.wake.wait(self.poll_s)
            self.wake.clear()

    def tick(self) -> None:
        with self.lock:
            for row in self.store.select("jobs", "status IN ('running', 'stopping')"):
                ended, code = self._ended(f"job:{row['name']}", row)
                if ended:
                    self._finish_job(row, code)
            for row in self.store.select("comparisons", "status IN ('running', 'stopping')"):
                ended, code = self._ended(f"cmp:{row['id']}", row)
                if ended:
                    self._finish_comparison(row, code)
            for row in self.store.select("generations", "status = 'running'"):
                ended, code = self._ended(f"gen:{row['id']}", row)
                if ended:
                    self._finish_generation(row, code)
            for row in self.store.select("captions", "status IN ('running', 'stopping')"):
                ended, code = self._ended(f"cap:{row['id']}", row)
                if ended:
                    self._finish_caption(row, code)
            self._launch_queued()

    def _ended(self, key: str, row: dict[str, Any]) -> tuple[bool, int | None]:
        """(has the process ended, its exit code when this UI started it)."""
        proc = self.procs.get(key)
        if proc is not None:
            code = proc.poll()
            if code is None:
                return False, None
            del self.procs[key]
            return True, code
        return not alive(row["pid"], row["pid_start"]), None

    def _launch_queued(self) -> None:
        running = self.store.select("jobs", "status IN ('running', 'stopping')")
        running += self.store.select("comparisons", "status IN ('running', 'stopping')")
        running += self.store.select("generations", "status = 'running'")
        running += self.store.select("captions", "status IN ('running', 'stopping')")
        taken = set().union(*map(holds, running))
        launch = {
            "jobs": self._launch_job,
            "comparisons": self._launch_comparison,
            "generations": self._launch_generation,
            "captions": self._launch_caption,
        }
        waiting = [(table, row) for table in launch for row in self.store.select(table, "status = 'queued'")]
        for table, row in sorted(waiting, key=lambda item: item[1]["queued"]):
            wanted = holds(row)
            free = not wanted & taken
            taken |= wanted  # started, or waiting in its place: no later item may take these devices first
            if not free:
                continue
            try:
                launch[table](row)
            except OSError as e:
                key = row["name"] if table == "jobs" else row["id"]
                self.store.update(table, key, status="failed", error=f"could not start the process: {e}")

    def _running(self, table: str, key: str, proc: subprocess.Popen, pid_start: int | None) -> None:
        """Record a job, comparison or captioning process as running (its key in ``procs``: ``job:<name>``...)."""
        self.procs[f"{PREFIXES[table]}:{key}"] = proc
        self.store.update(
            table,
            key,
            status="running",
            pid=proc.pid,
            pid_start=pid_start,
            exit_code=None,
            error=None,
            started=now(),
            finished=None,
        )

    def _verdict(
        self, key: str, row: dict[str, Any], code: int | None, facts: dict[str, Any], log_file: Path
    ) -> tuple[str, str | None]:
        """(status, error) of an ended trainer or comparison: what its own run.json / compare.json says when that
        very process wrote it and exited cleanly, ``stopped`` when the user stopped it, else ``failed`` with its last
        log lines. A process of ours that exits 0 without writing the file found the work complete already (a
        --resume of a finished run), and then the file is still right."""
        own = facts.get("pid") == row["pid"] or (code == 0 and facts.get("status") == "done")
        verdict = facts.get("status") if own and code in (None, 0) else None
        forced = key in self.forced
        self.forced.discard(key)
        if verdict in ("done", "stopped"):
            return verdict, None
        if forced:
            return "stopped", (
                "force-stopped: the steps since the last checkpoint were not saved (resume continues from it)"
            )
        if row["status"] == "stopping":
            return "stopped", None  # stopped before training began: there is nothing to resume, start it again
        return "failed", failure("the trainer" if key.startswith("job:") else "the comparison", code, log_file)

    # --- jobs ---------------------------------------------------------------------------------------------------
    def _launch_job(self, row: dict[str, Any]) -> None:
        name, resume = row["name"], row["mode"] == "resume"
        folder = self.job_dir(name)
        args = ["train", str(folder / "job.yaml"), "--no-progress", "--resume" if resume else "--overwrite"]
        proc, pid_start = _spawn(args, folder / "ui-process.log", append=resume)
        self._running("jobs", name, proc, pid_start)

    def _finish_job(self, row: dict[str, Any], code: int | None) -> None:
        folder = self.job_dir(row["name"])
        facts = runs.read_json(folder / "run.json")
        status, error = self._verdict(f"job:{row['name']}", row, code, facts, runs.log_path(folder))
        self.store.update("jobs", row["name"], status=status, exit_code=code, error=error, finished=now())

    def queue_job(self, name: str, resume: bool) -> None:
        with self.lock:
            row = self._job(name)
            if row["status"] in ("queued", *ACTIVE):
                raise ApiError(409, f"job {name!r} is already {row['status']}; stop it first", "name")
            devices = device_set(row["config"]["job"]["device"], "job.device")
            self._enqueue("jobs", name, row, devices, "resume" if resume else "start")
        self.poke()

    def _insert_queued(self, table: str, devices: list[str], **fields: Any) -> None:
        """A new comparison, generation or captioning run at the back of the queue (under ``self.lock``), holding
        ``devices``."""
        self.store.insert(table, status="queued", device=",".join(devices), created=now(), queued=time.time(), **fields)

    def _enqueue(self, table: str, key: str, row: dict[str, Any], devices: list[str], mode: str) -> None:
        """Queue a job or a comparison again (under ``self.lock``), remembering its status to go back to."""
        self.store.update(
            table,
            key,
            status="queued",
            prev_status=row["status"],
            mode=mode,
            device=",".join(devices),
            queued=time.time(),
            error=None,
        )

    def stop_job(self, name: str, force: bool = False) -> None:
        """Stop a job: a queued one leaves the queue, a running one saves and ends after its step (SIGTERM).

        ``force`` (for a trainer that does not come back, e.g. a step stuck on a hung device) kills its whole
        process group at once: files are written atomically, so every saved checkpoint stays whole, and the steps
        since the last one are lost."""
        with self.lock:
            self._stop("jobs", self._job(name), force, f"job {name!r}", unqueued="draft")
        self.poke()

    def _stop(self, table: str, row: dict[str, Any], force: bool, what: str, unqueued: str) -> None:
        """Stop a job, a comparison or a captioning run (under ``self.lock``); a queued one goes back to its status
        before it was queued (``unqueued`` when it had none)."""
        key = row["name"] if table == "jobs" else row["id"]
        if force and row["status"] in ACTIVE:
            if alive(row["pid"], row["pid_start"]):
                self.forced.add(f"{PREFIXES[table]}:{key}")
                from zimage_lora.training.launch import kill_tree

                # a job on several GPUs: the launcher and its processes run in sessions of their own
                kill_tree(row["pid"], signal.SIGKILL)
                os.killpg(row["pid"], signal.SIGKILL)  # its own session: the trainer and any child
            self.store.update(table, key, status="stopping")
        elif row["status"] == "queued":
            self.store.update(table, key, status=row["prev_status"] or unqueued, queued=None)
        elif row["status"] == "running":
            if alive(row["pid"], row["pid_start"]):
                # Training: the trainer finishes its step, saves and exits 0 (SIGTERM acts as Ctrl-C does).
                # Still loading: the default action ends it at once, quietly; there is nothing to save yet.
                # Captioning: it ends at once; a dry run has written nothing anywhere but its own folder.
                os.kill(row["pid"], signal.SIGTERM)
            self.store.update(table, key, status="stopping")
        elif row["status"] != "stopping":
            raise ApiError(409, f"{what} is {row['status']}, not running; there is nothing to stop")

    def request(self, name: str, action: str) -> None:
        """Ask the running trainer to save or sample after its current step (a file in requests/)."""
        from zimage_lora.training.run_folder import RunFolder

        with self.lock:
            row = self._job(name)
            run = RunFolder(self.job_dir(name), name)
            facts = runs.read_json(run.root / "run.json")
            # done, or running but past its final files (that very process wrote "done"): the run is over
            finished = row["status"] == "done" or (
                row["status"] == "running" and facts.get("pid") == row["pid"] and facts.get("status") == "done"
            )
            if finished:
                raise ApiError(
                    409,
                    f"job {name!r} has finished: nothing to {action} any more; its final LoRA is "
                    f"jobs/{name}/{run.final_path.name}",
                )
            if row["status"] != "running":
                raise ApiError(409, f"job {name!r} is {row['status']}, not running; start it first")
            run.request(action)

    def _job(self, name: str) -> dict[str, Any]:
        row = self.store.get("jobs", name)
        if row is None:
            raise ApiError(404, f"no job named {name!r}; see GET /api/jobs", "name")
        return row

    # --- comparisons --------------------------------------------------------------------------------------------
    def add_comparison(self, cmp_id: str, job: str, setting: str, values: list[Any], varies: list[str]) -> None:
        """Queue a new comparison of ``job`` (its folder holds the job file's snapshot already): it holds the job's
        devices (ApiError 422 on ``job.device`` for one the machine lacks)."""
        with self.lock:
            devices = device_set(self._job(job)["config"]["job"]["device"], "job.device")
            self._insert_queued(
                "comparisons", devices, id=cmp_id, job=job, setting=setting, vals=values, varies=varies, mode="start"
            )
        self.poke()

    def resume_comparison(self, cmp_id: str) -> None:
        """Queue a stopped or failed comparison again: ``--resume`` keeps the variants that finished and continues
        the stopped one from its checkpoint (a comparison that never began starts afresh)."""
        with self.lock:
            row = self._comparison(cmp_id)
            if row["status"] in ("queued", *ACTIVE):
                raise ApiError(409, f"comparison {cmp_id!r} is already {row['status']}; stop it first")
            devices = device_set(sorted(holds(row), key=_device_order), "job.device")  # the machine may have changed
            began = (self.cmp_dir(cmp_id) / "compare.json").is_file()
            self._enqueue("comparisons", cmp_id, row, devices, "resume" if began else "start")
        self.poke()

    def stop_comparison(self, cmp_id: str, force: bool = False) -> None:
        """As ``stop_job``: the variant in training saves after its step and the comparison ends ``stopped``."""
        with self.lock:
            self._stop("comparisons", self._comparison(cmp_id), force, f"comparison {cmp_id!r}", unqueued="stopped")
        self.poke()

    def _launch_comparison(self, row: dict[str, Any]) -> None:
        folder, resume = self.cmp_dir(row["id"]), row["mode"] == "resume"
        varies = [arg for vary in row["varies"] for arg in ("--vary", vary)]
        args = ["compare", str(folder / "job.yaml"), *varies, "--folder", str(folder), "--no-progress"]
        proc, pid_start = _spawn([*args, "--resume" if resume else "--overwrite"], folder / "ui-process.log", resume)
        self._running("comparisons", row["id"], proc, pid_start)

    def _finish_comparison(self, row: dict[str, Any], code: int | None) -> None:
        folder = self.cmp_dir(row["id"])
        facts = runs.read_json(folder / "compare.json")
        status, error = self._verdict(f"cmp:{row['id']}", row, code, facts, folder / "ui-process.log")
        self.store.update("comparisons", row["id"], status=status, exit_code=code, error=error, finished=now())

    def _comparison(self, cmp_id: str) -> dict[str, Any]:
        row = self.store.get("comparisons", cmp_id)
        if row is None:
            raise ApiError(404, f"no comparison {cmp_id!r}; see GET /api/comparisons", "id")
        return row

    # --- generations --------------------------------------------------------------------------------------------
    def queue_generation(self, gen_id: str, request: dict[str, Any], args: list[str]) -> str:
        """Queue ``request`` as generation ``gen_id`` and answer that id; when an identical request (the same
        fields) is still queued or running, answer its id instead and queue nothing: a double click makes one."""
        devices = device_set(request["device"], "device")
        with self.lock:
            for row in self.store.select("generations", "status IN ('queued', 'running')"):
                if {key: value for key, value in row["request"].items() if key != "args"} == request:
                    return row["id"]
            self._insert_queued("generations", devices, id=gen_id, request={**request, "args": args})
        self.poke()
        return gen_id

    def _launch_generation(self, row: dict[str, Any]) -> None:
        folder = self.gen_dir(row["id"])
        proc, pid_start = _spawn([*row["request"]["args"], "--out", str(folder)], folder / "gen.log", append=False)
        self.procs[f"gen:{row['id']}"] = proc
        self.store.update("generations", row["id"], status="running", pid=proc.pid, pid_start=pid_start, started=now())

    def _finish_generation(self, row: dict[str, Any], code: int | None) -> None:
        folder = self.gen_dir(row["id"])
        made = any(folder.glob("*.png"))
        ok = made and code in (None, 0)
        error = None if ok else failure("the generation", code, folder / "gen.log")
        self.store.update(
            "generations", row["id"], status="done" if ok else "failed", exit_code=code, error=error, finished=now()
        )

    # --- captioning runs ----------------------------------------------------------------------------------------
    def queue_caption(self, cap_id: str, dataset: str, options: dict[str, Any], args: list[str]) -> None:
        """Queue a captioning run of ``dataset``: ``args`` are its ``caption`` options (model, mode, trigger, ...),
        ``options`` the request as the UI shows it; it holds ``options["device"]`` (ApiError 422 on ``device`` for
        one the machine lacks)."""
        devices = device_set(options["device"], "device")
        with self.lock:
            options = {**options, "args": args}
            self._insert_queued("captions", devices, id=cap_id, dataset=dataset, options=options, mode="start")
        self.poke()

    def stop_caption(self, cap_id: str) -> None:
        """A queued run leaves the queue (``stopped``); a running one gets SIGTERM and ends at once."""
        with self.lock:
            self._stop("captions", self._caption(cap_id), False, f"captioning run {cap_id!r}", unqueued="stopped")
        self.poke()

    def _launch_caption(self, row: dict[str, Any]) -> None:
        folder = self.cap_dir(row["id"])
        dataset = self.data / "datasets" / row["dataset"]
        (folder / PROPOSALS).unlink(missing_ok=True)
        args = ["caption", str(dataset), "--dry-run", "--json", str(folder / PROPOSALS), *row["options"]["args"]]
        proc, pid_start = _spawn([*args, "--device", row["device"]], folder / "ui-process.log", append=False)
        self._running("captions", row["id"], proc, pid_start)

    def _finish_caption(self, row: dict[str, Any], code: int | None) -> None:
        folder = self.cap_dir(row["id"])
        status, error = "done", None
        if code not in (None, 0) or not (folder / PROPOSALS).is_file():
            status = "stopped" if row["status"] == "stopping" else "failed"
        if status == "failed":
            error = failure("the captioner", code, folder / "ui-process.log")
        self.store.update("captions", row["id"], status=status, exit_code=code, error=error, finished=now())

    def _caption(self, cap_id: str) -> dict[str, Any]:
        row = self.store.get("captions", cap_id)
        if row is None:
            raise ApiError(404, f"no captioning run {cap_id!r}; see GET /api/datasets/<name>/captions", "id")
        return row
