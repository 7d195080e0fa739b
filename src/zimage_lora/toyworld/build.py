"""``zimage-lora toy-world build OUT``: train the toy Z-Image family from nothing, stage by stage.

Stages, each in ``OUT/<stage>/`` with a ``done.json`` (its numbers) when it finished, so a rerun skips what is done
and a killed stage continues from its last checkpoint (saved every few minutes):

1. ``vae``: the VAE on rendered pictures, striped shapes included (so it can draw the demo's concept later); then
   its encoder's mean output is rescaled (and the decoder's input weights by the inverse, which is exact) so that
   the real scaling and shift factors give latents of unit variance.
2. ``latents``: the training pictures (plain shapes only: the base never sees stripes) encoded once, with their
   caption embeddings from the random, frozen text encoder.
3. ``base``: the toy base transformer, trained with flow matching (caption dropout for CFG), an EMA of its weights.
4. ``teacher``: the base's own samples at its registry setting (30 steps, CFG 4, shift 6), with their noise.
5. ``turbo``: the toy Turbo, distilled from the base: half of each batch learns the straight path from a teacher
   pair's noise to the base's guided sample (step distillation), half the base's guided prediction on the data's
   noisy latents (guidance distillation); it samples at 8 steps without CFG, shift 3.
6. ``adapter``: the toy training adapter, a LoRA on the Turbo trained to make it predict what the base predicts (it
   de-distills the Turbo when applied at +1, as Ostris's adapter does); our LoRA file layout.
7. ``deturbo``: the Turbo with the adapter merged in, saved as its own transformer.
8. ``release``: the shipped folders in diffusers layout and half precision: ``turbo/`` (every part), ``base/`` and
   ``deturbo/`` (their transformer and scheduler; ``parts_from.json`` points at ``../turbo`` for the rest) and
   ``training_adapter.safetensors``.
9. ``evaluate``: every released model loaded through the normal loader, sampled at its arch's setting on fixed
   seeds and scored (``toyworld/score.py``); the VAE's reconstructions scored too.

Each training stage stops at its step budget or its time cap, whichever comes first. ``BuildConfig.tiny()`` runs
every stage in seconds (the tests use it); ``BuildConfig.full()`` is the shipped build.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from zimage_lora.files import atomic_write_bytes
from zimage_lora.models.arch import ARCHS, BASE, DETURBO, TURBO
from zimage_lora.models.refs import TOY_MARKER
from zimage_lora.toyworld import score, world
from zimage_lora.toyworld.models import toy_scheduler, toy_text_encoder, toy_tokenizer, toy_transformer, toy_vae

STAGES = ("vae", "latents", "base", "teacher", "turbo", "adapter", "deturbo", "release", "evaluate")
ADAPTER_TARGETS = (
    r"^(layers|noise_refiner|context_refiner)\.\d+\.(attention\.(to_q|to_k|to_v|to_out\.0)|feed_forward\.(w1|w2|w3))$"
)
WORLD_NAME = "shapes-128-v1"
TURBO_SHIFT = 3.0  # sampling and the Turbo's training noise levels (the registry's Turbo shift)
BASE_TRAIN_SHIFT = 3.0  # the base trains on uniform draws shifted toward noise: what its shift-6 sampling visits


@dataclass(frozen=True)
class BuildConfig:
    seed: int = 0
    bf16: bool = True  # autocast on the CPU (the weights and the optimizer stay in float32)
    compile: bool = True  # the transformer's blocks, for the base and the Turbo
    checkpoint_minutes: float = 5.0
    # vae (0.66 s a step here)
    vae_batch: int = 16
    vae_steps: int = 1800
    vae_minutes: float = 22.0
    vae_lr: float = 2e-3
    vae_stripes: float = 0.3  # share of striped shapes the VAE sees
    # latents
    dataset_size: int = 20000
    # base (about 1 s a step here)
    base_batch: int = 64
    base_steps: int = 3600
    base_minutes: float = 62.0
    base_lr: float = 1e-3
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    # teacher and turbo
    teacher_pairs: int = 2048
    teacher_batch: int = 128
    turbo_batch: int = 64
    turbo_steps: int = 1040
    turbo_minutes: float = 25.0
    turbo_lr: float = 3e-4
    # adapter
    adapter_rank: int = 16
    adapter_batch: int = 64
    adapter_steps: int = 520
    adapter_minutes: float = 12.5
    adapter_lr: float = 1e-3
    # evaluate
    eval_count: int = 192

    @classmethod
    def full(cls, seed: int = 0) -> BuildConfig:
        return cls(seed=seed)

    @classmethod
    def tiny(cls, seed: int = 0) -> BuildConfig:
        """Every stage in seconds: for the tests and to try the pipeline; the models learn nothing useful."""
        return cls(
            seed=seed, bf16=False, compile=False, vae_batch=2, vae_steps=3, dataset_size=16, base_batch=4, base_steps=3,
            teacher_pairs=4, teacher_batch=4, turbo_batch=4, turbo_steps=3, adapter_rank=2, adapter_batch=4,
            adapter_steps=3, eval_count=3, ema_decay=0.5,
        )  # fmt: skip


Log = Callable[[str], None]


def build(out: Path, config: BuildConfig, log: Log = print, until: str | None = None) -> dict:
    """Run the stages not done yet (up to ``until``); returns every stage's numbers."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    results = {}
    for stage in STAGES:
        done = out / stage / "done.json"
        if done.is_file():
            results[stage] = json.loads(done.read_text())
            log(f"{stage}: done already")
        else:
            (out / stage).mkdir(exist_ok=True)
            started = time.monotonic()
            log(f"{stage}: started")
            torch.manual_seed(config.seed * 1000 + STAGES.index(stage))
            result = _STAGES[stage](out, config, log)
            result["seconds"] = round(time.monotonic() - started, 1)
            atomic_write_bytes(done, (json.dumps(result, indent=2) + "\n").encode())
            results[stage] = result
            log(f"{stage}: {json.dumps(result)}")
        if stage == until:
            break
    return results


