"""End-to-end: a tiny Turbo + adapter job through the real recipe, and its files checked against diffusers."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import training_differences
from PIL import Image
from safetensors import safe_open
from torch import nn

from zimage_lora.config import DEFAULT_TARGET_REGEX, load_job
from zimage_lora.lora import network
from zimage_lora.lora.io import comfyui_target, read_lora
from zimage_lora.models.loading import load_components
from zimage_lora.training.recipe import train


def run_job(path, **kwargs):
    return train(load_job(path), progress=False, **kwargs)


def transformer_inputs(model, seed=0, batch=2, caption_len=(5, 9)):
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(16, 1, 8, 8, generator=g) for _ in range(batch)]
    caps = [torch.randn(n, model.config.cap_feat_dim, generator=g) for n in caption_len[:batch]]
    t = torch.rand(batch, generator=g)
    return x, t, caps


def forward(model, inputs):
    x, t, caps = inputs
    with torch.no_grad():
        return torch.stack(model([xi.clone() for xi in x], t.clone(), [c.clone() for c in caps], return_dict=False)[0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, tiny_adapter):
    """One tiny Turbo + adapter run shared by the checks below (lr high enough that the LoRA matters)."""
    import yaml
    from conftest import BASE_JOB, demo_dataset, merge

    root = tmp_path_factory.mktemp("run")
    demo_dataset(root / "dataset", 3)
    data = merge(
        BASE_JOB,
        {
            "model": {"name_or_path": str(tiny_model_dir), "training_adapter": str(tiny_adapter)},
            "save": {"every": 2, "keep": 1},
            "train": {"lr": 2e-2},
            "sample": {
                "every": 3,
                "prompts": [
                    "[trigger], a cartoon fox head",
                    {"prompt": "a red car", "seed": 3},
                    {"prompt": "[trigger], a cartoon fox head", "lora_scale": 0.0},
                ],
            },
        },
    )
    (root / "job.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    result = run_job(root / "job.yaml")
    return root, result


def test_run_folder_layout_and_rotation(trained):
    root, result = trained
    run = root / "output" / "tiny"
    top = sorted(p.name for p in run.glob("*.safetensors"))
    # every 2 steps with keep 1: step 2 was rotated away, step 4 stays; step 6 is the final file
    assert top == ["tiny.safetensors", "tiny_000000004.safetensors"]
    assert sorted(p.name for p in (run / "state").iterdir()) == ["000000006.pt"]
    assert not list(run.rglob("*.tmp"))
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert all({"step", "loss", "lr", "grad_norm", "sec"} <= set(r) for r in lines)
    cfg = load_job(run / "config.yaml")
    assert cfg.train.steps == 6 and cfg.target.alpha == 4.0
    card = (run / "README.md").read_text()
    assert "tiny.safetensors" in card and "zfox" in card and "0.6-1.0" in card
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))  # tensorboard is a dev dependency
    assert json.loads((run / "run.json").read_text())["status"] == "done"


def test_samples_carry_settings_and_contact_sheet(trained):
    root, result = trained
    samples = root / "output" / "tiny" / "samples"
    names = sorted(p.name for p in samples.glob("0*.png"))
    assert names == [f"{step:09d}_{i:02d}.png" for step in (0, 3, 6) for i in range(3)]
    with Image.open(samples / "000000003_01.png") as im:
        info = json.loads(im.text["parameters"])
    assert info["prompt"] == "a red car" and info["seed"] == 3 and info["steps"] == 8 and info["guidance"] == 1.0
    with Image.open(samples / "000000000_00.png") as im:
        assert json.loads(im.text["parameters"])["prompt"] == "zfox, a cartoon fox head"
    with Image.open(samples / "contact_sheet.png") as sheet:
        assert sheet.size == (220 + 3 * 256, 24 + 3 * 256)  # 3 steps x 3 prompts


def test_preview_lora_scale_and_the_adapter_off(trained, tiny_model_dir):
    """Previews run without the adapter: at lora_scale 0 the last preview is the step-0 (plain Turbo) image."""
    from diffusers import ZImagePipeline

    root, _ = trained
    pipe = ZImagePipeline.from_pretrained(str(tiny_model_dir))
    turbo = pipe(
        "zfox, a cartoon fox head",
        width=64,
        height=64,
        num_inference_steps=8,
        guidance_scale=0.0,
        generator=torch.Generator().manual_seed(42),
    ).images[0]
    samples = root / "output" / "tiny" / "samples"
    pixels = {
        name: np.asarray(Image.open(samples / name))
        for name in ("000000000_00.png", "000000006_00.png", "000000006_02.png", "000000000_02.png")
    }
    assert np.abs(pixels["000000000_00.png"].astype(int) - np.asarray(turbo).astype(int)).max() <= 1  # plain Turbo
    assert np.array_equal(pixels["000000006_02.png"], pixels["000000000_00.png"])
    assert np.array_equal(pixels["000000000_02.png"], pixels["000000000_00.png"])
    assert not np.array_equal(pixels["000000006_00.png"], pixels["000000000_00.png"])  # the LoRA shows at scale 1


def test_lora_file_holds_only_targeted_modules_with_comfyui_names(trained, tiny_model_dir):
    root, _ = trained
    path = root / "output" / "tiny" / "tiny.safetensors"
    base = load_components(str(tiny_model_dir), parts=("transformer",)).transformer
    linears = {name: m for name, m in base.named_modules() if isinstance(m, nn.Linear)}
    targeted = {name for name in linears if re.fullmatch(DEFAULT_TARGET_REGEX, name)}
    dim = base.config.dim
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in keys}
    modules = set()
    for key in keys:
        m = re.fullmatch(r"diffusion_model\.(.+)\.(lora_A\.weight|lora_B\.weight|alpha)", key)
        assert m, key
        modules.add(m.group(1))
    assert modules == targeted  # the adapter's refiner modules never leak into the user's LoRA
    for name in modules:
        layer = linears[name]
        a, b = tensors[f"diffusion_model.{name}.lora_A.weight"], tensors[f"diffusion_model.{name}.lora_B.weight"]
        assert a.shape == (4, layer.in_features) and b.shape == (layer.out_features, 4)
        assert a.dtype == torch.float32 and float(tensors[f"diffusion_model.{name}.alpha"]) == 4.0
        # ComfyUI maps this diffusers path onto its own weights; the LoRA's output rows must fit there
        target = comfyui_target(name, dim)
        assert target is not None, name
        comfy_key, rows = target
        assert comfy_key.startswith("diffusion_model.") and not comfy_key.endswith((".to_q", ".to_k", ".to_v"))
        if rows is not None:
            assert rows[1] - rows[0] == b.shape[0] and rows[1] <= 3 * dim
    assert meta["zimage_lora.rank"] == "4" and meta["zimage_lora.arch"] == "zimage_turbo_adapter"
    assert meta["zimage_lora.trigger_word"] == "zfox" and meta["zimage_lora.step"] == "6"


def test_diffusers_load_lora_weights_equals_our_lora(trained, tiny_model_dir):
    from diffusers import ZImagePipeline

    root, _ = trained
    path = root / "output" / "tiny" / "tiny.safetensors"
    pipe = ZImagePipeline.from_pretrained(str(tiny_model_dir), torch_dtype=torch.float32)
    inputs = transformer_inputs(pipe.transformer)
    before = forward(pipe.transformer, inputs)
    pipe.load_lora_weights(str(path))
    theirs = forward(pipe.transformer, inputs)
    assert (theirs - before).abs().max() > 1e-3  # the LoRA changes the output

    ours_model = load_components(str(tiny_model_dir), parts=("transformer",)).transformer
    lora = read_lora(path)
    network.add_frozen_lora(ours_model, lora.modules, "check")
    ours = forward(ours_model, inputs)
    assert (ours - theirs).abs().max() < 1e-5

    # and both equal the plain math: W + alpha/rank * B @ A merged into a fresh copy of the base weights
    merged = load_components(str(tiny_model_dir), parts=("transformer",)).transformer
    layers = dict(merged.named_modules())
    with torch.no_grad():
        for name, w in lora.modules.items():
            layers[name].weight += w.delta()
    assert (forward(merged, inputs) - theirs).abs().max() < 1e-5


def test_adapter_off_is_exactly_turbo(tiny_model_dir, tiny_adapter):
    base = load_components(str(tiny_model_dir), parts=("transformer",)).transformer
    inputs = transformer_inputs(base)
    turbo = forward(base, inputs)
    model = load_components(str(tiny_model_dir), parts=("transformer",)).transformer
    adapter = read_lora(tiny_adapter)
    network.add_training_adapter(model, adapter.modules, str(tiny_adapter))
    network.add_user_lora(model, network.target_module_names(model, DEFAULT_TARGET_REGEX), 4, 4.0, seed=0)
    with_adapter = forward(model, inputs)
    assert (with_adapter - turbo).abs().max() > 1e-3
    network.activate(model, adapter_on=False)
    assert torch.equal(forward(model, inputs), turbo)  # bit for bit: nothing was merged
    trainable = network.named_user_parameters(model)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == list(trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())


def test_same_seed_same_bytes_and_sampling_does_not_disturb_training(make_job, tmp_path):
    override = {"train": {"optimizer": "adamw8bit", "steps": 4}, "save": {"every": 2}}
    a = run_job(make_job(override, folder=tmp_path / "a"))
    b = run_job(make_job(override, folder=tmp_path / "b"))
    sampled = merge_sample(override)
    c = run_job(make_job(sampled, folder=tmp_path / "c"))
    final = a.final_lora.read_bytes()
    assert final == b.final_lora.read_bytes()
    assert final == c.final_lora.read_bytes()
    assert c.samples  # sampling did run in the third job
    ckpt = "tiny_000000002.safetensors"
    assert (a.run_dir / ckpt).read_bytes() == (b.run_dir / ckpt).read_bytes()


def merge_sample(override):
    from conftest import merge

    return merge(override, {"sample": {"every": 1, "prompts": ["[trigger] on snow"]}})


def test_existing_run_needs_resume_or_overwrite(make_job):
    from zimage_lora.errors import UserError

    job = make_job({"train": {"steps": 2}})
    first = run_job(job)
    with pytest.raises(UserError, match="--resume.*--overwrite"):
        run_job(job)
    again = run_job(job, overwrite=True)
    assert again.final_lora.read_bytes() == first.final_lora.read_bytes()


def test_resume_continues_to_the_same_lora(make_job, tmp_path):
    from conftest import merge

    base = {"train": {"steps": 6}, "save": {"every": 2, "keep": 3}}
    straight = run_job(make_job(base, folder=tmp_path / "straight"))
    job = make_job(merge(base, {"train": {"steps": 4}}), folder=tmp_path / "split")
    run_job(job)
    resumed = train(load_job(job, ["train.steps=6"]), resume=True, progress=False)
    assert resumed.final_lora.read_bytes() == straight.final_lora.read_bytes()


def test_gradient_accumulation_averages(make_job, tmp_path):
    """Batch 2 and batch 1 x 2 accumulation steps see the same samples and noise: same loss, same gradient."""
    from importlib import resources

    from conftest import merge

    def square_dataset(root):
        bundled = resources.files("zimage_lora") / "demo" / "dataset"
        (root / "dataset").mkdir(parents=True)
        for name in ("fox_01.png", "fox_04.JPG", "fox_07.png"):  # all square: one 64x64 bucket
            (root / "dataset" / name).write_bytes((bundled / name).read_bytes())
        return root

    base = {"train": {"steps": 1, "max_grad_norm": 0.0}, "datasets": [{"path": "./dataset", "resolutions": [64]}]}
    runs = {}
    for name, batch, accum in [("batch", 2, 1), ("accum", 1, 2)]:
        folder = square_dataset(tmp_path / name)
        job = make_job(merge(base, {"train": {"batch_size": batch, "grad_accum": accum}}), folder=folder)
        result = run_job(job)
        runs[name] = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert runs["batch"]["loss"] == pytest.approx(runs["accum"]["loss"], rel=1e-5)
    assert runs["batch"]["grad_norm"] == pytest.approx(runs["accum"]["grad_norm"], rel=1e-4)
    assert runs["batch"]["grad_norm"] > 0


def test_bf16_base_weights_train_an_fp32_lora(make_job):
    """The GPU setting on the CPU: base weights in bf16 under autocast, the LoRA kept and saved in fp32."""
    result = run_job(make_job({"train": {"steps": 3, "mixed_precision": "bf16"}, "save": {"dtype": "bf16"}}))
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["grad_norm"] > 0 for r in lines)
    assert json.loads((result.run_dir / "run.json").read_text())["precision"] == "bf16"
    state = torch.load(result.run_dir / "state" / "000000003.pt", weights_only=False)
    assert all(t.dtype == torch.float32 for t in state["lora"].values())  # the master copy stays fp32
    with safe_open(str(result.final_lora), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # saved as save.dtype asks


def test_text_and_latent_caches_change_nothing_but_the_work(make_job, tmp_path):
    plain = {"train": {"steps": 3, "cache_text_embeddings": False}, "datasets": [{"cache_latents": False}]}
    a = run_job(make_job(plain, folder=tmp_path / "plain"))
    cached = {"train": {"steps": 3, "cache_text_embeddings": True}, "datasets": [{"cache_latents": True}]}
    b = run_job(make_job(cached, folder=tmp_path / "cached"))
    # the caching pass encodes latents in batches, the uncached run one by one: equal up to float rounding
    assert training_differences(a, b) == []
    log = (b.run_dir / "train.log").read_text()
    assert "the text encoder left the device" in log and "latents: 3 encoded, 0 reused" in log
    assert "latents:" not in (a.run_dir / "train.log").read_text()
    # a second job on the same data reuses every cached latent
    c = run_job(make_job(cached, folder=tmp_path / "cached"), overwrite=True)
    assert "latents: 0 encoded, 3 reused" in (c.run_dir / "train.log").read_text()
    assert c.final_lora.read_bytes() == b.final_lora.read_bytes()


def test_unload_text_encoder_trains_on_the_trigger_word_alone(make_job, tmp_path):
    unloaded = run_job(
        make_job(
            {"train": {"steps": 3, "cache_text_embeddings": False, "unload_text_encoder": True}},
            folder=tmp_path / "unload",
        )
    )
    assert "captions ignored" in (unloaded.run_dir / "train.log").read_text()
    # the same images whose captions say only the trigger word, with ordinary caching
    folder = tmp_path / "trigger_only"
    job = make_job({"train": {"steps": 3}}, folder=folder)
    for caption in (folder / "dataset").glob("*.txt"):
        caption.write_text("[trigger]")
    trigger_only = run_job(job)
    normal = run_job(make_job({"train": {"steps": 3}}, folder=tmp_path / "normal"))
    assert unloaded.final_lora.read_bytes() == trigger_only.final_lora.read_bytes()
    assert unloaded.final_lora.read_bytes() != normal.final_lora.read_bytes()
