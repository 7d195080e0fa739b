"""Shared fixtures: a tiny Z-Image of the real classes, a random training adapter, and job files around them."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import pytest
import yaml

from zimage_lora.quiet import quiet_libraries

quiet_libraries()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from zimage_lora.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    from zimage_lora.models.tiny_adapter import write_random_adapter

    return write_random_adapter(
        tiny_model_dir, tmp_path_factory.mktemp("adapter") / "adapter.safetensors", rank=4, seed=1
    )


def demo_dataset(dest: Path, count: int | None = None) -> Path:
    """Copy (some of) the bundled demo images and captions into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    bundled = resources.files("zimage_lora") / "demo" / "dataset"
    images = sorted(e.name for e in bundled.iterdir() if e.name.lower().endswith((".png", ".jpg")))
    for name in images[:count]:
        (dest / name).write_bytes((bundled / name).read_bytes())
        caption = bundled / (name.rsplit(".", 1)[0] + ".txt")
        if caption.is_file():
            (dest / caption.name).write_bytes(caption.read_bytes())
    return dest


BASE_JOB = {
    "version": 1,
    "job": {"name": "tiny", "trigger_word": "zfox", "output_dir": "./output", "device": "cpu", "seed": 7},
    "model": {"arch": "zimage_turbo_adapter"},
    "target": {"rank": 4},
    "save": {"dtype": "fp32", "every": 2, "keep": 2},
    "train": {
        "batch_size": 1,
        "steps": 6,
        "optimizer": "adamw",
        "lr": 1e-3,
        "gradient_checkpointing": False,
        "cache_text_embeddings": True,
    },
    "datasets": [{"path": "./dataset", "resolutions": [64], "caption_dropout": 0.0}],
    "sample": {"every": 1000, "width": 64, "height": 64, "prompts": []},
}


def merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        elif _dict_list(value) and _dict_list(out.get(key)) and len(value) == len(out[key]):
            out[key] = [merge(a, b) for a, b in zip(out[key], value, strict=True)]  # datasets: item by item
        else:
            out[key] = value
    return out


