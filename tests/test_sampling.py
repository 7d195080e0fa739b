"""Previews equal inference: our sampler against diffusers' ZImagePipeline; `generate` with several LoRAs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from conftest import run_cli
from diffusers import ZImagePipeline
from PIL import Image
from torch import nn

from zimage_lora.config import DEFAULT_TARGET_REGEX, load_job
from zimage_lora.lora.io import LoraWeights, read_lora, save_lora
from zimage_lora.sampling.generate import Generator, choose_arch
from zimage_lora.sampling.request import GenerationRequest, LoraRef
from zimage_lora.sampling.sampler import SampleSettings
from zimage_lora.training.recipe import train

PROMPT = "zfox, a cartoon fox head on a blue sky"
NEGATIVE = "blurry"


def random_lora(model_dir, path, seed, std=0.3):
    """A LoRA file with a visible effect on the tiny model (our layout)."""
    import re

    pipe_model = ZImagePipeline.from_pretrained(str(model_dir)).transformer
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for name, layer in pipe_model.named_modules():
        if isinstance(layer, nn.Linear) and re.fullmatch(DEFAULT_TARGET_REGEX, name):
            modules[name] = LoraWeights(
                torch.randn(4, layer.in_features, generator=g) / layer.in_features**0.5,
                torch.randn(layer.out_features, 4, generator=g) * std,
                alpha=2.0,
            )
    save_lora(path, modules, "fp32", {})
    return path


@pytest.fixture(scope="module")
def loras(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    return random_lora(tiny_model_dir, folder / "a.safetensors", 1), random_lora(
        tiny_model_dir, folder / "b.safetensors", 2
    )


def pipeline_image(model_dir, files_weights, settings: SampleSettings) -> np.ndarray:
    pipe = ZImagePipeline.from_pretrained(str(model_dir))
    names = []
    for i, (path, _) in enumerate(files_weights):
        pipe.load_lora_weights(str(path), adapter_name=f"l{i}")
        names.append(f"l{i}")
    if names:
        pipe.set_adapters(names, [w for _, w in files_weights])
    diffusers_guidance = settings.guidance - 1.0 if settings.guidance > 1 else 0.0  # diffusers counts from 0
    image = pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        width=settings.width,
        height=settings.height,
        num_inference_steps=settings.steps,
        guidance_scale=diffusers_guidance,
        generator=torch.Generator().manual_seed(settings.seed),
    ).images[0]
    return np.asarray(image).astype(int)


def request(model_dir, files_weights, arch="zimage_turbo", **options) -> GenerationRequest:
    """A generation request as the CLI and the playground make it (the prompt and size are given per image here)."""
    loras = [LoraRef(path=str(p), weight=w) for p, w in files_weights]
    return GenerationRequest(model=str(model_dir), arch=arch, loras=loras, prompt=PROMPT, device="cpu", **options)


def our_image(model_dir, files_weights, settings: SampleSettings, arch="zimage_turbo", **options) -> np.ndarray:
    gen = Generator(request(model_dir, files_weights, arch, **options))
    return np.asarray(gen.image(PROMPT, NEGATIVE, settings)).astype(int)


def test_fused_loras_give_the_branch_image_and_leave_no_branch(tiny_model_dir, loras):
    from peft.tuners.lora import LoraLayer

    settings = SampleSettings(64, 64, 8, 1.0, 4)
    specs = [(loras[0], 0.6), (loras[1], 1.0)]
    fused = Generator(request(tiny_model_dir, specs))
    branches = Generator(request(tiny_model_dir, specs, fuse=False))
    layers = lambda gen: sum(isinstance(m, LoraLayer) for m in gen.comps.transformer.modules())  # noqa: E731
    assert fused.fused and layers(fused) == 0  # the update is in the weights: a step costs the base model's
    assert not branches.fused and layers(branches) > 0
    a = np.asarray(fused.image(PROMPT, NEGATIVE, settings)).astype(int)
    b = np.asarray(branches.image(PROMPT, NEGATIVE, settings)).astype(int)
    assert np.abs(a - b).max() <= 1
    assert np.abs(a - our_image(tiny_model_dir, [], settings)).mean() > 2  # and the LoRAs are in it
    # a quantized base keeps plain LoRAs as full-precision branches (fused, they would be rounded to its grid)
    quantized = Generator(request(tiny_model_dir, specs, quantize="int8"))
    assert not quantized.fused and layers(quantized) > 0


@pytest.mark.parametrize(
    "settings",
    [SampleSettings(64, 64, 8, 1.0, 11), SampleSettings(64, 48, 12, 3.0, 5)],
    ids=["turbo-8-steps-no-cfg", "cfg-3"],
)
def test_preview_equals_the_diffusers_pipeline(settings, tiny_model_dir, loras):
    ours = our_image(tiny_model_dir, [(loras[0], 0.8)], settings)
    theirs = pipeline_image(tiny_model_dir, [(loras[0], 0.8)], settings)
    base = pipeline_image(tiny_model_dir, [], settings)
    assert ours.shape == theirs.shape == (settings.height, settings.width, 3)
    assert np.abs(ours - theirs).max() <= 1  # uint8 rounding at most
    assert np.abs(theirs - base).mean() > 2  # and the LoRA visibly matters


def test_two_loras_at_different_weights(tiny_model_dir, loras):
    settings = SampleSettings(64, 64, 8, 1.0, 3)
    both = our_image(tiny_model_dir, [(loras[0], 0.5), (loras[1], 1.0)], settings)
    assert np.abs(both - pipeline_image(tiny_model_dir, [(loras[0], 0.5), (loras[1], 1.0)], settings)).max() <= 1
    assert np.abs(both - our_image(tiny_model_dir, [(loras[0], 0.5)], settings)).mean() > 2
    assert np.abs(both - our_image(tiny_model_dir, [(loras[0], 1.0), (loras[1], 1.0)], settings)).mean() > 1


def test_kohya_file_gives_the_same_image(tiny_model_dir, loras, tmp_path):
    lora = read_lora(loras[0])
    kohya = {}
    for name, w in lora.modules.items():
        key = "lora_unet_" + name.replace(".", "_")
        kohya[f"{key}.lora_down.weight"] = w.down
        kohya[f"{key}.lora_up.weight"] = w.up
        kohya[f"{key}.alpha"] = torch.tensor(w.alpha)
    from safetensors.torch import save_file

    save_file(kohya, tmp_path / "kohya.safetensors")
    settings = SampleSettings(64, 64, 8, 1.0, 9)
    ours = our_image(tiny_model_dir, [(loras[0], 0.7)], settings)
    assert np.array_equal(ours, our_image(tiny_model_dir, [(tmp_path / "kohya.safetensors", 0.7)], settings))


def test_generate_command(tiny_model_dir, loras, tmp_path):
    proc = run_cli(
        "generate",
        "--model",
        str(tiny_model_dir),
        "--lora",
        f"{loras[0]}:0.7",
        "--lora",
        str(loras[1]),
        "--prompt",
        PROMPT,
        "--width",
        "64",
        "--height",
        "64",
        "--count",
        "2",
        "--seed",
        "5",
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr
    files = sorted((tmp_path / "out").glob("*.png"))
    assert [f.name for f in files] == ["00000_5.png", "00001_6.png"]
    with Image.open(files[1]) as im:
        info = json.loads(im.text["parameters"])
    assert info["seed"] == 6 and info["steps"] == 8 and info["guidance"] == 1.0
    assert info["loras"] == "a.safetensors:0.7, b.safetensors:1" and info["lora_fused"] == "true"
    bad = run_cli("generate", "--model", str(tiny_model_dir), "--lora", "a.safetensors:strong", "--prompt", "x")
    assert bad.returncode == 2 and "weight after ':'" in bad.stderr and "Traceback" not in bad.stderr
    # the request's own rules, named as the command line spells them (one check, shared with the playground's API)
    for option, value, says in (("--width", "1000", "multiple of 16"), ("--count", "0", ">= 1")):
        bad = run_cli("generate", "--model", str(tiny_model_dir), "--prompt", "x", option, value)
        assert bad.returncode == 2 and bad.stderr.startswith(f"error: {option}: ") and says in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
    # a base model that cannot load is named as the command line names it, not as a job file's key
    bad = run_cli("generate", "--model", str(tmp_path / "nowhere"), "--prompt", "x")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --model folder ") and "name_or_path" not in bad.stderr


def lora_trained_for(source, folder, arch: str, base_model: str = "model"):
    """A copy of a LoRA file whose metadata says it was trained for ``arch`` on ``base_model``."""
    from zimage_lora.lora.io import read_safetensors, serialize_safetensors

    tensors, _ = read_safetensors(source)
    path = folder / f"{arch}.safetensors"
    meta = {"zimage_lora.arch": arch, "zimage_lora.base_model": base_model}
    path.write_bytes(serialize_safetensors(tensors, meta))
    return path


def test_generate_runs_the_arch_a_lora_was_trained_for(tiny_model_dir, loras, tmp_path):
    """Without --arch, a De-Turbo LoRA runs as De-Turbo is meant to (25 steps, CFG 3) and a LoRA trained with the
    training adapter on plain Turbo (8 steps, no CFG); what does not fit is said, not silently run."""
    from zimage_lora.models.arch import ARCHS

    deturbo = lora_trained_for(loras[0], tmp_path, "zimage_deturbo", tiny_model_dir.name)
    adapter = lora_trained_for(loras[1], tmp_path, "zimage_turbo_adapter", tiny_model_dir.name)

    def chosen(paths, arch=None, model=str(tiny_model_dir)):
        said: list[str] = []
        req = GenerationRequest(model=model, arch=arch, loras=[LoraRef(path=str(p)) for p in paths], prompt="x")
        return choose_arch(req, said.append).name, said

    assert chosen([deturbo]) == ("zimage_deturbo", [])
    assert chosen([adapter]) == ("zimage_turbo", [])
    name, said = chosen([deturbo], arch="zimage_turbo")
    assert name == "zimage_turbo" and said == [
        f"LoRA {deturbo.name} was trained for zimage_deturbo (used with zimage_deturbo: 25 steps, CFG 3); it runs on "
        "zimage_turbo (8 steps, no CFG) as --arch asks"
    ]
    name, said = chosen([adapter, deturbo])
    assert name == "zimage_turbo" and said[0].startswith("the LoRAs were trained for different archs")
    name, said = chosen([loras[0]])  # no metadata: today's default, said
    assert name == "zimage_turbo" and said == [
        "LoRA a.safetensors records no arch; running zimage_turbo (8 steps, no CFG); give --arch to choose"
    ]
    name, said = chosen([deturbo], model=ARCHS["zimage_deturbo"].default_model)
    assert said == [f"LoRA {deturbo.name} was trained on {tiny_model_dir.name}; this runs ostris/Z-Image-De-Turbo"]

    proc = run_cli(
        "generate", "--model", str(tiny_model_dir), "--lora", str(deturbo), "--prompt", PROMPT, "--width", "64",
        "--height", "64", "--out", str(tmp_path / "out"), "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    with Image.open(next((tmp_path / "out").glob("*.png"))) as im:
        info = json.loads(im.text["parameters"])
    assert (info["arch"], info["steps"], info["guidance"]) == ("zimage_deturbo", 25, 3.0)


def run_arch_job(tmp_path, tiny_model_dir, arch, **sample):
    from conftest import demo_dataset

    demo_dataset(tmp_path / "dataset", 2)
    job = {
        "version": 1,
        "job": {"name": arch, "trigger_word": "zfox", "output_dir": "./output", "device": "cpu", "seed": 1},
        "model": {"arch": arch, "name_or_path": str(tiny_model_dir)},
        "target": {"rank": 4},
        "save": {"dtype": "fp32", "every": 100, "keep": 1},
        "train": {"steps": 2, "optimizer": "adamw", "gradient_checkpointing": False, "cache_text_embeddings": True},
        "datasets": [{"path": "./dataset", "resolutions": [64]}],
        "sample": {"every": 100, "width": 64, "height": 64, "prompts": ["[trigger] on snow"], **sample},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    return train(load_job(tmp_path / "job.yaml"), progress=False)


@pytest.mark.parametrize(
    "arch, steps, guidance, shift", [("zimage_deturbo", 25, 3.0, 3.0), ("zimage_base", 30, 4.0, 6.0)]
)
def test_deturbo_and_base_train_and_sample_with_cfg(arch, steps, guidance, shift, tmp_path, tiny_model_dir):
    result = run_arch_job(tmp_path, tiny_model_dir, arch)
    with Image.open(result.run_dir / "samples" / "000000002_00.png") as im:
        info = json.loads(im.text["parameters"])
    assert (info["steps"], info["guidance"], info["shift"]) == (steps, guidance, shift)
    meta = read_lora(result.final_lora).metadata
    assert meta["zimage_lora.arch"] == arch and meta["zimage_lora.training_adapter"] == ""


def test_saved_lora_holds_nothing_of_the_adapter(make_job):
    """With a vanishing LR the user's LoRA stays at its init (B = 0): no adapter value can hide in the file."""
    result = train(load_job(make_job({"train": {"steps": 1, "lr": 1e-12}})), progress=False)
    lora = read_lora(result.final_lora)
    assert max(float(w.up.abs().max()) for w in lora.modules.values()) < 1e-9
    adapter = read_lora(load_job(make_job()).model.training_adapter)
    assert max(float(w.up.abs().max()) for w in adapter.modules.values()) > 0.05


