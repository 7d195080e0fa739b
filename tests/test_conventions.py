"""Z-Image's conventions, anchored on diffusers rather than on our own reading of them.

1. The pipeline's own trajectory: at each of its steps, the time it feeds the transformer is our ``model_time`` of
   the scheduler's sigma, and the velocity its scheduler integrates is our ``velocity_from_output`` of the
   transformer's output. Our noising and target agree with the scheduler's Euler step. Flip the time input or the
   output sign in our code and this fails.
2. Learning: a LoRA overfitted on one image through our recipe makes ``ZImagePipeline`` (Turbo settings: 8 forwards,
   no CFG, the LoRA loaded with ``load_lora_weights``) reproduce that image better than the base model by a margin;
   with the output sign flipped in training it does not.

Why (2) does not flip the time input too: with a single memorised image the training target ``noise - x0`` points
along ``x_t - x0`` at every noise level, and the noise level can be read off ``x_t`` itself, so a LoRA fits the image
whatever time it is told (with every Linear trainable it can even remap the sinusoidal time features exactly).
Measured on this tiny model: a time-flipped run gained +5.4 dB like the correct one. (1) is what pins the time.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

from zimage_lora.config import load_job
from zimage_lora.data.dataset import crop_to_bucket, load_rgb
from zimage_lora.models.vae import decode_latents, encode_latents, pil_to_tensor
from zimage_lora.training import flow
from zimage_lora.training.recipe import train

PROMPT = "zfox, a cartoon fox head on a blue sky"
PSNR_MARGIN_DB = 3.0  # measured: +5.1 dB with the right conventions, -0.7 dB with the sign flipped


def test_pipeline_trajectory_uses_our_time_and_sign(tiny_model_dir):
    pipe = ZImagePipeline.from_pretrained(str(tiny_model_dir))
    calls = []

    def record(module, args, kwargs, output):
        calls.append((args[0][0].detach().clone(), args[1].detach().clone(), output[0][0].detach().clone()))

    handle = pipe.transformer.register_forward_hook(record, with_kwargs=True)
    steps = []
    pipe(
        PROMPT,
        height=64,
        width=64,
        num_inference_steps=8,
        guidance_scale=0.0,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        callback_on_step_end=lambda p, i, t, kw: steps.append(kw["latents"].clone()) or {},
    )
    handle.remove()
    sigmas = pipe.scheduler.sigmas
    assert len(calls) == 8  # "8 steps" means 8 transformer forwards
    for i, (x, time, out) in enumerate(calls):
        torch.testing.assert_close(time, flow.model_time(sigmas[i].expand(1)), atol=1e-6, rtol=0)
        after = steps[i][0]
        expected = x[:, 0].float() + (sigmas[i + 1] - sigmas[i]) * flow.velocity_from_output(out[:, 0].float())
        torch.testing.assert_close(after, expected, atol=1e-5, rtol=1e-5)


def test_noising_and_target_follow_the_scheduler():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=0.0)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 16, 4, 4, generator=g), torch.randn(1, 16, 4, 4, generator=g)
    sig = scheduler.sigmas
    for i, t in enumerate(scheduler.timesteps):
        x_t = flow.noisy_latents(x0, noise, sig[i].expand(1))
        scheduler._step_index = i
        nxt = scheduler.step(flow.flow_target(x0, noise), t, x_t, return_dict=False)[0]
        # the exact velocity moves the noisy latent to the next noise level of the same (x0, noise) pair
        torch.testing.assert_close(nxt, flow.noisy_latents(x0, noise, sig[i + 1].expand(1)), atol=1e-5, rtol=0)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a - b) ** 2)))


@pytest.mark.parametrize("variant", ["correct", "sign_flipped"])
def test_overfit_lora_reproduces_the_image_in_diffusers(variant, tmp_path, tiny_model_dir, monkeypatch):
    from conftest import demo_dataset

    dataset = tmp_path / "dataset"
    demo_dataset(dataset, 1)
    (dataset / "fox_01.txt").write_text(PROMPT)
    job = {
        "version": 1,
        "job": {"name": "overfit", "trigger_word": "zfox", "output_dir": "./output", "device": "cpu", "seed": 1},
        "model": {"arch": "zimage_turbo", "name_or_path": str(tiny_model_dir)},
        "target": {"rank": 16, "modules": ".*"},  # every Linear: enough capacity to memorise one image
        "save": {"dtype": "fp32", "every": 100000, "keep": 1},
        "train": {
            "steps": 1000,
            "optimizer": "adamw",
            "lr": 3e-3,
            "weight_decay": 0.0,
            "timestep_type": "shift",
            "gradient_checkpointing": False,
            "cache_text_embeddings": True,
        },
        "datasets": [{"path": "./dataset", "resolutions": [64], "caption_dropout": 0.0}],
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    if variant == "sign_flipped":
        monkeypatch.setattr(flow, "velocity_from_output", lambda output: output)
    result = train(load_job(tmp_path / "job.yaml"), progress=False)
    monkeypatch.undo()

    pipe = ZImagePipeline.from_pretrained(str(tiny_model_dir))

    def generate() -> np.ndarray:
        return pipe(
            PROMPT,
            height=64,
            width=64,
            num_inference_steps=8,
            guidance_scale=0.0,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images[0]

    with torch.no_grad():  # the best the VAE can do: the image encoded and decoded again
        pixels = pil_to_tensor(crop_to_bucket(load_rgb(dataset / "fox_01.png"), (64, 64)))[None]
        target = decode_latents(pipe.vae, encode_latents(pipe.vae, pixels))[0].permute(1, 2, 0).numpy()
    target = (target / 2 + 0.5).clip(0, 1)
    base = psnr(generate(), target)
    pipe.load_lora_weights(str(result.final_lora))
    with_lora = psnr(generate(), target)
    if variant == "correct":
        assert with_lora >= base + PSNR_MARGIN_DB, (base, with_lora)
    else:
        assert with_lora < base + PSNR_MARGIN_DB, (base, with_lora)
