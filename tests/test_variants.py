"""LoKr, LoHa and DoRA: trained through peft, saved, reloaded with the same output, exported to plain LoRA."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli
from diffusers import ZImagePipeline

from zimage_lora.config import DEFAULT_TARGET_REGEX, load_job
from zimage_lora.lora import network
from zimage_lora.lora.io import read_lora, save_lora
from zimage_lora.lora.variants import export_plain_lora, merge_into, network_file, read_network, save_network
from zimage_lora.models.loading import load_components
from zimage_lora.training.recipe import train

KINDS = ["lokr", "loha", "dora"]


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        [torch.randn(16, 1, 8, 8, generator=g) for _ in range(2)],
        torch.rand(2, generator=g),
        [torch.randn(n, 32, generator=g) for n in (5, 9)],
    )


def forward(model, batch):
    x, t, caps = batch
    with torch.no_grad():
        return torch.stack(model([i.clone() for i in x], t.clone(), [c.clone() for c in caps], return_dict=False)[0])


def trained_in_memory(model_dir, kind, seed=3):
    """A transformer with the network injected and its weights set away from zero (as after training)."""
    model = load_components(str(model_dir), parts=("transformer",)).transformer
    names = network.target_module_names(model, DEFAULT_TARGET_REGEX)
    network.add_user_lora(model, names, rank=4, alpha=2.0, seed=0, kind=kind)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in network.named_user_parameters(model).items():
            if "magnitude" in name:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_saved_file_reloads_with_the_same_output(kind, tiny_model_dir, tmp_path):
    model = trained_in_memory(tiny_model_dir, kind)
    batch = inputs()
    in_memory = forward(model, batch)
    path = tmp_path / f"{kind}.safetensors"
    save_network(path, network_file(model, kind, network.USER), "fp32", {"zimage_lora.network": kind})
    base = load_components(str(tiny_model_dir), parts=("transformer",)).transformer
    assert (in_memory - forward(base, batch)).abs().max() > 1e-2  # the network matters
    # our loader, for every kind
    merge_into(base, read_network(path), 1.0, str(path))
    torch.testing.assert_close(forward(base, batch), in_memory, atol=2e-5, rtol=1e-5)
    if kind == "lokr":  # diffusers reads LoKr (LyCORIS layout): same output there too
        pipe = ZImagePipeline.from_pretrained(str(tiny_model_dir))
        pipe.load_lora_weights(str(path))
        torch.testing.assert_close(forward(pipe.transformer, batch), in_memory, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_export_to_plain_lora_loads_in_diffusers(kind, tiny_model_dir, tmp_path):
    model = trained_in_memory(tiny_model_dir, kind)
    batch = inputs(1)
    in_memory = forward(model, batch)
    path = tmp_path / f"{kind}.safetensors"
    save_network(path, network_file(model, kind, network.USER), "fp32", {})
    base = load_components(str(tiny_model_dir), parts=("transformer",)).transformer
    modules, error = export_plain_lora(read_network(path), base, rank=None)
    assert error < 1e-5  # exact: the full rank of each delta
    save_lora(tmp_path / "plain.safetensors", modules, "fp32", {})
    pipe = ZImagePipeline.from_pretrained(str(tiny_model_dir))
    pipe.load_lora_weights(str(tmp_path / "plain.safetensors"))
    torch.testing.assert_close(forward(pipe.transformer, batch), in_memory, atol=1e-4, rtol=1e-4)
    # a lower rank is an approximation, and says how good
    _, approx_error = export_plain_lora(read_network(path), base, rank=1)
    assert 0 < approx_error < 1


@pytest.mark.parametrize("kind", KINDS)
def test_each_variant_trains_saves_and_generates(kind, make_job, tiny_model_dir, tmp_path):
    result = train(
        load_job(make_job({"target": {"type": kind, "rank": 4}, "train": {"steps": 3, "lr": 1e-2}})), progress=False
    )
    net = read_network(result.final_lora)
    assert net.kind == kind and net.metadata["zimage_lora.network"] == kind
    assert set(net.modules) == set(read_lora_targets(tiny_model_dir))
    out = tmp_path / "gen"
    proc = run_cli(
        "generate",
        "--model",
        str(tiny_model_dir),
        "--lora",
        f"{result.final_lora}:0.8",
        "--prompt",
        "zfox",
        "--width",
        "64",
        "--height",
        "64",
        "--out",
        str(out),
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr
    assert len(list(out.glob("*.png"))) == 1
    exported = tmp_path / "plain.safetensors"
    proc = run_cli("export-lora", str(result.final_lora), str(exported), "--model", str(tiny_model_dir))
    assert proc.returncode == 0, proc.stderr
    assert "largest relative error" in proc.stdout and read_lora(exported).modules


def read_lora_targets(model_dir):
    import re

    from torch import nn

    model = load_components(str(model_dir), parts=("transformer",)).transformer
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(DEFAULT_TARGET_REGEX, n)]


def test_dop_is_refused_with_dora(make_job):
    from zimage_lora.errors import ConfigError

    with pytest.raises(ConfigError, match="dora"):
        load_job(make_job({"target": {"type": "dora"}, "train": {"dop": {"enabled": True, "class_word": "fox"}}}))
