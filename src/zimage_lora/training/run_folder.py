"""The run folder, a contract shared by the CLI, the web UI and the tests.

```
output/<name>/
  config.yaml                      the fully resolved job
  <name>_<step:09d>.safetensors    LoRA checkpoints every save.every steps (newest save.keep kept)
  <name>.safetensors               the final LoRA (the only other top-level .safetensors)
  state/<step:09d>.pt              training state saved with each checkpoint (resume)
  samples/<step:09d>_<index:02d>.png, samples/contact_sheet.png
  metrics.jsonl                    one line per step: step, loss, lr, grad_norm, sec; a sample step's line also has its
                                   preview scores (leak, leak_prompts; on the toy world concept, accuracy, turbo_drift)
  run.json                         volatile facts: timestamps, host, versions, status
  train.log                        what the trainer printed
  README.md                        model card
  requests/{save,sample,stop}      requests to a running trainer (see below)
```
Files are written as ``.tmp`` and renamed into place.

Requests: to ask a running trainer to save a checkpoint now, render previews now, or save and stop, create an (empty)
file ``requests/save``, ``requests/sample`` or ``requests/stop`` in the run folder (``touch`` will do; the web UI does
the same). The trainer looks after every optimizer step, removes the files it found, logs ``request: <action> at
step N`` and acts before the next step. Unknown names are removed and ignored. Stop behaves like Ctrl-C: the current
state is saved and ``--resume`` continues from it. A request made while the trainer is still loading acts at its
first step; one older than the trainer's process is an earlier run's and is dropped (logged); one that comes after
the last step is answered in the log with the final LoRA (``training/control.py``).
"""

from __future__ import annotations

import io
import json
import os
import platform
import re
import socket
import time
from pathlib import Path

from zimage_lora.errors import UserError
from zimage_lora.files import atomic_write_bytes

STATE_RE = re.compile(r"^(\d{9})\.pt$")
SAMPLE_RE = re.compile(r"^(\d{9})_(\d{2})\.png$")  # sample_path's names


def sample_files(samples_dir: Path) -> list[tuple[int, int, Path]]:
    """The previews in a run's samples folder as (step, prompt index, path), sorted (``sample_path``'s names)."""
    if not Path(samples_dir).is_dir():
        return []
    return sorted((int(m[1]), int(m[2]), p) for p in Path(samples_dir).iterdir() if (m := SAMPLE_RE.match(p.name)))


def preview_files(samples_dir: Path) -> dict[tuple[int, int], Path]:
    """Preview PNGs of a run by (step, prompt index)."""
    return {(step, index): path for step, index, path in sample_files(samples_dir)}


