"""The after-step control point: after every optimizer step, one place decides what happens before the next one.

It gathers what can ask for something: the job's schedules (``save.every``, ``sample.every``, validation), requests
from outside (files in the run folder's ``requests/``, written by the web UI or by ``touch``), Ctrl-C and SIGTERM,
and the fault-injection points of the tests (``zimage_lora.faults``). It answers with what to do now: validate,
save, sample, stop.

No request is ever lost or left behind:
- a request made while the trainer was still loading (after this process started) acts at the first step; one
  older than the process is stale (an earlier run's) and is logged as dropped;
- a request at the last step is answered (the final LoRA and previews are written anyway), and one that arrives
  while the final files are written is answered after them, naming the final LoRA.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from zimage_lora import faults

# A request file this much older than the process start is an earlier run's: the start time is known to about 10 ms
# and a file's modification time lags the clock by up to a kernel tick (4 ms at 250 Hz).
STALE_MARGIN_S = 0.1
_IMPORTED_AT = time.time()


def process_started_at() -> float:
    """When this process started (Unix time), so that a request made while it was still importing counts."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):  # not Linux: when this module was imported, early in the process
        return _IMPORTED_AT


@dataclass(frozen=True)
class Todo:
    """What to do after a step, in this order: validate, (log), save, stop or sample."""

    validate: bool = False
    save: bool = False
    sample: bool = False
    stop: bool = False


class StepControl:
    """Schedules, requests, signals and fault points, consulted once after each step (``after_step``)."""

    def __init__(self, cfg, run, log, started_at: float, reads_requests: bool = True):
        self.cfg, self.run, self.log, self.started_at = cfg, run, log, started_at
        self.reads_requests = reads_requests  # with several processes only the main one takes request files
        self.stop_requested = False
        self._previous: dict = {}

    # --- signals --------------------------------------------------------------------------------------------------
    def __enter__(self) -> StepControl:
        """Ctrl-C or SIGTERM: finish the current step, save, stop (exit 0). A second Ctrl-C stops at once (exit
        130); every write is atomic, so even that leaves no damaged file."""
        if threading.current_thread() is threading.main_thread():  # signals reach only the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        if self.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.stop_requested = True
        self.log(
            f"{signal.Signals(signum).name}: finishing this step, then saving and stopping "
            "(Ctrl-C again to stop at once)"
        )

    # --- requests -------------------------------------------------------------------------------------------------
    def drop_stale_requests(self) -> None:
        """Requests written before this process started belong to an earlier run: remove them, saying so."""
        for action, made in self.run.pending_requests():
            if made < self.started_at - STALE_MARGIN_S:
                self.run.remove_request(action)
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(made))
                self.log(f"stale request dropped: {action}, made at {when} before this run started (ask again)")

    # --- after each step ----------------------------------------------------------------------------------------
    def after_step(self, step: int) -> Todo:
        faults.fire("step", step)
        asked = self.run.take_requests() if self.reads_requests else set()
        last = step == self.cfg.train.steps
        for action in sorted(asked):
            self.log(f"request: {action} at step {step}" + (f" ({_AT_THE_END[action]})" if last else ""))
        if "stop" in asked:
            self.stop_requested = True
        if last:  # the final previews now (the run's last line carries their scores); the final save follows
            return Todo(validate=self._validation_due(step), sample=self.cfg.sample.active)
        stop = self.stop_requested
        save = step % self.cfg.save.every == 0 or "save" in asked or stop
        preview = self.cfg.sample
        scheduled = step % preview.every == 0 and step >= preview.start_step
        sample = preview.active and (scheduled or "sample" in asked)
        return Todo(validate=self._validation_due(step), save=save, sample=sample and not stop, stop=stop)

    def answer_late_requests(self, final_lora: Path) -> None:
        """Requests that came while the final files were written: the run is over, say where its LoRA is."""
        for action in sorted(self.run.take_requests() if self.reads_requests else ()):
            self.log(f"request: {action} after the last step: the run has finished; its final LoRA is {final_lora}")

    def _validation_due(self, step: int) -> bool:
        validation = self.cfg.train.validation
        return validation.enabled and step % validation.every == 0


_AT_THE_END = {
    "save": "the last step: the final LoRA is saved now",
    "sample": "the last step: the final previews are rendered now",
    "stop": "the last step: the run ends now anyway",
}
