"""The advanced options do what they say, measured: differential guidance, DOP, EMA, validation loss."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from zimage_lora.config import load_job
from zimage_lora.lora import network
from zimage_lora.lora.io import read_lora
from zimage_lora.models.loading import load_components
from zimage_lora.models.text import encode_prompts
from zimage_lora.training import flow
from zimage_lora.training import validation as validation_module
from zimage_lora.training.ema import ema_decay
from zimage_lora.training.recipe import train


def metrics(result) -> list[dict]:
    return [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]


# --- differential guidance ------------------------------------------------------------------------------------
def _toy_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 16, generator=g, requires_grad=True)
    x0, noise, x = (torch.randn(2, 16, generator=g) for _ in range(3))
    return w, x0, noise, x


@pytest.mark.parametrize("scale", [0.5, 3.0, 7.0])
def test_differential_guidance_scales_the_gradient(scale):
    """Under plain SGD (update = -lr * grad) the step is exactly ``scale`` times the plain one."""
    w, x0, noise, x = _toy_problem()
    weights = torch.ones(2)
    plain, _ = flow.guided_flow_loss(-(x @ w), x0, noise, weights, None)
    (g_plain,) = torch.autograd.grad(plain, w)
    guided, logged = flow.guided_flow_loss(-(x @ w), x0, noise, weights, scale)
    (g_guided,) = torch.autograd.grad(guided, w)
    torch.testing.assert_close(g_guided, scale * g_plain)
    torch.testing.assert_close(logged, plain.detach())  # what is logged stays the plain MSE


def test_differential_guidance_beside_dop_changes_the_balance_by_scale():
    w, x0, noise, x = _toy_problem(1)
    weights = torch.ones(2)
    prior = torch.randn(2, 16, generator=torch.Generator().manual_seed(5))

    def gradient_norms(scale):
        main, _ = flow.guided_flow_loss(-(x @ w), x0, noise, weights, scale)
        dop = ((x @ w - prior) ** 2).mean()
        (g_main,) = torch.autograd.grad(main, w)
        (g_dop,) = torch.autograd.grad(dop, w)
        return g_main.norm() / g_dop.norm()

    assert float(gradient_norms(3.0) / gradient_norms(None)) == pytest.approx(3.0, rel=1e-5)


def test_differential_guidance_in_a_run_logs_the_plain_loss_and_warns(make_job, tmp_path):
    plain = train(load_job(make_job({"train": {"steps": 2}}, folder=tmp_path / "plain")), progress=False)
    guided_job = {"train": {"steps": 2}, "advanced": {"differential_guidance": {"enabled": True, "scale": 3.0}}}
    guided = train(load_job(make_job(guided_job, folder=tmp_path / "guided")), progress=False)
    assert metrics(guided)[0]["loss"] == pytest.approx(metrics(plain)[0]["loss"], rel=1e-6)  # same weights at step 1
    assert metrics(guided)[0]["grad_norm"] == pytest.approx(3.0 * metrics(plain)[0]["grad_norm"], rel=1e-4)
    assert "differential guidance alone" in (guided.run_dir / "train.log").read_text()


# --- DOP ------------------------------------------------------------------------------------------------------
def _dop_job(tmp_path, tiny_model_dir, enabled):
    from conftest import demo_dataset

    folder = tmp_path / ("dop" if enabled else "plain")
    demo_dataset(folder / "dataset", 4)
    job = {
        "version": 1,
        "job": {"name": "j", "trigger_word": "zfox", "output_dir": "./out", "device": "cpu", "seed": 1},
        "model": {"arch": "zimage_deturbo", "name_or_path": str(tiny_model_dir)},
        "target": {"rank": 8},
        "save": {"dtype": "fp32", "every": 10000, "keep": 1},
        "train": {
            "steps": 60,
            "optimizer": "adamw",
            "lr": 3e-3,
            "gradient_checkpointing": False,
            "cache_text_embeddings": True,
            "dop": {"enabled": enabled, "multiplier": 2.0, "class_word": "fox"},
        },
        "datasets": [{"path": "./dataset", "resolutions": [64], "caption_dropout": 0.0}],
    }
    (folder / "job.yaml").write_text(yaml.safe_dump(job))
    return train(load_job(folder / "job.yaml"), progress=False)


def _relative_change(model_dir, lora_path, prompts) -> float:
    """How much the LoRA moves the transformer's output on these prompts, relative to the base output."""
    comps = load_components(str(model_dir), parts=("transformer", "text_encoder", "tokenizer"))
    caps = encode_prompts(comps.tokenizer, comps.text_encoder, prompts, batch_size=1)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(16, 1, 8, 8, generator=g) for _ in prompts]
    t = torch.rand(len(prompts), generator=g)
    model = comps.transformer
    with torch.no_grad():
        base = torch.stack(model(xs, t, caps, return_dict=False)[0])
        network.add_frozen_lora(model, read_lora(lora_path).modules, "check")
        with_lora = torch.stack(model(xs, t, caps, return_dict=False)[0])
    return float((with_lora - base).norm() / base.norm())


