"""Shared fixtures: a tiny Z-Image of the real classes, a random training adapter, and job files around them."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
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