class RunFolder:
    def __init__(self, root: Path, name: str):
        self.root = Path(root)
        self.name = name
        self.state_dir = self.root / "state"
        self.samples_dir = self.root / "samples"

    # --- layout ------------------------------------------------------------------------------------------------
    def checkpoint_path(self, step: int) -> Path:
        return self.root / f"{self.name}_{step:09d}.safetensors"

    @property
    def final_path(self) -> Path:
        return self.root / f"{self.name}.safetensors"

    def state_path(self, step: int) -> Path:
        return self.state_dir / f"{step:09d}.pt"

    def sample_path(self, step: int, index: int) -> Path:
        return self.samples_dir / f"{step:09d}_{index:02d}.png"

    def checkpoints(self) -> list[tuple[int, Path]]:
        pattern = re.compile(rf"^{re.escape(self.name)}_(\d{{9}})\.safetensors$")
        found = [(int(m.group(1)), p) for p in self.root.glob("*.safetensors") if (m := pattern.match(p.name))]
        return sorted(found)

    def samples(self) -> list[tuple[int, int, Path]]:
        """Preview images as (step, prompt index, path), in that order."""
        return sample_files(self.samples_dir)

    @property
    def reference_dir(self) -> Path:
        """Where the step-0 previews go when ``sample.first`` is off: rendered for the scores, not shown."""
        return self.samples_dir / "reference"

    def reference_path(self, index: int) -> Path:
        return self.reference_dir / f"{0:09d}_{index:02d}.png"

    def states(self) -> list[tuple[int, Path]]:
        if not self.state_dir.is_dir():
            return []
        return sorted((int(m.group(1)), p) for p in self.state_dir.iterdir() if (m := STATE_RE.match(p.name)))

    # --- requests from outside (web UI) -------------------------------------------------------------------------
    REQUESTS = ("save", "sample", "stop")

    @property
    def requests_dir(self) -> Path:
        return self.root / "requests"

    def request(self, action: str) -> Path:
        """Ask the trainer running in this folder to ``save``, ``sample`` or ``stop`` after its current step."""
        if action not in self.REQUESTS:
            raise ValueError(f"unknown request {action!r}; one of {', '.join(self.REQUESTS)}")
        self.requests_dir.mkdir(parents=True, exist_ok=True)
        path = self.requests_dir / action
        path.touch()
        return path

    def pending_requests(self) -> list[tuple[str, float]]:
        """The request files waiting now, with the time each was made (its modification time)."""
        if not self.requests_dir.is_dir():
            return []
        found = []
        for path in self.requests_dir.iterdir():
            try:
                found.append((path.name, path.stat().st_mtime))
            except FileNotFoundError:
                continue
        return sorted(found)

    def remove_request(self, action: str) -> None:
        (self.requests_dir / action).unlink(missing_ok=True)

    def take_requests(self) -> set[str]:
        """The pending requests, removed as they are read (each is acted on once)."""
        if not self.requests_dir.is_dir():
            return set()
        found = set()
        for path in self.requests_dir.iterdir():
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            if path.name in self.REQUESTS:
                found.add(path.name)
        return found

    # --- start of a run -----------------------------------------------------------------------------------------
    def check_start(self, resume: bool, overwrite: bool) -> None:
        """Refuse a start that needs a decision (the folder holds a run); reads only."""
        if resume and overwrite:
            raise UserError("--resume and --overwrite exclude each other; pick one")
        has_state = bool(self.states()) or self.final_path.exists() or bool(self.checkpoints())
        if has_state and not (resume or overwrite):
            raise UserError(
                f"{self.root} already holds a run; pass --resume to continue it or --overwrite to start afresh"
            )

    def prepare(self, resume: bool, overwrite: bool) -> None:
        """Check the folder before any model loads: state needs a decision, the folder must be writable."""
        self.check_start(resume, overwrite)
        if overwrite and self.root.exists():
            self._clear()
        if self.root.exists():  # debris of a write that a kill interrupted: never a checkpoint, so remove it
            for debris in [*self.root.glob("*.tmp"), *self.state_dir.glob("*.tmp")]:
                debris.unlink(missing_ok=True)
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self.samples_dir.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write_test.tmp"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            message = f"job.output_dir: cannot write to {self.root} ({e.strerror}); choose a writable folder"
            raise UserError(message) from None

    def _clear(self) -> None:
        for _, p in self.checkpoints():
            p.unlink()
        for _, p in self.states():
            p.unlink()
        for p in [self.final_path, self.root / "metrics.jsonl", self.root / "README.md", self.root / "train.log"]:
            if p.exists():
                p.unlink()
        if self.samples_dir.is_dir():
            for p in self.samples_dir.glob("*.png"):
                p.unlink()
            for p in (self.samples_dir / "reference").glob("*.png"):  # sample.first off: step 0's, for the scores
                p.unlink()
        for p in (self.root / "processes").glob("rank-*"):  # the records of a run on several processes
            p.unlink()

    # --- writes -------------------------------------------------------------------------------------------------
    def write_text(self, relative: str, text: str) -> None:
        atomic_write_bytes(self.root / relative, text.encode("utf-8"))

    def write_state(self, step: int, state: dict) -> Path:
        import torch  # here, not at the top: the web UI reads run folders without loading torch

        buffer = io.BytesIO()
        torch.save(state, buffer)
        path = self.state_path(step)
        atomic_write_bytes(path, buffer.getvalue(), fault="save.state", index=step)
        return path

    def read_latest_state(self) -> dict | None:
        """The newest state that loads completely; a damaged one is skipped, never trusted."""
        import torch

        for _, path in reversed(self.states()):
            try:
                return torch.load(path, map_location="cpu", weights_only=False)
            except Exception:  # noqa: BLE001 - any unreadable state file is skipped
                continue
        return None

    def rotate(self, keep: int) -> None:
        """Keep the newest ``keep`` checkpoints and states."""
        for _, p in self.checkpoints()[:-keep]:
            p.unlink(missing_ok=True)
        for _, p in self.states()[:-keep]:
            p.unlink(missing_ok=True)

    def write_run_json(self, **facts) -> None:
        path = self.root / "run.json"
        current = json.loads(path.read_text()) if path.exists() else {}
        current.update(facts)
        self.write_text("run.json", json.dumps(current, indent=2, sort_keys=True) + "\n")


def environment_facts() -> dict:
    import diffusers
    import peft
    import torch
    import transformers

    from zimage_lora import __version__

    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            "zimage_lora": __version__,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def metric_rows(text: str) -> list[dict]:
    """The rows of metrics.jsonl text; a line still being written (incomplete JSON) is skipped."""
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def read_metrics(root: Path, after: int | None = None) -> list[dict]:
    """A run folder's metrics rows (those after step ``after`` when given)."""
    try:
        text = (Path(root) / "metrics.jsonl").read_text(encoding="utf-8")
    except OSError:
        return []
    return [row for row in metric_rows(text) if after is None or row["step"] > after]


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per step) and TensorBoard events when tensorboard is installed."""

    def __init__(self, root: Path, resume_step: int = 0):
        self.path = Path(root) / "metrics.jsonl"
        if resume_step and self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            atomic_write_bytes(self.path, ("\n".join(kept) + "\n" if kept else "").encode())
        self.file = open(self.path, "a", encoding="utf-8")
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(root) / "tensorboard"))
        except ImportError:
            pass

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