def test_dop_preserves_the_class_and_keeps_the_main_loss(tmp_path, tiny_model_dir):
    """Measured: class-prompt change 0.97 without DOP, 0.31 with (multiplier 2); main loss +11%.

    (The tiny byte-level text encoder hardly tells "zfox" from "fox", so here the trigger's change shrinks too; on
    the real Qwen3 encoder the two prompts are far apart.)"""
    plain = _dop_job(tmp_path, tiny_model_dir, False)
    dop = _dop_job(tmp_path, tiny_model_dir, True)
    class_prompts = ["fox, a cartoon fox head on a blue sky", "fox, a cartoon fox head on a green meadow", "a fox"]
    without = _relative_change(tiny_model_dir, plain.final_lora, class_prompts)
    with_dop = _relative_change(tiny_model_dir, dop.final_lora, class_prompts)
    assert with_dop <= 0.5 * without, (with_dop, without)
    assert dop.last_loss <= 1.2 * plain.last_loss, (dop.last_loss, plain.last_loss)
    records = metrics(dop)
    assert all("dop_loss" in r for r in records)
    assert records[0]["dop_loss"] == 0.0 and records[-1]["dop_loss"] > 0  # zero while the LoRA is still zero
    assert "dop_loss" not in metrics(plain)[0]


# --- EMA ------------------------------------------------------------------------------------------------------
def test_saved_ema_weights_are_the_ema_of_the_trajectory(make_job):
    decay = 0.9
    result = train(
        load_job(
            make_job(
                {
                    "train": {"steps": 5, "ema": {"enabled": True, "decay": decay, "save_raw": True}},
                    "save": {"every": 1, "keep": 10},
                }
            )
        ),
        progress=False,
    )
    names = [f"tiny_{k:09d}.safetensors" for k in range(1, 5)] + ["tiny.safetensors"]
    raw = [read_lora(result.run_dir / "raw" / n).modules for n in names]
    ema = [read_lora(result.run_dir / n).modules for n in names]
    for k in range(1, 5):  # ema_k = d * ema_{k-1} + (1 - d) * raw_k, with d warming up
        d = ema_decay(decay, k)
        for module in ema[k]:
            for part in ("down", "up"):
                expected = d * getattr(ema[k - 1][module], part) + (1 - d) * getattr(raw[k][module], part)
                torch.testing.assert_close(getattr(ema[k][module], part), expected, atol=1e-6, rtol=1e-5)
    assert any(not torch.equal(ema[-1][m].up, raw[-1][m].up) for m in ema[-1])  # EMA is not the raw weights


def test_ema_resumes_exactly(make_job, tmp_path):
    from conftest import merge

    base = {"train": {"steps": 6, "ema": {"enabled": True, "decay": 0.95}}, "save": {"every": 2, "keep": 3}}
    straight = train(load_job(make_job(base, folder=tmp_path / "a")), progress=False)
    job = make_job(merge(base, {"train": {"steps": 4}}), folder=tmp_path / "b")
    train(load_job(job), progress=False)
    resumed = train(load_job(job, ["train.steps=6"]), resume=True, progress=False)
    assert resumed.final_lora.read_bytes() == straight.final_lora.read_bytes()


# --- validation -----------------------------------------------------------------------------------------------
def test_validation_loss_is_deterministic_and_follows_the_weights(make_job, monkeypatch, tmp_path):
    twice = []
    real_call = validation_module.Validator.__call__

    def evaluate_twice(self, model, autocast):
        first, second = real_call(self, model, autocast), real_call(self, model, autocast)
        twice.append((first, second))
        return first

    monkeypatch.setattr(validation_module.Validator, "__call__", evaluate_twice)
    held_out = tmp_path / "held_out.png"
    from PIL import Image

    Image.new("RGB", (80, 64), (200, 40, 40)).save(held_out)
    result = train(
        load_job(
            make_job(
                {
                    "train": {
                        "steps": 6,
                        "lr": 1e-2,
                        "validation": {"enabled": True, "every": 2, "sigmas": [0.3, 0.7], "images": [str(held_out)]},
                    }
                }
            )
        ),
        progress=False,
    )
    assert all(a == b for a, b in twice) and len(twice) == 3
    val = [r["val_loss"] for r in metrics(result) if "val_loss" in r]
    assert [r["step"] for r in metrics(result) if "val_loss" in r] == [2, 4, 6]
    assert len(set(val)) == 3  # the LoRA changed between checkpoints, and so did the loss
