"""The LoRA training recipe for Z-Image: config in, LoRA files, samples and metrics out.

``LoraRecipe`` has a lifecycle, in the spirit of torchtune's recipes:

- ``setup()``: the run folder, device and precision, data, model (frozen base, the training adapter on the Turbo
  path, the trainable LoRA), text and latent caches, optimizer, and the state (fresh or resumed). It builds the
  network before the caches, so a wrong adapter or target fails before minutes of encoding. It also takes prebuilt
  components and data, so a benchmark can drive a full-size random model without a dataset;
- ``train_step(batch) -> StepMetrics``: one optimizer step over a ``StepBatch`` (gradient accumulation inside);
- ``save(step, final=False)``, ``sample(step)``: a checkpoint (LoRA file and state), a round of previews;
- ``close()``: release what setup opened;
- ``train()``: the loop, one screen: a step, then the after-step control point (``training/control.py``) that
  turns schedules, requests from the web UI, signals and fault points into validate, save, sample or stop.

``train(cfg)`` runs a job: out of memory and a full disk end in one sentence; nothing saved is lost.

Several processes (``training/distributed.py``, started by ``training/launch.py``) run the same recipe: each trains
its part of every batch (gradients all-reduced once per optimizer step, none on accumulation micro-steps), encodes
its part of the latents and prompts and renders its part of the previews; the main process alone writes the run
folder (logs, metrics, LoRA files, states, previews, model card), except each process's own record in
``processes/``. With ``model.shard`` the frozen transformer is sharded across them (FSDP2).
"""

from __future__ import annotations

import errno
import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import InitProcessGroupKwargs
from tqdm import tqdm

from zimage_lora import __version__, faults
from zimage_lora.config import DEFAULT_TARGET_REGEX, JobConfig, check_job, dump_yaml, job_to_dict, run_dir
from zimage_lora.data.batches import DatasetBatches, Example, StepBatch
from zimage_lora.data.cache import LatentStore
from zimage_lora.data.dataset import build_samples, discover
from zimage_lora.data.masks import MaskStore
from zimage_lora.data.text_cache import PromptEmbeddings
from zimage_lora.errors import NonFiniteLoss, ProcessLost, UserError
from zimage_lora.lora import network
from zimage_lora.lora.io import atomic_write_bytes, read_lora, read_metadata, save_lora
from zimage_lora.lora.variants import network_file, save_network
from zimage_lora.models.arch import ARCHS, inference_arch
from zimage_lora.models.checkpointing import enable_checkpointing, main_blocks
from zimage_lora.models.compile import compile_blocks
from zimage_lora.models.devices import resolve_device
from zimage_lora.models.hub import resolve_file
from zimage_lora.models.loading import Components, load_components
from zimage_lora.models.offload import BlockOffloader, OnDemand, to_device
from zimage_lora.models.quant import quantized_bytes
from zimage_lora.models.refs import is_toy_world
from zimage_lora.models.vae import decode_latents, tensor_to_pil
from zimage_lora.quiet import quiet_libraries
from zimage_lora.sampling.previews import build_contact_sheet, png_info, preview_prompts, save_png
from zimage_lora.sampling.sampler import denoise
from zimage_lora.training import card, flow
from zimage_lora.training.control import StepControl, Todo, process_started_at
from zimage_lora.training.distributed import (
    BucketCounter,
    Processes,
    launched_world,
    shard_transformer,
    whole_parameters,
    whole_tensors,
)
from zimage_lora.training.draws import KeyedDraws
from zimage_lora.training.ema import LoraEMA
from zimage_lora.training.optim import build_optimizer, build_scheduler
from zimage_lora.training.run_folder import MetricsLog, RunFolder, environment_facts, read_metrics, sample_files
from zimage_lora.training.scores import PreviewScorer, RoundScores
from zimage_lora.training.state import TrainState, check_resumable, restore, snapshot
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
    complete: bool = False  # --resume found the run finished already: nothing was done
    # what the memory savers did: device visits of the text encoder and the VAE; with layer offload, the offloaded
    # blocks, their loads and evictions per block and the most offloaded blocks resident at once
    memory: dict = field(default_factory=dict)


@dataclass
class StepMetrics:
    """One optimizer step as ``metrics.jsonl`` records it."""

    step: int
    loss: float  # the plain flow-matching loss (what the curves show), mean over the step's micro-batches
    lr: float
    grad_norm: float
    sec: float
    dop_loss: float | None = None
    bpp_loss: float | None = None  # Blank Prompt Preservation's loss
    val_loss: float | None = None
    scores: RoundScores | None = None  # on a sample step: its preview round's scores (training/scores.py)

    def record(self) -> dict:
        out = {"step": self.step, "loss": self.loss, "lr": self.lr, "grad_norm": self.grad_norm, "sec": self.sec}
        extra = (("dop_loss", self.dop_loss), ("bpp_loss", self.bpp_loss), ("val_loss", self.val_loss))
        out.update({k: v for k, v in extra if v is not None})
        if self.scores is not None:
            out.update(self.scores.record())
        return out


