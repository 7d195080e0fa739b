"""The LoRA training recipe for Z-Image: config in, LoRA files, samples and metrics out.

Read top to bottom: ``train`` prepares the run folder, builds the network first (the frozen training adapter on the
Turbo path, then the LoRA) so that a wrong file fails before any slow work, encodes text and latents once, then
loops: draw a batch, noise it, predict, step, log, and now and then save and sample. A signal stops it after the
current step with everything saved; out of memory and a full disk end in one sentence.
"""

from __future__ import annotations

import errno
import json
import math
import random
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from tqdm import tqdm

from zimage_lora import __version__, faults
from zimage_lora.config import DEFAULT_TARGET_REGEX, JobConfig, dump_yaml, job_to_dict, run_dir
from zimage_lora.data.cache import LatentStore
from zimage_lora.data.dataset import Sample, build_samples, discover, epoch_batches
from zimage_lora.data.text_cache import PromptEmbeddings
from zimage_lora.errors import NonFiniteLoss, UserError
from zimage_lora.lora import network
from zimage_lora.lora.io import read_lora, save_lora
from zimage_lora.lora.variants import network_tensors, save_network
from zimage_lora.models.arch import ARCHS
from zimage_lora.models.checkpointing import enable_checkpointing, main_blocks
from zimage_lora.models.compile import compile_blocks
from zimage_lora.models.hub import resolve_file
from zimage_lora.models.loading import load_components, resolve_device
from zimage_lora.models.offload import BlockOffloader, OnDemand, to_device
from zimage_lora.models.quant import quantized_bytes
from zimage_lora.models.vae import decode_latents, tensor_to_pil
from zimage_lora.quiet import quiet_libraries
from zimage_lora.sampling.previews import build_contact_sheet, png_info, preview_prompts, save_png
from zimage_lora.sampling.sampler import denoise
from zimage_lora.training import flow
from zimage_lora.training.ema import LoraEMA
from zimage_lora.training.optim import build_optimizer, build_scheduler
from zimage_lora.training.run_folder import MetricsLog, RunFolder, environment_facts
from zimage_lora.training.validation import Validator, validation_images

LOSS_WINDOW = 20


@dataclass
class TrainResult:
    run_dir: Path
    final_lora: Path
    steps: int
    first_loss: float | None = None  # mean over the first LOSS_WINDOW steps of this run
    last_loss: float | None = None  # mean over the last LOSS_WINDOW steps
    samples: list[Path] = field(default_factory=list)
    contact_sheet: Path | None = None
    stopped_at: int | None = None  # set when a signal stopped the run early (saved; resume with --resume)
    # what the memory savers did: device visits of the text encoder and the VAE; with layer offload, the offloaded
    # blocks, their loads and evictions per block and the most offloaded blocks resident at once
    memory: dict = field(default_factory=dict)


