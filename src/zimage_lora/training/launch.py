"""``zimage-lora train`` on several processes: the command line that starts accelerate, and what the starter does
with Ctrl-C and SIGTERM.

``--num-processes N`` (CPU processes, or N GPUs), ``--gpus 0,1,2,3`` or a list in ``job.device`` start
``accelerate launch --multi_gpu`` (on the CPU too: ``accelerate launch --cpu`` would start a single process) with
this same command inside (accelerate's own code, through ``main`` below, which only turns the launcher's tracebacks
for a Ctrl-C or a failed process into one line); each process then runs the recipe, and
``training/distributed.py`` says who does what.
Plain ``accelerate launch`` and ``torchrun`` of ``zimage_lora.cli train`` work the same way: a process that a
launcher started (``WORLD_SIZE`` is set) trains and never launches again.

The launcher runs in its own session, so a Ctrl-C in the terminal reaches only this starter. Once training has
begun, it turns Ctrl-C or SIGTERM into a stop request in the run folder (what the web UI writes): the main process
reads it after the current step, all processes agree on that step (``Processes.union``), save once and exit 0, with
no deadline (accelerate's agent, told of a signal, would kill them 30 seconds later, maybe amid a preview round).
While they are still loading there is nothing to save: the signal goes to the agent, which ends them. A second
Ctrl-C kills them at once (every write is atomic: nothing saved is damaged). If this starter dies, the kernel sends
the launcher SIGTERM (Linux), which ends the processes the same way.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from zimage_lora.errors import UserError

PR_SET_PDEATHSIG = 1


def launched_by_launcher() -> bool:
    """True inside a process that accelerate or torchrun started (it trains; it never launches again)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def parse_gpus(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--gpus {text!r}: give GPU numbers separated by commas, e.g. --gpus 0,1,2,3") from None
    if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
        raise UserError(f"--gpus {text!r}: give each GPU number once, e.g. --gpus 0,1,2,3")
    return ids


def plan(device, num_processes: int | None, gpus: str | None) -> tuple[int, list[int] | None]:
    """(processes, GPU ids or None for CPU processes / accelerate's choice) from the job's device and the options."""
    if gpus is not None and num_processes is not None:
        raise UserError("--gpus and --num-processes exclude each other: --gpus 0,1 already says two processes")
    if gpus is not None:
        if device == "cpu":
            raise UserError("--gpus: the job's device is cpu; use --num-processes N for CPU processes")
        ids = parse_gpus(gpus)
        return len(ids), ids
    if isinstance(device, list):
        ids = [int(d.partition(":")[2] or 0) for d in device]
        if num_processes is not None and num_processes != len(ids):
            raise UserError(
                f"--num-processes {num_processes}: job.device lists {len(ids)} GPUs; drop the option or change the list"
            )
        return len(ids), ids
    if num_processes is not None and num_processes < 1:
        raise UserError("--num-processes: give 1 or more")
    if num_processes and num_processes > 1 and device not in ("cpu", "auto", "cuda"):
        raise UserError(
            f"--num-processes {num_processes}: job.device is {device}, a single GPU; set job.device to a list of "
            "GPUs or use --gpus"
        )
    return (num_processes or 1), None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_command(processes: int, gpu_ids: list[int] | None, train_args: list[str], port: int) -> list[str]:
    """accelerate's launcher with one process per device, each running ``zimage-lora train`` with ``train_args``."""
    command = [sys.executable, "-m", "zimage_lora.training.launch", "--multi_gpu", "--num_processes", str(processes)]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
    if gpu_ids is not None:
        command += ["--gpu_ids", ",".join(str(i) for i in gpu_ids)]
    return [*command, "-m", "zimage_lora.cli", "train", *train_args]


def _die_with_parent() -> None:  # runs in the launcher between fork and exec
    os.setsid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the launcher outlives a killed starter
        pass


def descendants(pid: int) -> list[int]:
    """The process ids below ``pid`` (children, theirs, ...), from /proc; empty where there is no /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to ``pid`` and every process below it (the launcher's workers run in sessions of their own)."""
    for target in [pid, *descendants(pid)]:
        try:
            os.kill(target, sig)
        except ProcessLookupError:
            pass


def run_launcher(command: list[str], run_root: Path) -> int:
    """Start the launcher and wait for it; Ctrl-C and SIGTERM are passed on once (the processes save and stop), a
    second Ctrl-C kills them. Returns the exit code of ``zimage-lora train``: 0 when the run ended or stopped saved."""
    proc = subprocess.Popen(command, preexec_fn=_die_with_parent)  # noqa: PLW1509 - setsid and prctl only
    signals: list[int] = []

    def forward(signum, frame) -> None:
        signals.append(signum)
        if signum == signal.SIGINT and signals.count(signal.SIGINT) > 1:
            print("Ctrl-C again: stopping every process at once", file=sys.stderr, flush=True)
            kill_tree(proc.pid, signal.SIGKILL)
        elif (run_root / "metrics.jsonl").is_file():  # training: stop after this step, saved
            from zimage_lora.training.run_folder import RunFolder

            RunFolder(run_root, run_root.name).request("stop")
            name = signal.Signals(signum).name
            print(f"{name}: every process finishes this step, then saves and stops (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)  # fmt: skip
        else:  # still loading, nothing to save: the agent ends the processes
            try:
                os.kill(proc.pid, signum)
            except ProcessLookupError:
                pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()  # a signal runs ``forward`` and the wait goes on
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    status = _run_status(run_root)
    if signals.count(signal.SIGINT) > 1:
        return 130
    if signals and status == "stopped":
        return 0
    return 0 if code == 0 else (code if 0 < code < 128 else 1)


def _run_status(root: Path) -> str | None:
    try:
        return json.loads((root / "run.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> None:
    """``accelerate launch`` with its arguments; a Ctrl-C or a failed process ends in one line, not the launcher's
    traceback (each process has already said what went wrong)."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except SignalException as e:
        sys.exit(128 + int(e.sigval))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        print(f"process {rank} ended with {how}; the others were stopped", file=sys.stderr, flush=True)
        sys.exit(failure.exitcode if 0 < failure.exitcode < 128 else 1)


if __name__ == "__main__":
    main()