def _dict_list(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


@pytest.fixture
def make_job(tmp_path, tiny_model_dir, tiny_adapter):
    """Write a job file in a fresh folder (with a copy of the demo images) and return its path."""

    def build(override: dict | None = None, images: int | None = 3, folder: Path | None = None) -> Path:
        root = folder or tmp_path
        if not (root / "dataset").exists():
            demo_dataset(root / "dataset", images)
        data = merge(BASE_JOB, {"model": {"name_or_path": str(tiny_model_dir), "training_adapter": str(tiny_adapter)}})
        data = merge(data, override or {})
        if data["model"]["arch"] != "zimage_turbo_adapter":
            data["model"].pop("training_adapter", None)
        path = root / "job.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return build


def wait_for(check, timeout: float = 120, what: str = "condition"):
    """Poll ``check`` until it returns something true, and return that: waiting on an event (a file, a status), never
    on how fast a machine trains."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_status_of(fetch, what: str, statuses: tuple[str, ...], timeout: float = 120) -> dict:
    """Poll ``fetch()`` (a job, comparison or captioning run as the UI's API shows it) until its status is one of
    ``statuses``, and return it; a timeout fails with its status, error and last log lines."""

    def check():
        found = fetch()
        return found if found["status"] in statuses else None

    try:
        return wait_for(check, timeout, f"{what} to be {statuses}")
    except AssertionError:
        found = fetch()
        log = "\n".join(found.get("log_tail") or [])
        raise AssertionError(f"{what} is {found['status']}: {found['error']}\n{log}") from None


def cli_env(fault: str | None = None) -> dict[str, str]:
    """The environment CLI subprocesses run in: offline, and with the fault injection asked for (or none)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("ZIMAGE_LORA_FAULT", None)
    if fault:
        env["ZIMAGE_LORA_FAULT"] = fault
    return env


def run_cli(*args: str, fault: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``zimage-lora ARGS`` in a fresh process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "zimage_lora.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=cli_env(fault),
        timeout=timeout,
    )


# --- comparing two training runs that took different compute paths -------------------------------------------------
# Bit-identity holds only where the same kernels run on the same data (a resume, a same-seed rerun). Two paths that
# should give the same numbers (offloaded or resident blocks, partial or full recompute, cached or fresh latents)
# agree only up to float rounding, which depends on the CPU's kernels and memory layout. These tolerances are about
# 40x above the rounding measured between such paths on an AMD EPYC (LoRA effect 2.5e-6) and far below what a broken
# path gives (offloaded weights rounded through bf16: LoRA effect 3e-2; test_offload shows the check catches it).
LOSS_REL = 1e-5
LORA_EFFECT_REL = 1e-4
PIXELS = 2  # of 255: previews of LoRAs that differ by rounding may round a pixel the other way


def lora_effect(path) -> dict:
    """Each module's weight change (alpha / rank) B A in float64: what a LoRA does, whatever its factors."""
    from zimage_lora.lora.io import read_lora

    return {m: w.scale * (w.up.double() @ w.down.double()) for m, w in read_lora(path).modules.items()}


def lora_effect_difference(a, b) -> float:
    """|effect(a) - effect(b)| / |effect(a)| over all modules (Frobenius)."""
    ea, eb = lora_effect(a), lora_effect(b)
    assert ea.keys() == eb.keys()
    num = sum(float(((ea[m] - eb[m]) ** 2).sum()) for m in ea) ** 0.5
    den = sum(float((ea[m] ** 2).sum()) for m in ea) ** 0.5
    return num / max(den, 1e-30)


def training_differences(a, b) -> list[str]:
    """How two finished runs (TrainResults) differ beyond float rounding: losses, DOP losses, the final LoRA's effect
    and the previews; an empty list when they trained alike."""
    import json

    import numpy as np
    from PIL import Image

    def rows(result):
        return [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]

    problems = []
    ra, rb = rows(a), rows(b)
    if [r["step"] for r in ra] != [r["step"] for r in rb]:
        return [f"steps differ: {len(ra)} against {len(rb)}"]
    for x, y in zip(ra, rb, strict=True):
        if abs(x["loss"] - y["loss"]) > LOSS_REL * abs(x["loss"]):
            problems.append(f"step {x['step']}: loss {x['loss']} against {y['loss']}")
        if (x.get("dop_loss") is None) != (y.get("dop_loss") is None):
            problems.append(f"step {x['step']}: a DOP loss in one run only")
        elif x.get("dop_loss") is not None and abs(x["dop_loss"] - y["dop_loss"]) > LOSS_REL * abs(x["loss"]):
            problems.append(f"step {x['step']}: DOP loss {x['dop_loss']} against {y['dop_loss']}")
    effect = lora_effect_difference(a.final_lora, b.final_lora)
    if effect > LORA_EFFECT_REL:
        problems.append(f"the final LoRAs' effects differ by {effect:.2e} (relative)")
    if [p.name for p in a.samples] != [p.name for p in b.samples]:
        problems.append("different previews were written")
    for pa, pb in zip(a.samples, b.samples, strict=False):
        xa = np.asarray(Image.open(pa).convert("RGB"), dtype=np.int16)
        xb = np.asarray(Image.open(pb).convert("RGB"), dtype=np.int16)
        if xa.shape != xb.shape or np.abs(xa - xb).max() > PIXELS:
            problems.append(f"preview {pa.name} differs by more than {PIXELS}/255")
    return problems


# --- the toy world ----------------------------------------------------------------------------------------------------


def _toy_lora(tmp_path_factory, name: str, overrides: list[str], plain: int = 24):
    """The demo's job on the shipped toy models, with ``overrides``, trained on its own data; (config, result)."""
    from zimage_lora.config import load_job, preset_yaml
    from zimage_lora.toyworld import demo
    from zimage_lora.training.recipe import train

    root = tmp_path_factory.mktemp(name)
    demo.copy_models(root / "toy")
    demo.write_dataset(root / "dataset", plain=plain)
    (root / "demo.yaml").write_text(preset_yaml("demo"))
    cfg = load_job(root / "demo.yaml", ["job.device=cpu", *overrides], warnings=[])
    return cfg, train(cfg, progress=False)


@pytest.fixture(scope="session")
def toy_lora_run(tmp_path_factory):
    """The demo's job on the shipped toy models (the toy Turbo with the toy training adapter learns stripes, trigger
    ``zst``, from 24 striped and 24 plain pictures), trained once per test session and shared: (config, result)."""
    return _toy_lora(tmp_path_factory, "toy_lora", [])


@pytest.fixture(scope="session")
def toy_lora_short_runs(tmp_path_factory):
    """Shorter runs of the demo's job (TOY_SHORT_STEPS steps, the step of one of the demo run's checkpoints, so
    they compare with it at equal length): without the plain pictures, and on raw Turbo without the adapter."""
    steps = [f"train.steps={TOY_SHORT_STEPS}"]
    return {
        "no_plain_pictures": _toy_lora(tmp_path_factory, "toy_short_noplain", steps, plain=0),
        "raw_turbo": _toy_lora(
            tmp_path_factory, "toy_short_raw", [*steps, "model.arch=zimage_turbo", "model.training_adapter="]
        ),
    }


TOY_SHORT_STEPS = 500  # the demo job saves a checkpoint every 500 steps


# --- the browser tests (tests/uibrowser.py) ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium for one test module (skips without Playwright or /usr/bin/chromium, except in CI)."""
    from uibrowser import launch_browser

    yield from launch_browser()


@pytest.fixture(scope="session")
def trained_ui(tmp_path_factory, tiny_model_dir, tiny_adapter):
    """The UI server on a data folder where one job (``uibrowser.TRAINED_JOB``) has trained to the end, with samples at
    steps 0, 2, 4, 6 and 8: shared by the browser tests that only look."""
    from uibrowser import start_trained_ui

    yield from start_trained_ui(tmp_path_factory.mktemp("ui-trained"), tiny_model_dir, tiny_adapter)