# --- shared pieces ----------------------------------------------------------------------------------------------------


def _autocast(config: BuildConfig):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16)


def _to_pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _to_images(pixels: torch.Tensor) -> np.ndarray:
    unit = (pixels.float() * 0.5 + 0.5).clamp(0, 1)
    return (unit.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()


@dataclass
class _Run:
    """A training stage's loop: step budget, time cap, periodic checkpoints it resumes from, a log line now and
    then."""

    folder: Path
    config: BuildConfig
    log: Log
    steps: int
    minutes: float
    state: dict  # name -> object with state_dict / load_state_dict (models, optimizers, EMA shadows)
    step: int = 0
    elapsed: float = 0.0
    losses: list = field(default_factory=list)

    def __post_init__(self):
        path = self.folder / "checkpoint.pt"
        if path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=False)
            for name, obj in self.state.items():
                obj.load_state_dict(saved[name])
            self.step, self.elapsed = saved["step"], saved["elapsed"]
            self.log(f"  resumed at step {self.step} ({self.elapsed / 60:.1f} min in)")

    def run(self, step_fn: Callable[[int], float]) -> dict:
        started, last_save = time.monotonic() - self.elapsed, time.monotonic()
        while self.step < self.steps and time.monotonic() - started < self.minutes * 60:
            self.losses.append(step_fn(self.step))
            self.step += 1
            if self.step % 100 == 0 or self.step == self.steps:
                window = self.losses[-100:]
                rate = self.step / max(1e-9, time.monotonic() - started)
                self.log(f"  step {self.step}: loss {sum(window) / len(window):.4f} ({rate:.2f} steps/s)")
            if time.monotonic() - last_save > self.config.checkpoint_minutes * 60:
                self.elapsed = time.monotonic() - started
                self._save()
                last_save = time.monotonic()
        self.elapsed = time.monotonic() - started
        tail = self.losses[-200:]
        return {"steps": self.step, "minutes": round(self.elapsed / 60, 2), "final_loss": sum(tail) / max(1, len(tail))}

    def _save(self) -> None:
        saved = {name: obj.state_dict() for name, obj in self.state.items()}
        saved.update(step=self.step, elapsed=self.elapsed)
        import io

        buffer = io.BytesIO()
        torch.save(saved, buffer)
        atomic_write_bytes(self.folder / "checkpoint.pt", buffer.getvalue())