def train(
    cfg: JobConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True
) -> TrainResult | None:
    """Run a job. Out of memory and a full disk end in one sentence saying what to change; nothing saved is lost.
    With several processes only the main one returns the result (the others None)."""
    try:
        result = LoraRecipe(cfg, resume=resume, overwrite=overwrite, progress=progress).train()
        _leave_together()
        return result
    except torch.OutOfMemoryError as e:
        raise UserError(out_of_memory_advice(cfg, str(e).splitlines()[0])) from None
    except RuntimeError as e:
        if launched_world()[1] == 1 or not _lost_peer(e):
            raise
        raise ProcessLost(
            f"process {launched_world()[0]}: another process of this job is gone or stopped answering "
            f"({_lost_peer(e)}); the files saved before are intact: continue with --resume"
        ) from None
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise UserError(
            f"disk full while writing in {run_dir(cfg)} ({e.strerror}); the files saved before are intact: free "
            "some space (or lower save.keep), then continue with --resume"
        ) from None


def _leave_together() -> None:
    """With several processes: meet once more, then take the process groups down on every process, so that none
    tears its communication down while a peer still uses it (a process left to do it at exit, after its peer and
    the store had gone, could abort there: "terminate called without an active exception", SIGABRT)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


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


class LoraRecipe:
    def __init__(self, cfg: JobConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True):
        self.cfg, self.resume, self.overwrite, self.progress = cfg, resume, overwrite, progress
        self.arch = ARCHS[cfg.model.arch]
        self.run = RunFolder(run_dir(cfg), cfg.job.name)
        self.state = TrainState()
        self.draws = KeyedDraws(cfg.job.seed)
        self.sample_paths: list[Path] = []
        self.round_scores: dict[int, RoundScores] = {}
        self.metrics: MetricsLog | None = None
        self.offloader: BlockOffloader | None = None
        self.text_offloader: BlockOffloader | None = None  # model.text_encoder_offload
        self.validator: Validator | None = None
        self.latents: LatentStore | None = None
        self.preview_vae: OnDemand | None = None
        self.processes: Processes | None = None
        self.lora_scale = 1.0  # the user's LoRA's multiplier in the training forward (a dataset's network_weight)
        self.buckets: BucketCounter | None = None  # counts DDP's gradient exchanges (several processes)
        # this process's part of each step and the saves it took part in (several processes)
        self.record: dict = {"batches": {}, "exchanges": {}, "saves": []}

    # --- the loop ---------------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Set up, take the steps, write the final files; a stop request or signal ends early with all saved.
        ``--resume`` on a run that is complete changes nothing and says where its LoRA is."""
        complete = self.completed_run() if self.resume else None
        if complete is not None:
            return complete if launched_world()[0] == 0 else None
        try:
            self.setup()
            result = self._loop()
            return result if self.processes.main else None
        finally:
            self.close()

    def completed_run(self) -> TrainResult | None:
        """The result of this job's run when it has finished all of ``train.steps`` (run.json says done and the final
        LoRA records that step), read without writing anything; None when there is training left to do."""
        run, steps = self.run, self.cfg.train.steps
        facts = json.loads((run.root / "run.json").read_text()) if (run.root / "run.json").is_file() else {}
        if facts.get("status") != "done" or not run.final_path.is_file():
            return None
        if read_metadata(run.final_path).get("zimage_lora.step") != str(steps):
            return None  # more steps asked for (or fewer: the resume check says so)
        sheet = run.samples_dir / "contact_sheet.png"
        result = TrainResult(run.root, run.final_path, steps, complete=True)
        result.samples = [path for _, _, path in run.samples()]
        result.contact_sheet = sheet if sheet.is_file() else None
        tqdm.write(f"{run.root}: the run is complete ({steps} steps); nothing to resume", file=sys.stderr)
        return result

    def _loop(self) -> TrainResult:
        steps, losses, smoothed = self.cfg.train.steps, [], None
        bar = tqdm(total=steps, initial=self.state.step, disable=not (self.progress and self.processes.main),
                   dynamic_ncols=True, unit="step", file=sys.stderr)  # fmt: skip
        stopped_at = None
        try:
            with self.control:
                if self.state.step == 0 and self.cfg.sample.active:
                    self.sample(0, shown=self.cfg.sample.first)
                elif self._previews_skipped_by_a_stop(self.state.step):
                    self.sample(self.state.step)
                for step in range(self.state.step + 1, steps + 1):
                    metrics = self.train_step(self.data.next(self.state, step))
                    todo = self._agree(self.control.after_step(step))
                    if todo.validate and self.validator is not None:
                        metrics.val_loss = self.validator(self.transformer, self.accelerator.autocast)
                    if todo.sample:  # before the step's metrics line, which carries the round's scores
                        self.sample(step)
                        metrics.scores = self.round_scores.get(step)
                    if self.metrics is not None:  # the main process's
                        self.metrics.log(metrics.record())
                    losses.append(metrics.loss)
                    smoothed = metrics.loss if smoothed is None else 0.9 * smoothed + 0.1 * metrics.loss
                    bar.set_postfix(loss=f"{smoothed:.4f}", refresh=False)
                    bar.update(1)
                    if todo.save:
                        path = self.save(step)
                        if not todo.stop and self.processes.main:
                            bar.write(f"saved {path.name}")
                    if todo.stop:
                        stopped_at = step
                        break
        finally:
            bar.close()
        result = TrainResult(self.run.root, self.run.final_path, steps, stopped_at=stopped_at)
        if losses:
            window = min(LOSS_WINDOW, len(losses))
            result.first_loss, result.last_loss = sum(losses[:window]) / window, sum(losses[-window:]) / window
        return self._stopped(result) if stopped_at is not None else self._finish(result)

    def _previews_skipped_by_a_stop(self, step: int) -> bool:
        """A stop at a scheduled preview step saves at once and renders nothing; the resumed run renders them."""
        preview = self.cfg.sample
        due = preview.active and 0 < step < self.cfg.train.steps and step % preview.every == 0
        return due and step >= preview.start_step and not any(s == step for s, _, _ in self.run.samples())

    def _agree(self, todo: Todo) -> Todo:
        """Every process acts on the same step: a save, sample or stop asked on any of them (a request file, read by
        the main process; a signal, which may reach one) is done by all."""
        if not self.processes.several:
            return todo
        validate, save, sample, stop = self.processes.union([todo.validate, todo.save, todo.sample, todo.stop])
        return Todo(validate=validate, save=save or stop, sample=sample and not stop, stop=stop)

    # --- setup ------------------------------------------------------------------------------------------------------
    def setup(self, components: Components | None = None, data=None, text: PromptEmbeddings | None = None) -> None:
        """Everything before the first step. ``components`` replaces loading the model; ``data`` (an object with
        ``next(state, step) -> StepBatch`` and ``captions()``) replaces the job's datasets; ``text`` replaces the
        prompt encoder (embeddings already computed)."""
        faults.set_job(self.cfg.job.name)
        faults.fire("setup")
        quiet_libraries()
        self._setup_processes()
        self._setup_run()
        self._setup_device()
        for warning in check_job(self.cfg, check_paths=data is None):  # raw Turbo, a high LR, long on few images
            self.log(f"warning: {warning}")
        if data is None:
            self._setup_dataset()
        self._setup_model(components)
        self._setup_text(text, data)
        self.data = data if data is not None else self._setup_latents()
        self._setup_optimizer()
        self._setup_state()

    def _setup_processes(self) -> None:
        """The device, the precision and accelerate; with several processes, the process group (its step
        collectives give up after ``job.process_timeout`` seconds)."""
        cfg = self.cfg
        _, world = launched_world()
        if world > 1:  # accelerate places each process on its GPU (cuda:<local rank>) or on the CPU
            wants_cpu = cfg.job.device == "cpu" or (cfg.job.device == "auto" and not torch.cuda.is_available())
            device = torch.device("cpu") if wants_cpu else torch.device("cuda")
        else:
            device = resolve_device(cfg.job.device if isinstance(cfg.job.device, str) else cfg.job.device[0])
        self.precision = _precision(cfg.train.mixed_precision, device)
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
        AcceleratorState._reset_state(reset_partial_state=True)  # each run chooses its own precision
        handlers = [InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.job.process_timeout))] if world > 1 else []
        self.accelerator = Accelerator(
            cpu=device.type == "cpu", mixed_precision=self.precision, kwargs_handlers=handlers
        )
        self.device = self.accelerator.device
        self.weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)
        self.processes = Processes(self.accelerator)
        self.sharded = cfg.model.shard and self.processes.several  # FSDP2: each process holds 1/N of the weights

    def _setup_run(self) -> None:
        cfg, run, processes = self.cfg, self.run, self.processes
        if processes.main:
            run.prepare(resume=self.resume, overwrite=self.overwrite)
        processes.wait_all()  # the folder is ready (or the main process has failed, and the launcher ends us)
        saved_config = run.root / "config.yaml"
        if self.resume and run.states() and saved_config.is_file():  # before any model loads: a refusal is quick
            saved = yaml.safe_load(saved_config.read_text()) or {}
            facts_file = run.root / "run.json"
            saved_facts = json.loads(facts_file.read_text()) if facts_file.is_file() else {}
            check_resumable(saved, job_to_dict(cfg), run.states()[-1][0], self._batch_facts(), saved_facts)
        if processes.main:
            self.log = _Logger(run.root / "train.log", echo=True)
        else:  # the main process logs the run; the others keep their own log
            (run.root / "processes").mkdir(parents=True, exist_ok=True)
            self.log = _Logger(run.root / "processes" / f"rank-{processes.rank}.log", echo=False)
        self.control = StepControl(cfg, run, self.log, process_started_at(), reads_requests=processes.main)

    def _batch_facts(self) -> dict:
        """What a resumed run must keep: images per micro-batch of the whole job, and the processes."""
        t = self.cfg.train
        return {"batch_images": t.batch_size * self.processes.world, "processes": self.processes.world,
                "effective_batch": t.batch_size * t.grad_accum * self.processes.world}  # fmt: skip

    def _setup_device(self) -> None:
        cfg, processes = self.cfg, self.processes
        if processes.main:
            self.run.write_text("config.yaml", dump_yaml(cfg))
            self.run.write_run_json(
                **environment_facts(),
                status="running",
                device=str(self.device),
                precision=self.precision,
                started_at=self.control.started_at,
                **self._batch_facts(),
            )
        self.log(
            f"zimage-lora {__version__}: job {cfg.job.name!r}, arch {self.arch.name}, device {self.device}, "
            f"precision {self.precision}"
        )
        if processes.several:
            t = cfg.train
            self.log(
                f"processes: {processes.world} ({'sharded base, FSDP2' if cfg.model.shard else 'data-parallel'}), "
                f"effective batch {t.batch_size * t.grad_accum * processes.world} = train.batch_size "
                f"{t.batch_size} x train.grad_accum {t.grad_accum} x {processes.world} processes"
            )
        if processes.main:
            self.control.drop_stale_requests()

    def _setup_dataset(self) -> None:
        cfg = self.cfg
        warn = lambda message: self.log(f"warning: {message}")  # noqa: E731
        self.items = discover(cfg.datasets, cfg.job.trigger_word, warn)
        self.samples = build_samples(self.items, [ds.resolutions for ds in cfg.datasets], warn)
        buckets = sorted({s.bucket for s in self.samples})
        self.log(
            f"data: {len(self.items)} images, {len(self.samples)} samples in {len(buckets)} buckets "
            f"({', '.join(f'{w}x{h}' for w, h in buckets)})"
        )

    def _setup_model(self, components: Components | None) -> None:
        cfg, log = self.cfg, self.log
        if components is None:
            components = load_components(
                cfg.model.name_or_path,
                text_encoder_path=cfg.model.text_encoder_path,
                vae_path=cfg.model.vae_path,
                dtype=self.weight_dtype,
                device="cpu" if self.sharded else self.device,  # sharded: each block goes to the GPU in its part
                fallback_ref=self.arch.parts_from,
                scheduler_shift=self.arch.shift if self.arch.override_shift else None,
                quantization=cfg.quantization.model_dump(),
                layer_offload=cfg.model.layer_offload,
                low_vram=cfg.model.low_vram,
            )
            for part in ("transformer", "text_encoder"):
                mode = getattr(cfg.quantization, part)
                if mode != "none":
                    stored, bf16 = quantized_bytes(getattr(components, part))
                    log(
                        f"quantization: {part} {mode}, quantized layers {stored / 2**30:.2f} GiB "
                        f"(bf16: {bf16 / 2**30:.2f} GiB)"
                    )
        self.comps = components
        # the network first: frozen base, training adapter at +1 (Turbo path), trainable LoRA
        self.transformer = transformer = components.transformer
        if cfg.model.training_adapter is not None:
            adapter_file = resolve_file(cfg.model.training_adapter)
            adapter = read_lora(adapter_file, network.linear_module_names(transformer))
            network.add_training_adapter(transformer, adapter.modules, str(cfg.model.training_adapter))
            log(f"training adapter: {adapter_file.name}, {len(adapter.modules)} modules, applied at +1 while training")
        targets = network.target_module_names(transformer, cfg.target.modules or DEFAULT_TARGET_REGEX)
        network.add_user_lora(
            transformer, targets, cfg.target.rank, cfg.target.resolved_alpha, seed=cfg.job.seed, kind=cfg.target.type,
            lokr_factor=cfg.target.lokr_factor,
        )  # fmt: skip
        self.params = network.user_parameters(transformer)
        log(
            f"LoRA: rank {cfg.target.rank}, alpha {cfg.target.resolved_alpha:g}, {len(targets)} modules, "
            f"{sum(p.numel() for p in self.params) / 1e6:.2f} M trainable parameters"
        )
        if self.precision in ("bf16", "fp16"):
            network.keep_input_dtype(transformer)
        if cfg.train.gradient_checkpointing:
            chosen = enable_checkpointing(transformer, cfg.train.checkpoint_fraction)
            if cfg.train.checkpoint_fraction < 1:
                n, kept = len(main_blocks(transformer)), "the others keep their activations"
                log(f"gradient checkpointing: {len(chosen)} of {n} main blocks recompute, {kept}")
        transformer.train()
        if cfg.model.shard and not self.sharded:
            log("model.shard: a single process, so nothing to shard; the model is trained whole")
        if self.sharded:
            blocks = shard_transformer(transformer, self.device, self.processes.world)
            self.params = network.user_parameters(transformer)  # the sharded ones now
            log(f"shard: {blocks} transformer blocks sharded across {self.processes.world} processes (FSDP2)")
        if cfg.model.layer_offload > 0:
            self.offloader = BlockOffloader(transformer, cfg.model.layer_offload, self.device)
            log(
                f"layer offload: {len(self.offloader.offloaded)} of {self.offloader.n_blocks} blocks stay in CPU "
                f"memory{' (pinned)' if self.device.type == 'cuda' else ''} and are streamed in when used"
            )
        if cfg.train.compile:
            compiled = compile_blocks(transformer, self.device)
            log(f"compile: {compiled} transformer blocks compiled (the first steps are slow)")

    def _setup_text(self, text: PromptEmbeddings | None, data) -> None:
        """Captions, the empty prompt (caption dropout) and the preview prompts: encoded once when caching."""
        cfg, log = self.cfg, self.log
        self.previews = preview_prompts(cfg.sample, self.arch.name, cfg.job.trigger_word) if cfg.sample.enabled else []
        self.scorer = PreviewScorer(
            [p.prompt for p in self.previews],
            cfg.job.trigger_word,
            toy_world=is_toy_world(cfg.model.name_or_path),
            distilled=inference_arch(self.arch.name).distilled,
        )
        if not self.previews:
            log("scores: n/a (no preview prompts, so no previews to score)")
        elif not self.scorer.plain:
            log("scores: change on prompts without the trigger n/a (every preview prompt has the trigger word)")
        if self.scorer.toy_world:
            log("scores: a toy-world model, so the previews get the concept score, accuracy and Turbo drift too")
        if data is None and cfg.train.unload_text_encoder:
            fixed = [cfg.job.trigger_word or cfg.datasets[it.dataset].default_caption for it in self.items]
            self.items = [
                type(it)(it.path, caption, it.dataset) for it, caption in zip(self.items, fixed, strict=False)
            ]
            log(f"unload_text_encoder: captions ignored, every step uses {fixed[0]!r}; the text encoder is unloaded")
        self.val_images = validation_images(cfg, self.items) if data is None and cfg.train.validation.enabled else []
        dop = cfg.train.dop
        if dop.enabled:
            log(f"DOP: '{cfg.job.trigger_word}' -> '{dop.class_word}' in preservation prompts, x{dop.multiplier:g}")
        if text is not None:
            self.text = text
            return
        if cfg.model.text_encoder_offload > 0:
            encoder = self.comps.text_encoder
            stack = encoder if hasattr(encoder, "layers") else encoder.model  # Qwen3Model, or a CausalLM around one
            self.text_offloader = BlockOffloader(stack, cfg.model.text_encoder_offload, self.device)
            n, kept = self.text_offloader.n_blocks, len(self.text_offloader.offloaded)
            log(f"text encoder offload: {kept} of {n} layers stay in CPU memory and are streamed in when they encode")
        self.text = PromptEmbeddings(
            self.comps.tokenizer, self.comps.text_encoder, self.device, low_vram=cfg.model.low_vram
        )
        if cfg.train.cache_text_embeddings or cfg.train.unload_text_encoder:
            captions = data.captions() if data is not None else {it.caption for it in self.items}
            prompts = captions | {""} | {p.prompt for p in self.previews} | {cfg.sample.negative_prompt}
            prompts |= {v.caption for v in self.val_images}
            if cfg.train.dop.enabled:
                prompts |= {class_caption(c, cfg) for c in captions}
            self.text.cache(sorted(prompts), share=self.processes)
            self.text.release()
            self.comps.text_encoder = None
            split = f", split across {self.processes.world} processes" if self.processes.several else ""
            log(f"text: {len(prompts)} distinct prompts encoded once{split}; the text encoder left the device")

    def _setup_latents(self) -> DatasetBatches:
        """One caching pass, then the VAE leaves the device; the job's batches read the cached latents."""
        cfg, device = self.cfg, self.device
        self.latents = LatentStore(self.comps.vae, device, log=self.log, low_vram=cfg.model.low_vram)
        cached = [
            (self.items[s.item].path, s.bucket, Path(ds.cache_dir), flip)
            for s in self.samples
            if (ds := cfg.datasets[self.items[s.item].dataset]).cache_latents
            for flip in flip_variants(ds)
        ]
        cached += [(v.path, v.bucket, Path(cfg.datasets[0].cache_dir)) for v in self.val_images]
        if cached:
            encoded, reused = self.latents.prepare(cached, share=self.processes)
            if self.processes.several:
                parts = self.processes.gather(encoded)
                self.log(f"latents: {sum(parts)} encoded (by the processes: {parts}), {reused} reused from the cache")
            else:
                self.log(f"latents: {encoded} encoded, {reused} reused from the cache")
        all_cached = all(ds.cache_latents for ds in cfg.datasets)
        vae_home = torch.device("cpu") if all_cached or cfg.model.low_vram else device
        # with every latent cached (or low_vram), the VAE only visits the device to decode previews
        self.preview_vae = OnDemand(self.comps.vae, device, home=vae_home)
        if cfg.model.low_vram and not (cfg.train.cache_text_embeddings or cfg.train.unload_text_encoder):
            self.log(
                "low_vram: the text encoder visits the device for every step's captions; "
                "train.cache_text_embeddings avoids that"
            )
        return DatasetBatches(
            self.items, self.samples, self.latents.get, cfg.datasets, cfg.train.batch_size, cfg.train.grad_accum,
            cfg.job.seed, self.draws, share=(self.processes.rank, self.processes.world),
            masks=MaskStore(lambda message: self.log(f"warning: {message}")),
            reg_ratio=cfg.train.reg_ratio, reg_weight=cfg.train.reg_weight,
        )  # fmt: skip

    def _setup_optimizer(self) -> None:
        cfg = self.cfg
        self.optimizer = build_optimizer(cfg.train.optimizer, self.params, cfg.train.lr, cfg.train.weight_decay)
        self.scheduler = build_scheduler(
            self.optimizer, cfg.train.lr_scheduler, cfg.train.warmup_steps, cfg.train.steps
        )
        self.processes.wait_all()  # loading took each process its own time; the exchanges start together
        if self.sharded:  # FSDP2 does the exchanges itself (no DDP wrapper)
            self.model, self.optimizer = self.transformer, self.accelerator.prepare(self.optimizer)
        else:
            self.model, self.optimizer = self.accelerator.prepare(self.transformer, self.optimizer)
        if isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            self.buckets = BucketCounter()
            self.model.register_comm_hook(self.buckets, BucketCounter.hook)
        if cfg.train.ema.enabled:
            self.state.ema = LoraEMA(network.named_user_parameters(self.transformer), cfg.train.ema.decay)
        if self.val_images:
            self.validator = Validator(
                self.val_images, cfg.train.validation.sigmas, cfg.job.seed, self.latents, self.text, self.device,
                self.weight_dtype,
            )  # fmt: skip
        guidance = cfg.advanced.differential_guidance
        if guidance.enabled and self._preservation() is None:
            self.log(
                f"warning: differential guidance alone multiplies the gradient by {guidance.scale:g}; "
                f"{cfg.train.optimizer} normalises a uniform scale away (only eps and clipping see it), so expect "
                "little change: raise train.lr for faster learning, or use it beside DOP, where it shifts the balance"
            )

    def _setup_state(self) -> None:
        saved = self.run.read_latest_state() if self.resume else None
        if saved is not None:
            restore(saved, self.state, self.transformer, self.optimizer, self.scheduler)
            self.log(f"resumed from step {self.state.step}")
        elif self.resume:
            self.log("--resume: nothing was saved yet; starting from step 0")
        self.metrics = MetricsLog(self.run.root, resume_step=self.state.step) if self.processes.main else None

    # --- one step ---------------------------------------------------------------------------------------------------
    def train_step(self, batch: StepBatch) -> StepMetrics:
        """One optimizer step over ``batch`` (its micro-batches accumulate); the step's one host read at the end."""
        cfg, started, world = self.cfg, time.perf_counter(), self.processes.world
        plains, dops = [], []
        for i, micro in enumerate(batch.micro):
            self._set_lora_scale(getattr(self.data, "network_weight", lambda m: 1.0)(micro))  # its dataset's
            share = batch.weight(i)  # this process's share of the micro-batch (1 on one process)
            weight = share * getattr(self.data, "loss_weight", lambda m: 1.0)(micro)  # x a regularisation weight
            last = i == len(batch.micro) - 1
            # gradients are exchanged once, on the last micro-batch's backward
            if self.sharded:
                self.transformer.set_requires_gradient_sync(last)
            with nullcontext() if last else self.accelerator.no_sync(self.model):
                with self.accelerator.autocast():
                    loss, plain, dop_loss = self.micro_loss(batch.step, micro)
                self.accelerator.backward(loss * weight / len(batch.micro) if weight != 1 else loss / len(batch.micro))
            plains.append(plain.float() * (share / world) if world > 1 else plain.float())  # logged: unweighted
            if dop_loss is not None:
                dops.append(dop_loss.float() * (share / world) if world > 1 else dop_loss.float())
        self._set_lora_scale(1.0)  # after the backward: a recompute runs at the forward's scale
        max_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else float("inf")
        norm = self.accelerator.clip_grad_norm_(self.params, max_norm)
        if self.sharded and hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        # the step's one host synchronisation: the logged numbers (summed over the processes), one transfer
        logged = self.processes.total(torch.stack([*plains, *dops]))
        values = torch.cat([logged, torch.as_tensor(norm, device=logged.device).float().reshape(1)]).tolist()
        total = sum(v / len(batch.micro) for v in values[: len(plains)])
        kept_total = sum(v / len(batch.micro) for v in values[len(plains) : -1])  # DOP's or Blank Prompt's
        if faults.fire("loss", batch.step):
            total = float("nan")
        if not math.isfinite(total):
            raise NonFiniteLoss(
                f"step {batch.step}: the loss is {total}; likely causes: learning rate too high ({cfg.train.lr:g}), "
                "fp16 overflow (use bf16), or a corrupt latent; the last good checkpoint is kept"
            )
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.state.ema is not None:
            self.state.ema.update()
        self.state.step = batch.step
        if self.processes.several:
            self.record["batches"][batch.step] = batch.indices()
            self.record["exchanges"][batch.step] = self.buckets.take() if self.buckets is not None else None
        seconds = round(time.perf_counter() - started, 4)
        dop, bpp = cfg.train.dop.enabled, cfg.train.blank_prompt_preservation.enabled
        return StepMetrics(
            batch.step, total, lr, values[-1], seconds, kept_total if dop else None, kept_total if bpp else None
        )

    def _set_lora_scale(self, scale: float) -> None:
        """The user's LoRA at ``scale`` (a dataset's ``network_weight``) until set again."""
        if scale != self.lora_scale:
            network.activate(self.transformer, adapter_on=self.cfg.model.training_adapter is not None, lora_scale=scale)
            self.lora_scale = scale

    def micro_loss(self, step: int, micro: list[Example]):
        """(loss to back-propagate, plain flow loss to log, preservation loss (DOP or Blank Prompt Preservation) or
        None) of one micro-batch of ``step``, at the LoRA's current scale; no backward."""
        cfg, device, dtype = self.cfg, self.device, self.weight_dtype
        x0 = to_device(torch.stack([e.latent for e in micro]), device)
        caps = [to_device(c, device, dtype) for c in self.text([e.caption for e in micro])]
        draws = [
            self.draws.noise_and_sigma(
                step, e.index, x0.shape[1:], cfg.train.timestep_type, cfg.train.timestep_bias, self.arch.shift
            )
            for e in micro
        ]  # per example: its noise does not depend on what else shares its batch
        noise = to_device(torch.stack([n for n, _ in draws]), device)
        sigma = torch.cat([s for _, s in draws])
        weights = to_device(flow.timestep_weights(sigma, cfg.train.timestep_type), device)
        sigma = to_device(sigma, device)
        inputs = list(flow.noisy_latents(x0, noise, sigma).to(dtype).unsqueeze(2).unbind(0))
        unconditional = None
        if cfg.train.guidance_loss.enabled:  # the LoRA model's own prediction on the empty prompt, no gradient
            empty = [to_device(c, device, dtype) for c in self.text([""] * len(micro))]
            with torch.no_grad():
                u = self.model(inputs, flow.model_time(sigma), empty, return_dict=False)[0]
            unconditional = [o.squeeze(1) for o in u]
        output = self.model(inputs, flow.model_time(sigma), caps, return_dict=False)[0]
        guidance = cfg.advanced.differential_guidance
        cells = None
        if any(e.mask is not None for e in micro):  # loss masks: a weight per latent cell (1 for an unmasked image)
            cells = to_device(torch.stack([e.mask if e.mask is not None else torch.ones(x0.shape[2:]) for e in micro]),
                              device)  # fmt: skip
        loss, plain = flow.guided_flow_loss(
            [o.squeeze(1) for o in output], x0, noise, weights, guidance.scale if guidance.enabled else None,
            cfg.train.loss, unconditional, cfg.train.guidance_loss.target, cells,
        )  # fmt: skip
        keep = self._preservation()
        if keep is None:
            return loss, plain.detach(), None
        # DOP: the same noisy latents and times on the caption with the trigger replaced by the class word (Blank
        # Prompt Preservation: on the empty prompt); the prior is the model without the user's LoRA (the training
        # adapter stays: it is part of the base here)
        kept = [class_caption(e.full_caption, cfg) for e in micro] if keep is cfg.train.dop else [""] * len(micro)
        class_caps = [to_device(c, device, dtype) for c in self.text(kept)]
        adapter_on = cfg.model.training_adapter is not None
        with torch.no_grad():
            network.activate(self.transformer, adapter_on=adapter_on, lora_scale=0.0)
            try:
                prior = self.model(inputs, flow.model_time(sigma), class_caps, return_dict=False)[0]
            finally:
                network.activate(self.transformer, adapter_on=adapter_on, lora_scale=self.lora_scale)
        preserved = self.model(inputs, flow.model_time(sigma), class_caps, return_dict=False)[0]
        dop_loss = torch.stack([((p.float() - q.float()) ** 2).mean() for p, q in zip(preserved, prior, strict=True)])
        dop_loss = dop_loss.mean()
        return loss + keep.multiplier * dop_loss, plain.detach(), dop_loss.detach()

    def _preservation(self):
        """The preservation loss's section (DOP or Blank Prompt Preservation; they exclude each other), or None."""
        train = self.cfg.train
        return next((s for s in (train.dop, train.blank_prompt_preservation) if s.enabled), None)

    # --- files ------------------------------------------------------------------------------------------------------
    def save(self, step: int, final: bool = False) -> Path:
        """The LoRA file (EMA weights when EMA is on; the raw ones in raw/ on request) and the state to resume."""
        cfg, ema = self.cfg, self.state.ema
        meta = card.lora_metadata(cfg, self.arch, step)
        path = self.run.final_path if final else self.run.checkpoint_path(step)
        if self.sharded:  # every process gathers the LoRA and the optimizer state whole; the main one writes
            with whole_parameters(self.transformer, network.is_user_parameter):
                optimizer_state = whole_tensors(self.optimizer.state_dict())
                if self.processes.main:
                    self._write_network(path, meta, fault="save.lora", index=step)
                    saved = snapshot(self.state, self.transformer, optimizer_state, self.scheduler)
                    self.run.write_state(step, saved)
                    self.run.rotate(cfg.save.keep)
                    faults.fire("save.rotated", step)
        elif self.processes.main:  # the others hold the same LoRA and optimizer state (their gradients were the same)
            if ema is not None and cfg.train.ema.save_raw:
                (self.run.root / "raw").mkdir(exist_ok=True)
                self._write_network(self.run.root / "raw" / path.name, meta)
            with ema.swapped_in() if ema is not None else nullcontext():
                self._write_network(path, meta, fault="save.lora", index=step)
            saved = snapshot(self.state, self.transformer, self.optimizer.state_dict(), self.scheduler)
            self.run.write_state(step, saved)
            self.run.rotate(cfg.save.keep)
            faults.fire("save.rotated", step)
        self.record["saves"].append(step)
        self._write_record()
        self.processes.wait_all()
        return path

    def _write_record(self) -> None:
        """This process's record (several processes): the examples it trained at each step (their index in the
        whole batch), DDP's gradient exchanges per step, the images it VAE-encoded and the prompts it embedded."""
        if not self.processes.several:
            return
        record = {
            "rank": self.processes.rank,
            "world": self.processes.world,
            "micro_steps": self.cfg.train.grad_accum,
            "vae_encoded_images": self.latents.encoded_images if self.latents is not None else 0,
            "text_encoded_prompts": self.text.encoded_prompts,
            **self.record,
        }
        folder = self.run.root / "processes"
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / f"rank-{self.processes.rank}.json", json.dumps(record, indent=1).encode())

    def _write_network(self, path: Path, meta: dict, fault=None, index=None) -> None:
        """The user's network in its file layout (see ``lora/variants.py`` for LoKr, LoHa and DoRA)."""
        cfg = self.cfg
        if cfg.target.type == "lora":
            weights = network.user_lora_weights(self.transformer)
            save_lora(path, weights, cfg.save.dtype, meta, fault=fault, index=index)
        else:
            files = network_file(self.transformer, cfg.target.type, network.USER)
            save_network(path, files, cfg.save.dtype, meta, fault=fault, index=index)

    def sample(self, step: int, shown: bool = True) -> list[Path]:
        """A round of previews as inference makes them: the adapter off, the LoRA (EMA weights, if on) at its scale.
        ``shown=False`` (step 0 with ``sample.first`` off): rendered into ``samples/reference/`` for the scores only."""
        processes = self.processes
        every = list(range(len(self.previews)))
        # split by prompt; a sharded model runs each forward on every process together, so each renders all
        mine = processes.share(every) if processes.several and not self.sharded else every
        images = {}
        was_training = self.transformer.training
        self.transformer.eval()
        adapter_on = self.cfg.model.training_adapter is not None
        try:
            with self.state.ema.swapped_in() if self.state.ema is not None else nullcontext():
                for index in mine:
                    p = self.previews[index]
                    network.activate(self.transformer, adapter_on=False, lora_scale=p.lora_scale)
                    pos, neg = self.text([p.prompt, p.negative_prompt])
                    z = denoise(
                        self.transformer, self.comps.scheduler.config, pos, neg, p.settings, self.device,
                        autocast=self.accelerator.autocast,
                    )  # fmt: skip
                    with torch.no_grad(), self.preview_vae.visit():
                        pixels = decode_latents(self.comps.vae, z.to(self.device, self.comps.vae.dtype))
                    images[index] = tensor_to_pil(pixels)[0]
        finally:
            network.activate(self.transformer, adapter_on=adapter_on)
            self.transformer.train(was_training)
        if processes.several and mine != every:
            for part in processes.gather(images):
                images.update(part)
        if not processes.main:  # the main process writes the round
            return []
        paths = []
        for index in every:
            path = self.run.sample_path(step, index) if shown else self.run.reference_path(index)
            path.parent.mkdir(exist_ok=True)
            p = self.previews[index]
            save_png(path, images[index], png_info(p, step, self.arch.name, self.comps.scheduler.config.shift))
            paths.append(path)
        if shown:
            build_contact_sheet(self.run.samples_dir, [p.prompt for p in self.previews])
            self.sample_paths.extend(paths)
        self._score_round(step, paths)
        return paths

    def _score_round(self, step: int, paths: list[Path]) -> None:
        """Step 0's round is the reference; every later one is scored against it (and logged)."""
        if step == 0:
            self.scorer.set_reference(paths)
            return
        if self.scorer.reference is None:  # a resumed run: step 0's previews are on disk
            shown_first = self.cfg.sample.first
            found = self.run.samples() if shown_first else sample_files(self.run.reference_dir)
            reference = {index: path for s, index, path in found if s == 0}
            if len(reference) == len(self.previews):
                self.scorer.set_reference([reference[i] for i in range(len(self.previews))])
        scores = self.scorer.score(paths)
        self.round_scores[step] = scores
        if scores.line():
            self.log(f"scores at step {step}: {scores.line()}")

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    # --- the end of a run -------------------------------------------------------------------------------------------
    def _stopped(self, result: TrainResult) -> TrainResult:
        self.close()
        if not self.processes.main:
            return result
        self.run.write_run_json(
            status="stopped", stopped_at=result.stopped_at, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z")
        )
        self.log(f"stopped at step {result.stopped_at} and saved; continue with: zimage-lora train JOB.yaml --resume")
        result.memory = self.memory_record()
        return result

    def _finish(self, result: TrainResult) -> TrainResult:
        """The final files: the LoRA (and its state), the last previews, the contact sheet, the model card, run.json.
        A run killed after its last state but before these writes them on ``--resume`` (no step is taken again)."""
        steps = self.cfg.train.steps
        final = self.save(steps, final=True)
        if self.cfg.sample.active:  # the last step rendered its previews (a kill can have come in between)
            rendered = {index for step, index, _ in self.run.samples() if step == steps}
            # the main process's view decides (another machine may not see the run folder)
            if self.processes.gather(len(rendered) < len(self.previews))[0]:
                self.sample(steps)
            if self.processes.main:
                build_contact_sheet(self.run.samples_dir, [p.prompt for p in self.previews])
        self.close()
        if not self.processes.main:
            return result
        result.samples = self.sample_paths
        result.memory = self.memory_record()
        sheet = self.run.samples_dir / "contact_sheet.png"
        result.contact_sheet = sheet if self.cfg.sample.active and sheet.is_file() else None
        rows = [row for row in read_metrics(self.run.root) if any(k in row for k in (*card.SCORES, "leak_note"))]
        checkpoints = {step: path.name for step, path in self.run.checkpoints()}
        scores = card.scores_section(rows, checkpoints, (steps, final.name))
        self.run.write_text(
            "README.md", card.model_card(self.cfg, self.arch, final, steps, result.contact_sheet, scores)
        )
        self.run.write_run_json(status="done", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), final_lora=final.name)
        self.log(f"done: {final}")
        faults.fire("finished")
        self.control.answer_late_requests(final)
        return result

    def memory_record(self) -> dict:
        """What the memory savers did so far: device visits of the text encoder and VAE, the offloaders' counts."""
        vae_visits = [c.visits for c in (self.latents and self.latents.vae_on_device, self.preview_vae) if c]
        record = {"text_encoder_visits": self.text.visits, "vae_visits": sum(vae_visits)}
        if self.text_offloader is not None:
            o = self.text_offloader
            record["text_encoder_offload"] = {"layers": list(o.offloaded), "loads": list(o.loads),
                                              "max_resident": o.max_resident}  # fmt: skip
        if self.offloader is not None:
            o = self.offloader
            record["offload"] = {
                "blocks": list(o.offloaded),
                "loads": list(o.loads),
                "evictions": list(o.evictions),
                "max_resident": o.max_resident,
            }
        return record


def _lost_peer(error: RuntimeError) -> str | None:
    """How a collective failed when a peer process died (its connection closed) or did not answer in time; None for
    another error."""
    text = str(error)
    signs = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Timed out", "timed out")
    found = next((sign for sign in signs if sign in text), None)
    if found is None and isinstance(error, torch.distributed.DistError):
        found = type(error).__name__
    return found.lower() if found else None


def flip_variants(ds) -> list[str]:
    """The flips a dataset's images may be drawn with ("" always; "x", "y", "xy" as ``flip_x`` / ``flip_y`` allow)."""
    allowed = {axis for axis, on in (("x", ds.flip_x), ("y", ds.flip_y)) if on}
    return [f for f in ("", "x", "y", "xy") if set(f) <= allowed]


def class_caption(caption: str, cfg) -> str:
    """The caption with the trigger word replaced by the class word (DOP's preservation prompt)."""
    return caption.replace(cfg.job.trigger_word, cfg.train.dop.class_word) if cfg.job.trigger_word else caption


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