def train(cfg: JobConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> TrainResult:
    """Run a job. Out of memory and a full disk end in one sentence saying what to change; nothing saved is lost."""
    try:
        return _train(cfg, resume=resume, overwrite=overwrite, progress=progress)
    except torch.OutOfMemoryError as e:
        raise UserError(out_of_memory_advice(cfg, str(e).splitlines()[0])) from None
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise UserError(
            f"disk full while writing in {run_dir(cfg)} ({e.strerror}); the files saved before are intact: free "
            "some space (or lower save.keep), then continue with --resume"
        ) from None


def out_of_memory_advice(cfg: JobConfig, what: str) -> str:
    """The config changes that lower memory, from the ones that help most, leaving out what the job already does."""
    tips = []
    if not cfg.train.gradient_checkpointing:
        tips.append("train.gradient_checkpointing: true")
    elif cfg.train.checkpoint_fraction < 1:
        tips.append("train.checkpoint_fraction: 1 (every block recomputes instead of keeping its activations)")
    if not (cfg.train.cache_text_embeddings or cfg.train.unload_text_encoder):
        tips.append("train.cache_text_embeddings: true (frees the 8 GB text encoder)")
    if cfg.quantization.transformer == "none":
        tips.append("quantization.transformer: float8 (halves the 12 GB transformer; nf4 quarters it)")
    elif cfg.quantization.transformer in ("float8", "int8"):
        tips.append("quantization.transformer: nf4 (a quarter of the bf16 transformer, lower quality)")
    if cfg.model.layer_offload < 1:
        more = min(1.0, cfg.model.layer_offload + 0.5)
        off = " and train.compile: false" if cfg.train.compile else ""
        tips.append(f"model.layer_offload: {more:g}{off} (keeps that share of the transformer blocks in CPU memory)")
    if not cfg.model.low_vram:
        tips.append("model.low_vram: true")
    biggest = max(r for ds in cfg.datasets for r in ds.resolutions)
    if biggest > 512:
        tips.append(f"drop resolution {biggest} from datasets[].resolutions")
    if cfg.train.batch_size > 1:
        tips.append(f"train.batch_size: 1 with train.grad_accum: {cfg.train.batch_size * cfg.train.grad_accum}")
    if cfg.target.rank > 16:
        tips.append("a lower target.rank")
    return f"out of memory ({what}); to fit, try: " + "; ".join(tips)


def _train(cfg: JobConfig, *, resume: bool, overwrite: bool, progress: bool) -> TrainResult:
    quiet_libraries()
    arch = ARCHS[cfg.model.arch]
    run = RunFolder(run_dir(cfg), cfg.job.name)
    run.prepare(resume=resume, overwrite=overwrite)
    saved_config = run.root / "config.yaml"
    if resume and run.states() and saved_config.is_file():  # before any model loads: a refusal must be quick
        check_resumable(yaml.safe_load(saved_config.read_text()) or {}, job_to_dict(cfg), run.states()[-1][0])
    log = _Logger(run.root / "train.log", echo=True)

    # --- devices and precision --------------------------------------------------------------------------------
    device = resolve_device(cfg.job.device)
    precision = _precision(cfg.train.mixed_precision, device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    AcceleratorState._reset_state(reset_partial_state=True)  # each run chooses its own precision, even in one process
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=precision)
    device = accelerator.device
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    run.write_text("config.yaml", dump_yaml(cfg))
    run.write_run_json(**environment_facts(), status="running", device=str(device), precision=precision)
    log(f"zimage-lora {__version__}: job {cfg.job.name!r}, arch {arch.name}, device {device}, precision {precision}")
    if cfg.model.arch == "zimage_turbo":
        log("warning: training raw Turbo undoes its distillation (Turbo drift); zimage_turbo_adapter avoids it")

    # --- data -------------------------------------------------------------------------------------------------
    warn = lambda message: log(f"warning: {message}")  # noqa: E731
    items = discover(cfg.datasets, cfg.job.trigger_word, warn)
    samples = build_samples(items, [ds.resolutions for ds in cfg.datasets], warn)
    buckets = sorted({s.bucket for s in samples})
    log(
        f"data: {len(items)} images, {len(samples)} samples in {len(buckets)} buckets "
        f"({', '.join(f'{w}x{h}' for w, h in buckets)})"
    )

    parts_from = arch.parts_from
    comps = load_components(
        cfg.model.name_or_path,
        text_encoder_path=cfg.model.text_encoder_path,
        vae_path=cfg.model.vae_path,
        dtype=weight_dtype,
        device=device,
        fallback_ref=parts_from,
        scheduler_shift=arch.shift if cfg.model.arch == "zimage_base" else None,
        quantization=cfg.quantization.model_dump(),
        layer_offload=cfg.model.layer_offload,
        low_vram=cfg.model.low_vram,
    )
    for part in ("transformer", "text_encoder"):
        mode = getattr(cfg.quantization, part)
        if mode != "none":
            stored, bf16 = quantized_bytes(getattr(comps, part))
            log(
                f"quantization: {part} {mode}, quantized layers {stored / 2**30:.2f} GiB (bf16: {bf16 / 2**30:.2f} GiB)"
            )

    # --- the network first (a wrong adapter or target must fail before minutes of caching) ---------------------
    # frozen base, training adapter at +1 (Turbo path), trainable LoRA
    transformer = comps.transformer
    if arch.uses_adapter:
        adapter_file = resolve_file(cfg.model.training_adapter)
        adapter = read_lora(adapter_file, network.linear_module_names(transformer))
        network.add_training_adapter(transformer, adapter.modules, str(cfg.model.training_adapter))
        log(f"training adapter: {adapter_file.name}, {len(adapter.modules)} modules, applied at +1 while training")

    targets = network.target_module_names(transformer, cfg.target.modules or DEFAULT_TARGET_REGEX)
    network.add_user_lora(
        transformer, targets, cfg.target.rank, cfg.target.resolved_alpha, seed=cfg.job.seed, kind=cfg.target.type
    )
    params = network.user_parameters(transformer)
    log(
        f"LoRA: rank {cfg.target.rank}, alpha {cfg.target.resolved_alpha:g}, {len(targets)} modules, "
        f"{sum(p.numel() for p in params) / 1e6:.2f} M trainable parameters"
    )
    if precision in ("bf16", "fp16"):
        network.keep_input_dtype(transformer)
    if cfg.train.gradient_checkpointing:
        chosen = enable_checkpointing(transformer, cfg.train.checkpoint_fraction)
        if cfg.train.checkpoint_fraction < 1:
            n, kept = len(main_blocks(transformer)), "the others keep their activations"
            log(f"gradient checkpointing: {len(chosen)} of {n} main blocks recompute, {kept}")
    transformer.train()
    offloader = None
    if cfg.model.layer_offload > 0:
        offloader = BlockOffloader(transformer, cfg.model.layer_offload, device)
        log(
            f"layer offload: {len(offloader.offloaded)} of {offloader.n_blocks} blocks stay in CPU memory"
            f"{' (pinned)' if device.type == 'cuda' else ''} and are streamed in when used"
        )
    if cfg.train.compile:
        log(f"compile: {compile_blocks(transformer, device)} transformer blocks compiled (the first steps are slow)")

    # --- text: captions, the empty prompt (caption dropout) and the sample prompts ------------------------------
    previews = preview_prompts(cfg.sample, arch.name, cfg.job.trigger_word)
    if cfg.train.unload_text_encoder:
        fixed = [cfg.job.trigger_word or cfg.datasets[it.dataset].default_caption for it in items]
        items = [type(it)(it.path, caption, it.dataset) for it, caption in zip(items, fixed, strict=False)]
        log(f"unload_text_encoder: captions ignored, every step uses {fixed[0]!r}; the text encoder is unloaded")
    val_images = validation_images(cfg, items) if cfg.train.validation.enabled else []
    dop = cfg.train.dop
    if dop.enabled:
        log(f"DOP: '{cfg.job.trigger_word}' -> '{dop.class_word}' in preservation prompts, x{dop.multiplier:g}")
    text = PromptEmbeddings(comps.tokenizer, comps.text_encoder, device, low_vram=cfg.model.low_vram)
    if cfg.train.cache_text_embeddings or cfg.train.unload_text_encoder:
        prompts = {it.caption for it in items} | {""} | {p.prompt for p in previews} | {cfg.sample.negative_prompt}
        prompts |= {v.caption for v in val_images}
        if dop.enabled:
            prompts |= {class_caption(it.caption, cfg) for it in items}
        text.cache(sorted(prompts))
        text.release()
        comps.text_encoder = None
        log(f"text: {len(prompts)} distinct prompts encoded once; the text encoder left the device")

    # --- latents: one caching pass, then the VAE leaves the device ---------------------------------------------
    latents = LatentStore(comps.vae, device, log=log, low_vram=cfg.model.low_vram)
    cached = [
        (items[s.item].path, s.bucket, Path(cfg.datasets[items[s.item].dataset].cache_dir))
        for s in samples
        if cfg.datasets[items[s.item].dataset].cache_latents
    ]
    cached += [(v.path, v.bucket, Path(cfg.datasets[0].cache_dir)) for v in val_images]
    if cached:
        encoded, reused = latents.prepare(cached)
        log(f"latents: {encoded} encoded, {reused} reused from the cache")
    all_cached = all(ds.cache_latents for ds in cfg.datasets)
    vae_home = torch.device("cpu") if all_cached or cfg.model.low_vram else device
    # with every latent cached (or low_vram), the VAE only visits the device to decode previews
    preview_vae = OnDemand(comps.vae, device, home=vae_home)
    if cfg.model.low_vram and not (cfg.train.cache_text_embeddings or cfg.train.unload_text_encoder):
        log(
            "low_vram: the text encoder visits the device for every step's captions; "
            "train.cache_text_embeddings avoids that"
        )

    optimizer = build_optimizer(cfg.train.optimizer, params, cfg.train.lr, cfg.train.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.train.lr_scheduler, cfg.train.warmup_steps, cfg.train.steps)
    model, optimizer = accelerator.prepare(transformer, optimizer)
    ema = LoraEMA(network.named_user_parameters(transformer), cfg.train.ema.decay) if cfg.train.ema.enabled else None
    validator = (
        Validator(val_images, cfg.train.validation.sigmas, cfg.job.seed, latents, text, device, weight_dtype)
        if val_images
        else None
    )
    guidance = cfg.advanced.differential_guidance
    if guidance.enabled and not dop.enabled:
        log(
            f"warning: differential guidance alone multiplies the gradient by {guidance.scale:g}; "
            f"{cfg.train.optimizer} normalises a uniform scale away (only eps and clipping see it), so expect little "
            "change: raise train.lr for faster learning, or use it beside DOP, where it shifts the balance"
        )

    # --- state: fresh or resumed -----------------------------------------------------------------------------
    noise_gen = torch.Generator("cpu").manual_seed(cfg.job.seed)
    choice_rng = random.Random(cfg.job.seed)
    position = {"epoch": 0, "batch": 0}
    start_step = 0
    state = run.read_latest_state() if resume else None
    if state is not None:
        start_step = _restore(state, transformer, optimizer, scheduler, noise_gen, choice_rng, position, ema)
        log(f"resumed from step {start_step}")
    elif resume:
        log("--resume: nothing was saved yet; starting from step 0")

    def save(step: int, final: bool = False) -> Path:
        meta = _lora_metadata(cfg, arch, step)
        path = run.final_path if final else run.checkpoint_path(step)
        if ema is not None and cfg.train.ema.save_raw:
            (run.root / "raw").mkdir(exist_ok=True)
            _write_network(run.root / "raw" / path.name, transformer, cfg, meta)
        with ema.swapped_in() if ema is not None else nullcontext():
            _write_network(path, transformer, cfg, meta, fault="save.lora", index=step)
        state = _state(step, transformer, optimizer, scheduler, noise_gen, choice_rng, position, ema)
        run.write_state(step, state)
        run.rotate(cfg.save.keep)
        faults.fire("save.rotated", step)
        return path

    sample_paths: list[Path] = []

    def sample(step: int) -> None:
        with ema.swapped_in() if ema is not None else nullcontext():
            sample_paths.extend(
                _sample_round(
                    step,
                    previews,
                    vae=preview_vae,
                    model=transformer,
                    comps=comps,
                    text=text,
                    run=run,
                    arch=arch,
                    accelerator=accelerator,
                    device=device,
                )
            )

    metrics = MetricsLog(run.root, resume_step=start_step)
    result = TrainResult(run.root, run.final_path, cfg.train.steps)

    def record_memory() -> None:
        result.memory = {
            "text_encoder_visits": text.visits,
            "vae_visits": latents.vae_on_device.visits + preview_vae.visits,
        }
        if offloader is not None:
            result.memory["offload"] = {
                "blocks": list(offloader.offloaded),
                "loads": list(offloader.loads),
                "evictions": list(offloader.evictions),
                "max_resident": offloader.max_resident,
            }

    if start_step == 0 and cfg.sample.prompts:
        sample(0)

    # --- the loop ---------------------------------------------------------------------------------------------
    batches = epoch_batches(samples, cfg.train.batch_size, cfg.job.seed, position["epoch"])
    smoothed = None
    losses: list[float] = []
    stopped_at = None
    bar = tqdm(
        total=cfg.train.steps,
        initial=start_step,
        disable=not progress,
        dynamic_ncols=True,
        unit="step",
        file=sys.stderr,
    )
    stop = _StopRequests(log)
    stop.install()
    try:
        for step in range(start_step + 1, cfg.train.steps + 1):
            started = time.perf_counter()
            plains, dops = [], []
            for _ in range(cfg.train.grad_accum):
                if position["batch"] >= len(batches):
                    position["epoch"] += 1
                    position["batch"] = 0
                    batches = epoch_batches(samples, cfg.train.batch_size, cfg.job.seed, position["epoch"])
                batch = [samples[i] for i in batches[position["batch"]]]
                position["batch"] += 1
                with accelerator.autocast():
                    loss, plain, dop_loss = _batch_loss(
                        batch,
                        cfg,
                        arch,
                        model,
                        transformer,
                        latents,
                        text,
                        items,
                        noise_gen,
                        choice_rng,
                        device,
                        weight_dtype,
                    )
                accelerator.backward(loss / cfg.train.grad_accum)
                plains.append(plain.float())
                if dop_loss is not None:
                    dops.append(dop_loss.float())
            max_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else float("inf")
            norm = accelerator.clip_grad_norm_(params, max_norm)
            # the step's one host synchronisation: the logged numbers, read in a single transfer
            values = torch.stack([*plains, *dops, torch.as_tensor(norm, device=plains[0].device).float()]).tolist()
            total = dop_total = 0.0
            for value in values[: len(plains)]:
                total += value / cfg.train.grad_accum
            for value in values[len(plains) : -1]:
                dop_total += value / cfg.train.grad_accum
            grad_norm = values[-1]
            if faults.fire("loss", step):
                total = float("nan")
            if not math.isfinite(total):
                raise NonFiniteLoss(
                    f"step {step}: the loss is {total}; likely causes: learning rate too high ({cfg.train.lr:g}), "
                    "fp16 overflow (use bf16), or a corrupt latent; the last good checkpoint is kept"
                )
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update()
            faults.fire("step", step)

            seconds = time.perf_counter() - started
            smoothed = total if smoothed is None else 0.9 * smoothed + 0.1 * total
            record = {"step": step, "loss": total, "lr": lr, "grad_norm": grad_norm, "sec": round(seconds, 4)}
            if dop.enabled:
                record["dop_loss"] = dop_total
            if validator is not None and step % cfg.train.validation.every == 0:
                record["val_loss"] = validator(transformer, accelerator.autocast)
            metrics.log(record)
            losses.append(total)
            bar.set_postfix(loss=f"{smoothed:.4f}", refresh=False)
            bar.update(1)

            asked = run.take_requests()  # save now / sample now / stop, from the web UI or a touch in a shell
            for action in sorted(asked):
                log(f"request: {action} at step {step}")
            if "stop" in asked:
                stop.requested = True
            saved = False
            if (step % cfg.save.every == 0 or "save" in asked) and step < cfg.train.steps:
                bar.write(f"saved {save(step).name}")
                saved = True
            if stop.requested and step < cfg.train.steps:
                if not saved:
                    save(step)
                stopped_at = step
                break
            wants_sample = step % cfg.sample.every == 0 or "sample" in asked
            if cfg.sample.prompts and wants_sample and step < cfg.train.steps:
                sample(step)
    finally:
        stop.restore()
        bar.close()

    if losses:
        window = min(LOSS_WINDOW, len(losses))
        result.first_loss = sum(losses[:window]) / window
        result.last_loss = sum(losses[-window:]) / window
    if stopped_at is not None:
        metrics.close()
        run.write_run_json(status="stopped", stopped_at=stopped_at, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        log(f"stopped at step {stopped_at} and saved; continue with: zimage-lora train JOB.yaml --resume")
        result.stopped_at = stopped_at
        record_memory()
        return result
    final = save(cfg.train.steps, final=True)
    if cfg.sample.prompts and cfg.train.steps > start_step:
        sample(cfg.train.steps)
    metrics.close()
    result.samples = sample_paths
    record_memory()
    result.contact_sheet = run.samples_dir / "contact_sheet.png" if sample_paths else None
    run.write_text("README.md", _model_card(cfg, arch, result))
    run.write_run_json(status="done", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), final_lora=final.name)
    log(f"done: {final}")
    return result


class _StopRequests:
    """Ctrl-C or SIGTERM: finish the current step, save, stop (exit 0). A second Ctrl-C stops at once (exit 130);
    every write is atomic, so even that leaves no damaged file."""

    def __init__(self, log):
        self.log, self.requested, self.previous = log, False, {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach only the main thread; a caller on another thread stops us another way
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.log(
            f"{signal.Signals(signum).name}: finishing this step, then saving and stopping "
            "(Ctrl-C again to stop at once)"
        )


# --- one training step ---------------------------------------------------------------------------------------
def _batch_loss(
    batch: list[Sample], cfg, arch, model, transformer, latents, text, items, noise_gen, choice_rng, device, dtype
):
    """(loss to back-propagate, plain flow MSE to log, DOP loss or None) for one micro-batch."""
    x0 = to_device(torch.stack([latents.get(items[s.item].path, s.bucket) for s in batch]), device)
    captions = []
    for s in batch:
        item = items[s.item]
        dropped = choice_rng.random() < cfg.datasets[item.dataset].caption_dropout
        captions.append("" if dropped else item.caption)
    caps = [to_device(c, device, dtype) for c in text(captions)]
    # per sample, in order: a sample's noise does not depend on what else shares its batch
    draws = [
        (
            torch.randn(x0.shape[1:], generator=noise_gen),
            flow.sample_sigmas(1, cfg.train.timestep_type, cfg.train.timestep_bias, noise_gen, arch.shift),
        )
        for _ in batch
    ]
    noise = to_device(torch.stack([n for n, _ in draws]), device)
    sigma = torch.cat([s for _, s in draws])
    weights = to_device(flow.timestep_weights(sigma, cfg.train.timestep_type), device)
    sigma = to_device(sigma, device)
    x_t = flow.noisy_latents(x0, noise, sigma)
    inputs = list(x_t.to(dtype).unsqueeze(2).unbind(0))
    output = model(inputs, flow.model_time(sigma), caps, return_dict=False)[0]
    guidance = cfg.advanced.differential_guidance
    loss, plain = flow.guided_flow_loss(
        [o.squeeze(1) for o in output], x0, noise, weights, guidance.scale if guidance.enabled else None
    )
    if not cfg.train.dop.enabled:
        return loss, plain.detach(), None
    # DOP: the same noisy latents and times on the caption with the trigger replaced by the class word; the prior is
    # the model without the user's LoRA (the training adapter stays: it is part of the base while training)
    class_caps = [to_device(c, device, dtype) for c in text([class_caption(items[s.item].caption, cfg) for s in batch])]
    with torch.no_grad():
        network.activate(transformer, adapter_on=arch.uses_adapter, lora_scale=0.0)
        try:
            prior = model(inputs, flow.model_time(sigma), class_caps, return_dict=False)[0]
        finally:
            network.activate(transformer, adapter_on=arch.uses_adapter, lora_scale=1.0)
    preserved = model(inputs, flow.model_time(sigma), class_caps, return_dict=False)[0]
    dop_loss = torch.stack([((p.float() - q.float()) ** 2).mean() for p, q in zip(preserved, prior, strict=True)])
    dop_loss = dop_loss.mean()
    return loss + cfg.train.dop.multiplier * dop_loss, plain.detach(), dop_loss.detach()


def class_caption(caption: str, cfg) -> str:
    """The caption with the trigger word replaced by the class word (DOP's preservation prompt)."""
    return caption.replace(cfg.job.trigger_word, cfg.train.dop.class_word) if cfg.job.trigger_word else caption


# --- sampling ------------------------------------------------------------------------------------------------
def _sample_round(step, previews, *, vae, model, comps, text, run, arch, accelerator, device) -> list[Path]:
    paths = []
    was_training = model.training
    model.eval()
    try:
        for index, p in enumerate(previews):
            network.activate(model, adapter_on=False, lora_scale=p.lora_scale)
            pos, neg = text([p.prompt, p.negative_prompt])
            z = denoise(model, comps.scheduler.config, pos, neg, p.settings, device, autocast=accelerator.autocast)
            with torch.no_grad(), vae.visit():
                image = tensor_to_pil(decode_latents(comps.vae, z.to(device, comps.vae.dtype)))[0]
            path = run.sample_path(step, index)
            save_png(path, image, png_info(p, step, arch.name, comps.scheduler.config.shift))
            paths.append(path)
    finally:
        network.activate(model, adapter_on=arch.uses_adapter)
        model.train(was_training)
    build_contact_sheet(run.samples_dir, [p.prompt for p in previews])
    return paths


# --- state ---------------------------------------------------------------------------------------------------
def _state(step, model, optimizer, scheduler, noise_gen, choice_rng, position, ema=None) -> dict:
    return {
        "ema": ema.state_dict() if ema is not None else None,
        "step": step,
        "lora": {k: v.detach().cpu().clone() for k, v in network.named_user_parameters(model).items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "noise_generator": noise_gen.get_state(),
        "choice_rng": choice_rng.getstate(),
        "position": dict(position),
    }


def _restore(state, model, optimizer, scheduler, noise_gen, choice_rng, position, ema=None) -> int:
    params = network.named_user_parameters(model)
    if set(params) != set(state["lora"]):
        raise UserError("--resume: the saved state does not match this job's LoRA (target or rank changed)")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state["lora"][name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    noise_gen.set_state(state["noise_generator"])
    choice_rng.setstate(state["choice_rng"])
    position.update(state["position"])
    if ema is not None and state.get("ema") is not None:
        ema.load_state_dict(state["ema"])
    return int(state["step"])


# Keys a resumed run may change: length, saving, previews and how memory is saved (layer offload and low_vram give
# the same numbers; compile within float rounding). Anything else would make the run a different one.
RESUMABLE_CHANGES = (
    "train.steps",
    "save.",
    "sample.",
    "job.device",
    "train.gradient_checkpointing",
    "train.checkpoint_fraction",
    "model.layer_offload",
    "model.low_vram",
    "train.compile",
)


def check_resumable(saved: dict, current: dict, saved_step: int) -> None:
    """Refuse a resume whose job changed in a way that breaks the run, naming the key."""
    old, new = _flatten(saved), _flatten(current)
    for key in [*old, *(k for k in new if k not in old)]:  # panel order: a key the user set before what follows
        if key.startswith(RESUMABLE_CHANGES) or old.get(key) == new.get(key):
            continue
        raise UserError(
            f"--resume: {key} changed ({old.get(key)!r} -> {new.get(key)!r}) since the run was saved; restore it, "
            "or start afresh with --overwrite"
        )
    if new.get("train.steps", 0) <= saved_step:
        raise UserError(
            f"--resume: train.steps ({new.get('train.steps')}) must be more than the saved step ({saved_step})"
        )


def _flatten(data, prefix: str = "") -> dict:
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(data, list):
        out = {}
        for index, value in enumerate(data):
            out.update(_flatten(value, f"{prefix}{index}."))
        return out if data else {prefix.rstrip("."): []}
    return {prefix.rstrip("."): data}


# --- files ---------------------------------------------------------------------------------------------------
def _lora_metadata(cfg: JobConfig, arch, step: int) -> dict[str, str]:
    """Deterministic metadata: what the LoRA is for, never when or where it was made."""
    return {
        "zimage_lora.version": __version__,
        "zimage_lora.arch": arch.name,
        "zimage_lora.base_model": _portable_ref(cfg.model.name_or_path),
        "zimage_lora.training_adapter": _portable_ref(cfg.model.training_adapter) if arch.uses_adapter else "",
        "zimage_lora.network": cfg.target.type,
        "zimage_lora.rank": str(cfg.target.rank),
        "zimage_lora.alpha": f"{cfg.target.resolved_alpha:g}",
        "zimage_lora.step": str(step),
        "zimage_lora.trigger_word": cfg.job.trigger_word or "",
        "zimage_lora.resolutions": json.dumps(sorted({r for ds in cfg.datasets for r in ds.resolutions})),
        "zimage_lora.format": "diffusion_model.<module>.lora_A/lora_B/alpha (diffusers + ComfyUI)",
        "zimage_lora.suggested_weight": "0.6-1.0",
    }


def _write_network(path: Path, transformer, cfg: JobConfig, meta: dict, fault=None, index=None) -> None:
    """The user's network in its file layout (see ``lora/variants.py`` for LoKr, LoHa and DoRA)."""
    if cfg.target.type == "lora":
        save_lora(path, network.user_lora_weights(transformer), cfg.save.dtype, meta, fault=fault, index=index)
    else:
        tensors = network_tensors(transformer, cfg.target.type, network.USER)
        save_network(path, tensors, cfg.save.dtype, meta, fault=fault, index=index)


def _portable_ref(ref: str | None) -> str:
    """A hub id as given; a local path by its name only (the same file trained elsewhere gives the same bytes)."""
    if not ref:
        return ""
    path = Path(ref).expanduser()
    return path.name if path.exists() else ref


def _model_card(cfg: JobConfig, arch, result: TrainResult) -> str:
    trigger = cfg.job.trigger_word
    lines = [
        f"# {cfg.job.name}",
        "",
        f"A LoRA for **{arch.label}**, trained with zimage-lora {__version__}.",
        "",
        f"- Base model: `{cfg.model.name_or_path}`"
        + (" (trained with the training adapter, which is not part of this LoRA)" if arch.uses_adapter else ""),
        f"- Trigger word: `{trigger}`" if trigger else "- Trigger word: none",
        "- Suggested LoRA weight: 0.6-1.0",
        f"- Inference: {arch.sample_steps} steps, "
        + ("no CFG" if arch.sample_guidance <= 1 else f"CFG {arch.sample_guidance:g}"),
        f"- Rank {cfg.target.rank}, alpha {cfg.target.resolved_alpha:g}, {result.steps} steps, LR {cfg.train.lr:g}, "
        f"optimizer {cfg.train.optimizer}, resolutions {sorted({r for d in cfg.datasets for r in d.resolutions})}",
        "",
        f"Files: `{result.final_lora.name}` (loads in ComfyUI and in diffusers `load_lora_weights`).",
        "",
    ]
    if result.contact_sheet is not None:
        lines += ["## Samples", "", "![samples](samples/contact_sheet.png)", ""]
    guidance = 0.0 if arch.sample_guidance <= 1 else arch.sample_guidance - 1.0  # diffusers counts CFG from 0
    lines += [
        "## Run it (diffusers)",
        "",
        "```python",
        "from diffusers import ZImagePipeline",
        f'pipe = ZImagePipeline.from_pretrained("{_portable_ref(cfg.model.name_or_path)}")',
        f'pipe.load_lora_weights("{result.final_lora.name}", adapter_name="lora")',
        'pipe.set_adapters(["lora"], [0.8])',
        f'image = pipe("{trigger or "a photo"}, ...", num_inference_steps={arch.sample_steps}, '
        f"guidance_scale={guidance:g}).images[0]",
        "```",
        "",
        "In ComfyUI: put the file in `models/loras` and load it on the Z-Image model.",
        "",
    ]
    return "\n".join(lines)


def _precision(requested: str, device: torch.device) -> str:
    if requested == "auto":
        return "bf16" if device.type == "cuda" else "no"
    if requested == "fp16" and device.type == "cpu":
        raise UserError("train.mixed_precision: fp16 needs a GPU; use bf16 or no on the CPU")
    return requested


class _Logger:
    def __init__(self, path: Path, echo: bool):
        self.path, self.echo = path, echo

    def __call__(self, message: str) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(message + "\n")
        if self.echo:
            tqdm.write(message, file=sys.stderr)