def test_compare_stops_resumes_without_retraining_and_writes_side_by_side_grids(make_job, tiny_model_dir, tmp_path):
    from zimage_lora.models.tiny_adapter import write_random_adapter
    from zimage_lora.training.compare import read_comparison

    second = write_random_adapter(tiny_model_dir, tmp_path / "adapter_v2.safetensors", rank=2, seed=5)
    job = make_job({"train": {"steps": 2}, "sample": {"every": 1, "prompts": ["[trigger] a", "b", "c"]}})
    varies = ["--vary", "target.rank=4", "--vary", f"target.rank=8;model.training_adapter={second}"]
    stopped = run_cli("compare", str(job), *varies, "--no-progress", fault="sigint@step:1#tiny_v1")
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped: variant 1" in stopped.stdout and "at step 1" in stopped.stdout and "--resume" in stopped.stdout
    folder = job.parent / "output" / "tiny_compare"
    state = read_comparison(folder)
    assert state["status"] == "stopped" and [v["status"] for v in state["variants"]] == ["done", "stopped"]
    assert [v["step"] for v in state["variants"]] == [2, 1] and state["variants"][1]["samples"]["0"][0]
    first = folder / "tiny_v0" / "tiny_v0.safetensors"
    first_written = first.stat().st_mtime_ns
    refused = run_cli("compare", str(job), *varies, "--no-progress")
    assert refused.returncode == 2 and "already holds a comparison" in refused.stderr
    other = run_cli("compare", str(job), "--vary", "target.rank=4", "--vary", "target.rank=2", "--resume")
    assert other.returncode == 2 and "give the same --vary options" in other.stderr
    proc = run_cli("compare", str(job), *varies, "--no-progress", "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "the run is complete" in proc.stderr and "resumed from step 1" in proc.stderr
    assert first.stat().st_mtime_ns == first_written  # the finished variant was not trained again
    done = read_comparison(folder)
    assert done["status"] == "done"
    assert sorted(done["variants"][1]["samples"], key=int) == ["0", "1", "2"]  # the stop's step rendered on resume
    assert done["labels"] == ["target.rank=4", "target.rank=8; model.training_adapter=adapter_v2.safetensors"]
    folder = job.parent / "output" / "tiny_compare"
    assert sorted(p.name for p in folder.glob("grid_*.png")) == [f"grid_{s:09d}.png" for s in (0, 1, 2)]
    assert (folder / "tiny_v0" / "tiny_v0.safetensors").is_file() and (folder / "tiny_v1" / "samples").is_dir()
    label_w, head_h, cell = 220, 24, 256  # the grid layout: a label column, a header row, square cells
    with Image.open(folder / "grid_000000002.png") as grid:
        assert grid.size == (label_w + 2 * cell, head_h + 3 * cell)  # 2 variants x 3 prompts
        cells = np.asarray(grid.convert("RGB")).astype(int)
    left = cells[head_h : head_h + 64 * 4, label_w : label_w + cell]
    right = cells[head_h : head_h + 64 * 4, label_w + cell : label_w + 2 * cell]
    assert np.abs(left - right).mean() > 0  # the variants differ
    with Image.open(folder / "summary.png") as summary:
        assert summary.size == (label_w + 3 * cell, head_h + 2 * cell)  # variants x prompts at the last step
    assert "final loss" in proc.stdout and "summary:" in proc.stdout
    bad = run_cli("compare", str(job), "--vary", "target.rank=4")
    assert bad.returncode == 2 and "at least two variants" in bad.stderr