class _EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, v in model.state_dict().items():
            self.shadow[k].mul_(self.decay).add_(v.detach().float(), alpha=1 - self.decay)

    def state_dict(self) -> dict:
        return self.shadow

    def load_state_dict(self, state: dict) -> None:
        self.shadow = {k: v.clone() for k, v in state.items()}


def _optimizer(params, lr: float):
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)


def _warmup_cosine(optimizer, total: int, warmup: int = 200):
    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (i - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _load_transformer(path: Path):
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel.from_pretrained(path, torch_dtype=torch.float32)


def _flow_inputs(x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> list[torch.Tensor]:
    s = sigma.view(-1, 1, 1, 1)
    return list(((1 - s) * x0 + s * noise).unsqueeze(2).unbind(0))


def _predict(model, x_t: list[torch.Tensor], sigma: torch.Tensor, caps: list[torch.Tensor]) -> torch.Tensor:
    """The model's output (the negative velocity) as a (B, 16, h, w) tensor."""
    out = model(x_t, 1.0 - sigma, caps, return_dict=False)[0]
    return torch.stack([o.squeeze(1).float() for o in out])


def _shifted(u: torch.Tensor, shift: float) -> torch.Tensor:
    from zimage_lora.training.flow import shift_sigma

    return shift_sigma(u, shift).clamp(1e-3, 1.0)


@torch.no_grad()
def sample_latents(
    model,
    caps: list[torch.Tensor],
    empty: torch.Tensor,
    seeds: list[int],
    steps: int,
    guidance: float,
    shift: float,
    batch: int = 64,
    autocast=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(initial noise, final latents) of a batch of images: ``sampling/sampler.denoise``'s schedule, noise, Euler
    steps and classic CFG, batched (the tests check one image against ``denoise``)."""
    from zimage_lora.sampling.sampler import SampleSettings, default_sigmas, initial_noise
    from zimage_lora.training.flow import shift_sigma

    sigmas = shift_sigma(torch.tensor(default_sigmas(steps)), shift).tolist() + [0.0]
    starts, finals = [], []
    for begin in range(0, len(seeds), batch):
        chunk = seeds[begin : begin + batch]
        x = torch.cat([initial_noise(SampleSettings(world.SIZE, world.SIZE, steps, guidance, s)) for s in chunk])
        starts.append(x.clone())
        cond = caps[begin : begin + len(chunk)]
        cfg = guidance > 1.0
        for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            inputs = list(x.unsqueeze(2).unbind(0))
            all_caps = cond + ([empty] * len(chunk) if cfg else [])
            sigma = torch.full((len(all_caps),), s)
            with autocast() if autocast is not None else torch.autocast("cpu", enabled=False):
                pred = _predict(model, inputs * (2 if cfg else 1), sigma, all_caps)
            if cfg:
                pos, neg = pred[: len(chunk)], pred[len(chunk) :]
                pred = neg + guidance * (pos - neg)
            x = x + (s_next - s) * (-pred)
        finals.append(x)
    return torch.cat(starts), torch.cat(finals)


def _text_cache(folder: Path):
    saved = torch.load(folder / "text.pt", weights_only=False)
    return saved["captions"], saved["embeddings"]


def _embed(out: Path, captions: list[str]) -> list[torch.Tensor]:
    """Embeddings of ``captions`` from the build's text encoder (the one that ships)."""
    from zimage_lora.models.text import encode_prompts

    tokenizer = toy_tokenizer()
    encoder = _text_encoder(out)
    return encode_prompts(tokenizer, encoder, captions, batch_size=64)


def _text_encoder(out: Path):
    path = out / "latents" / "text_encoder.pt"
    encoder = toy_text_encoder(len(toy_tokenizer()))
    encoder.load_state_dict(torch.load(path, weights_only=True))
    return encoder.eval().requires_grad_(False)


def _vae(out: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(out / "vae" / "model", torch_dtype=torch.float32).eval().requires_grad_(False)


# --- 1. the VAE -------------------------------------------------------------------------------------------------------


def _stage_vae(out: Path, config: BuildConfig, log: Log) -> dict:
    folder = out / "vae"
    vae = toy_vae().train()
    optimizer = _optimizer(vae.parameters(), config.vae_lr)
    schedule = _warmup_cosine(optimizer, config.vae_steps, warmup=min(200, config.vae_steps // 10 + 1))
    run = _Run(folder, config, log, config.vae_steps, config.vae_minutes, {"vae": vae, "opt": optimizer,
                                                                             "sched": schedule})  # fmt: skip

    def step(i: int) -> float:
        scenes = world.scenes(config.vae_batch, seed=config.seed * 10_000_019 + i, stripes=config.vae_stripes)
        pixels = _to_pixels(world.images(scenes))
        with _autocast(config):
            latent = vae.encode(pixels).latent_dist.mode()
            rebuilt = vae.decode(latent).sample
        loss = (rebuilt.float() - pixels).abs().mean() + ((rebuilt.float() - pixels) ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    result = run.run(step)
    vae.eval()
    # unit-variance latents under the real factors: rescale the encoder's mean output, undo it at the decoder's input
    scenes = world.scenes(256 if config.dataset_size > 100 else 8, seed=config.seed + 77, stripes=config.vae_stripes)
    with torch.no_grad():
        mode = torch.cat([vae.encode(_to_pixels(world.images(scenes[i : i + 32]))).latent_dist.mode()
                          for i in range(0, len(scenes), 32)])  # fmt: skip
        _rescale_latents(vae, mode)
    vae.save_pretrained(folder / "model", safe_serialization=True)
    result.update(_vae_quality(vae, config))
    return result


def _rescale_latents(vae, mode: torch.Tensor) -> None:
    """Make ``(mode - shift) * scaling`` have mean 0 and std 1 per channel: exact (encoder out, decoder in)."""
    scaling, shift = vae.config.scaling_factor, vae.config.shift_factor
    mean = mode.mean(dim=(0, 2, 3))
    std = mode.std(dim=(0, 2, 3)).clamp_min(1e-6)
    a = 1.0 / (std * scaling)  # new mode = a * (mode - mean) + shift  ->  (new - shift) * scaling ~ N(0, 1)
    b = shift - a * mean
    channels = vae.config.latent_channels
    conv_out, conv_in = vae.encoder.conv_out, vae.decoder.conv_in
    with torch.no_grad():
        conv_out.weight[:channels] *= a.view(-1, 1, 1, 1)
        conv_out.bias[:channels] = conv_out.bias[:channels] * a + b
        # the decoder sees z' = a z + b; feed it (z' - b) / a, folded into its first convolution
        w = conv_in.weight.clone()
        conv_in.bias += -(w * (b / a).view(1, -1, 1, 1)).sum(dim=(1, 2, 3))
        conv_in.weight.copy_(w / a.view(1, -1, 1, 1))


@torch.no_grad()
def _vae_quality(vae, config: BuildConfig) -> dict:
    scenes = world.scenes(128 if config.dataset_size > 100 else 4, seed=config.seed + 99)
    images = world.images(scenes)
    rebuilt = []
    for i in range(0, len(scenes), 32):
        pixels = _to_pixels(images[i : i + 32])
        rebuilt.append(_to_images(vae.decode(vae.encode(pixels).latent_dist.mode()).sample))
    rebuilt = np.concatenate(rebuilt)
    mse = ((rebuilt.astype(np.float64) - images) ** 2).mean()
    striped = world.scenes(64 if config.dataset_size > 100 else 2, seed=config.seed + 98, stripes=1.0)
    stripe_images = _to_images(vae.decode(vae.encode(_to_pixels(world.images(striped))).latent_dist.mode()).sample)
    return {
        "psnr_db": round(10 * math.log10(255**2 / max(mse, 1e-9)), 2),
        "reconstruction_accuracy": score.accuracy(rebuilt, scenes),
        "stripes_kept": score.concept_score(stripe_images, striped),
    }


# --- 2. latents and captions ------------------------------------------------------------------------------------------


def _stage_latents(out: Path, config: BuildConfig, log: Log) -> dict:
    folder = out / "latents"
    vae = _vae(out)
    scenes = world.scenes(config.dataset_size, seed=config.seed + 1)
    encoded = []
    with torch.no_grad():
        for i in range(0, len(scenes), 64):
            pixels = _to_pixels(world.images(scenes[i : i + 64]))
            mode = vae.encode(pixels).latent_dist.mode()
            encoded.append(((mode - vae.config.shift_factor) * vae.config.scaling_factor).to(torch.float16))
            if i % 6400 == 0:
                log(f"  encoded {i} of {len(scenes)}")
    latents = torch.cat(encoded)
    torch.manual_seed(config.seed + 5)
    encoder = toy_text_encoder(len(toy_tokenizer()))
    torch.save(encoder.state_dict(), folder / "text_encoder.pt")
    captions = sorted({s.caption() for s in scenes}) + [""]
    index = {c: i for i, c in enumerate(captions)}
    torch.save(
        {"latents": latents, "caption_ids": torch.tensor([index[s.caption()] for s in scenes])},
        folder / "data.pt",
    )
    torch.save({"captions": captions, "embeddings": _embed(out, captions)}, folder / "text.pt")
    return {"images": len(scenes), "captions": len(captions) - 1, "latent_std": round(float(latents.float().std()), 3)}


def _data(out: Path):
    saved = torch.load(out / "latents" / "data.pt", weights_only=False)
    captions, embeddings = _text_cache(out / "latents")
    return saved["latents"], saved["caption_ids"], captions, embeddings


# --- 3. the base ------------------------------------------------------------------------------------------------------


def _stage_base(out: Path, config: BuildConfig, log: Log) -> dict:
    folder = out / "base"
    latents, caption_ids, captions, embeddings = _data(out)
    empty = embeddings[captions.index("")]
    model = toy_transformer().train()
    ema = _EMA(model, config.ema_decay)
    optimizer = _optimizer(model.parameters(), config.base_lr)
    schedule = _warmup_cosine(optimizer, config.base_steps)
    state = {"model": model, "ema": ema, "opt": optimizer, "sched": schedule}
    run = _Run(folder, config, log, config.base_steps, config.base_minutes, state)
    if config.compile:
        from zimage_lora.models.compile import compile_blocks

        compile_blocks(model, torch.device("cpu"))
    g = torch.Generator().manual_seed(config.seed + 3)

    def step(i: int) -> float:
        idx = torch.randint(len(latents), (config.base_batch,), generator=g)
        x0 = latents[idx].float()
        flip = torch.rand(len(idx), generator=g) < 0.5
        x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(-1), x0)
        drop = torch.rand(len(idx), generator=g) < config.caption_dropout
        caps = [empty if d else embeddings[int(c)] for c, d in zip(caption_ids[idx], drop, strict=True)]
        sigma = _shifted(torch.rand(len(idx), generator=g), BASE_TRAIN_SHIFT)
        noise = torch.randn(x0.shape, generator=g)
        with _autocast(config):
            pred = _predict(model, _flow_inputs(x0, sigma, noise), sigma, caps)
        loss = ((-pred - (noise - x0)) ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model)
        return float(loss.detach())

    result = run.run(step)
    final = toy_transformer()
    final.load_state_dict({k: v for k, v in ema.shadow.items()})
    final.save_pretrained(folder / "model", safe_serialization=True)
    return result


# --- 4. the teacher's samples and 5. the Turbo -----------------------------------------------------------------------


def _stage_teacher(out: Path, config: BuildConfig, log: Log) -> dict:
    base = _load_transformer(out / "base" / "model").eval()
    _, _, captions, embeddings = _data(out)
    empty = embeddings[captions.index("")]
    rng = np.random.default_rng(config.seed + 11)
    chosen = rng.integers(len(captions) - 1, size=config.teacher_pairs)  # the last caption is the empty one
    arch = ARCHS[BASE]
    seeds = [1_000_000 + i for i in range(config.teacher_pairs)]
    started = time.monotonic()
    noise, x0 = [], []
    for begin in range(0, len(seeds), config.teacher_batch):
        part = slice(begin, begin + config.teacher_batch)
        n, x = sample_latents(
            base, [embeddings[int(c)] for c in chosen[part]], empty, seeds[part], arch.sample_steps,
            arch.sample_guidance, arch.shift, batch=config.teacher_batch, autocast=lambda: _autocast(config),
        )  # fmt: skip
        noise.append(n)
        x0.append(x)
        log(f"  {begin + len(seeds[part])} of {len(seeds)} teacher samples ({time.monotonic() - started:.0f} s)")
    torch.save(
        {"noise": torch.cat(noise), "x0": torch.cat(x0), "caption_ids": torch.from_numpy(chosen)},
        out / "teacher" / "pairs.pt",
    )
    return {"pairs": len(seeds), "steps": arch.sample_steps, "guidance": arch.sample_guidance, "shift": arch.shift}


def _stage_turbo(out: Path, config: BuildConfig, log: Log) -> dict:
    """Half of each batch follows the straight path from a teacher pair's noise to the base's guided sample (step
    distillation); the other half matches the base's guided prediction on the data's noisy latents (guidance
    distillation, which keeps the student right on noise it has not seen)."""
    folder = out / "turbo"
    pairs = torch.load(out / "teacher" / "pairs.pt", weights_only=False)
    latents, caption_ids, captions, embeddings = _data(out)
    empty = embeddings[captions.index("")]
    base = _load_transformer(out / "base" / "model").eval().requires_grad_(False)
    guidance = ARCHS[BASE].sample_guidance
    model = _load_transformer(out / "base" / "model").train()
    ema = _EMA(model, config.ema_decay)
    optimizer = _optimizer(model.parameters(), config.turbo_lr)
    schedule = _warmup_cosine(optimizer, config.turbo_steps, warmup=100)
    state = {"model": model, "ema": ema, "opt": optimizer, "sched": schedule}
    run = _Run(folder, config, log, config.turbo_steps, config.turbo_minutes, state)
    if config.compile:
        from zimage_lora.models.compile import compile_blocks

        compile_blocks(model, torch.device("cpu"))
    g = torch.Generator().manual_seed(config.seed + 13)
    half = max(1, config.turbo_batch // 2)

    def step(i: int) -> float:
        idx = torch.randint(len(pairs["x0"]), (half,), generator=g)
        x0, noise = pairs["x0"][idx], pairs["noise"][idx]
        caps = [embeddings[int(c)] for c in pairs["caption_ids"][idx]]
        sigma = _shifted(torch.rand(half, generator=g), TURBO_SHIFT)  # the levels 8-step sampling visits
        jdx = torch.randint(len(latents), (half,), generator=g)
        data_x0, data_noise = latents[jdx].float(), torch.randn((half, *latents.shape[1:]), generator=g)
        data_caps = [embeddings[int(c)] for c in caption_ids[jdx]]
        data_sigma = _shifted(torch.rand(half, generator=g), TURBO_SHIFT)
        data_inputs = _flow_inputs(data_x0, data_sigma, data_noise)
        with _autocast(config):
            with torch.no_grad():
                teacher = _predict(base, data_inputs * 2, data_sigma.repeat(2), data_caps + [empty] * half)
                target = teacher[half:] + guidance * (teacher[:half] - teacher[half:])  # classic CFG
            pred = _predict(model, _flow_inputs(x0, sigma, noise) + data_inputs, torch.cat([sigma, data_sigma]),
                            caps + data_caps)  # fmt: skip
        straight = ((-pred[:half] - (noise - x0)) ** 2).mean()
        guided = ((pred[half:] - target) ** 2).mean()
        loss = straight + guided
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model)
        return float(loss.detach())

    result = run.run(step)
    final = toy_transformer()
    final.load_state_dict(ema.shadow)
    final.save_pretrained(folder / "model", safe_serialization=True)
    return result


# --- 6. the training adapter and 7. De-Turbo -------------------------------------------------------------------------


def _stage_adapter(out: Path, config: BuildConfig, log: Log) -> dict:
    base = _load_transformer(out / "base" / "model")
    turbo = _load_transformer(out / "turbo" / "model")
    return train_adapter(base, turbo, _data(out), out / "adapter", config, config.adapter_steps, log)


def train_adapter(base, turbo, data, folder: Path, config: BuildConfig, steps: int, log: Log) -> dict:
    """A LoRA on ``turbo`` that makes it predict what ``base`` predicts, saved in ``folder`` as
    ``training_adapter.safetensors``; ``data`` is ``(latents, caption_ids, captions, embeddings)`` (the ``latents``
    stage's)."""
    from zimage_lora.lora import network
    from zimage_lora.lora.io import save_lora

    latents, caption_ids, captions, embeddings = data
    empty = embeddings[captions.index("")]
    folder.mkdir(parents=True, exist_ok=True)
    base.eval().requires_grad_(False)
    turbo.requires_grad_(False)
    names = network.target_module_names(turbo, ADAPTER_TARGETS)
    rank = config.adapter_rank
    network.add_user_lora(turbo, names, rank, float(rank), seed=config.seed + 17)
    turbo.train()
    params = network.user_parameters(turbo)
    optimizer = _optimizer(params, config.adapter_lr)
    schedule = _warmup_cosine(optimizer, steps, warmup=min(100, steps // 5 + 1))

    class _Lora:  # the LoRA's tensors as a checkpointable object
        def state_dict(self):
            return {k: v.detach().clone() for k, v in network.named_user_parameters(turbo).items()}

        def load_state_dict(self, state):
            with torch.no_grad():
                for k, v in network.named_user_parameters(turbo).items():
                    v.copy_(state[k])

    run = _Run(folder, config, log, steps, config.adapter_minutes,
               {"lora": _Lora(), "opt": optimizer, "sched": schedule})  # fmt: skip
    g = torch.Generator().manual_seed(config.seed + 19)

    def step(i: int) -> float:
        idx = torch.randint(len(latents), (config.adapter_batch,), generator=g)
        x0 = latents[idx].float()
        drop = torch.rand(len(idx), generator=g) < config.caption_dropout
        caps = [empty if d else embeddings[int(c)] for c, d in zip(caption_ids[idx], drop, strict=True)]
        sigma = _shifted(torch.rand(len(idx), generator=g), TURBO_SHIFT)
        noise = torch.randn(x0.shape, generator=g)
        inputs = _flow_inputs(x0, sigma, noise)
        with _autocast(config):
            with torch.no_grad():
                target = _predict(base, inputs, sigma, caps)
            pred = _predict(turbo, inputs, sigma, caps)
        loss = ((pred - target) ** 2).mean()  # Turbo + adapter predicts what the undistilled base predicts
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    result = run.run(step)
    meta = {"zimage_lora.kind": "toy training adapter (de-distills the toy Turbo at +1)", "rank": str(rank),
            "steps": str(run.step)}  # fmt: skip
    save_lora(folder / "training_adapter.safetensors", network.user_lora_weights(turbo), "fp32", meta)
    return result


def encoded_data(models: Path, count: int, seed: int) -> tuple:
    """``count`` plain toy-world pictures encoded with the shipped VAE and text encoder: the ``latents`` stage's data
    for work after the build (a second adapter, for the A/B experiment)."""
    from zimage_lora.models.loading import load_components
    from zimage_lora.models.text import encode_prompts

    comps = load_components(str(models / "turbo"), parts=("text_encoder", "tokenizer", "vae"))
    scenes = world.scenes(count, seed=seed)
    vae = comps.vae
    with torch.no_grad():
        latents = torch.cat(
            [(vae.encode(_to_pixels(world.images(scenes[i : i + 64]))).latent_dist.mode() - vae.config.shift_factor)
             * vae.config.scaling_factor for i in range(0, count, 64)]
        ).to(torch.float16)  # fmt: skip
    captions = sorted({s.caption() for s in scenes}) + [""]
    index = {c: i for i, c in enumerate(captions)}
    embeddings = encode_prompts(comps.tokenizer, comps.text_encoder, captions, batch_size=64)
    return latents, torch.tensor([index[s.caption()] for s in scenes]), captions, embeddings


def _stage_deturbo(out: Path, config: BuildConfig, log: Log) -> dict:
    from zimage_lora.lora import network
    from zimage_lora.lora.io import read_lora
    from zimage_lora.lora.variants import fuse_lora

    turbo = _load_transformer(out / "turbo" / "model").eval()
    adapter = read_lora(out / "adapter" / "training_adapter.safetensors", network.linear_module_names(turbo))
    fuse_lora(turbo, adapter.modules, 1.0)
    turbo.save_pretrained(out / "deturbo" / "model", safe_serialization=True)
    return {"merged_modules": len(adapter.modules)}


# --- 8. release and 9. evaluate --------------------------------------------------------------------------------------


def _stage_release(out: Path, config: BuildConfig, log: Log) -> dict:
    from diffusers import ZImagePipeline

    release = out / "release"
    shutil.rmtree(release, ignore_errors=True)
    half = torch.float16
    tokenizer = toy_tokenizer()
    pipe = ZImagePipeline(  # the transformer in half precision; the small VAE and text encoder as trained
        scheduler=toy_scheduler(ARCHS[TURBO].shift),
        vae=_vae(out),
        text_encoder=_text_encoder(out),
        tokenizer=tokenizer,
        transformer=_load_transformer(out / "turbo" / "model").to(half),
    )
    pipe.save_pretrained(release / "turbo", safe_serialization=True)
    marker = json.dumps({"world": WORLD_NAME, "trigger_for_stripes": "zst"}, indent=2) + "\n"
    (release / "turbo" / TOY_MARKER).write_text(marker)
    for name, arch in (("base", BASE), ("deturbo", DETURBO)):
        folder = release / name
        _load_transformer(out / name / "model").to(half).save_pretrained(
            folder / "transformer", safe_serialization=True
        )
        toy_scheduler(ARCHS[arch].shift).save_pretrained(folder / "scheduler")
        (folder / "parts_from.json").write_text(json.dumps({"parts_from": "../turbo"}, indent=2) + "\n")
        (folder / TOY_MARKER).write_text(marker)
    shutil.copy(out / "adapter" / "training_adapter.safetensors", release / "training_adapter.safetensors")
    size = sum(p.stat().st_size for p in release.rglob("*") if p.is_file())
    return {"megabytes": round(size / 2**20, 2)}


def _stage_evaluate(out: Path, config: BuildConfig, log: Log) -> dict:
    from zimage_lora.toyworld.evaluate import evaluate_release

    return evaluate_release(out / "release", config.eval_count, log)


_STAGES = {
    "vae": _stage_vae,
    "latents": _stage_latents,
    "base": _stage_base,
    "teacher": _stage_teacher,
    "turbo": _stage_turbo,
    "adapter": _stage_adapter,
    "deturbo": _stage_deturbo,
    "release": _stage_release,
    "evaluate": _stage_evaluate,
}


def copy_release(out: Path, target: Path) -> None:
    """Put a finished build's released folders where the package ships them (with its scores)."""
    target = Path(target)
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(Path(out) / "release", target, ignore=shutil.ignore_patterns("done.json"))
    marker = json.dumps({"world": WORLD_NAME, "trigger_for_stripes": "zst"}, indent=2) + "\n"
    for name in ("turbo", "base", "deturbo"):
        if not (target / name / TOY_MARKER).is_file():
            (target / name / TOY_MARKER).write_text(marker)
    evaluate = Path(out) / "evaluate" / "done.json"
    if evaluate.is_file():
        shutil.copy(evaluate, target / "scores.json")
