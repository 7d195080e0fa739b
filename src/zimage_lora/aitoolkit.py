"""``zimage-lora import-job``: an AI Toolkit job file (YAML or JSON) as a zimage-lora job.

AI Toolkit's UI writes ``job: extension`` and ``config: {name, process: [one trainer process]}``; the process holds
its panels (``network``, ``save``, ``datasets``, ``train``, ``model``, ``sample``, ``logging``). Every key of the
file ends in one finding:

- **mapped**: the value went to our key unchanged in meaning;
- **converted**: it maps, but means something different here, so a stated rule changed it (Turbo's
  ``sample_steps: 9`` counts one more step than transformer forwards, so it becomes 8; ``linear_alpha`` is ignored
  there for Z-Image, so alpha = rank; ...) or its effect differs (the ``weighted`` timestep curve, the trigger word
  it puts into captions on its own, differential guidance that did nothing there without the guidance loss);
- **not mapped**: listed by its full path with the reason (a video or edit-model key, an optimizer or loss we lack,
  a key nobody knows).

The job is validated as it is built: a value our schema refuses (a resolution that is not a multiple of 16) is
left at our default and listed as not mapped, with the schema's sentence. A file that is not YAML or JSON, not an AI
Toolkit job, or a job for another model ends in one sentence (``UserError``) and nothing is written.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from zimage_lora.config import DEFAULT_TRAINING_ADAPTER, parse_job
from zimage_lora.errors import ConfigError, UserError
from zimage_lora.models.arch import ALIASES, ARCHS, FAMILY_ALIAS, TURBO, TURBO_ADAPTER, arch_for_alias
from zimage_lora.training.optim import OPTIMIZERS

Kind = Literal["mapped", "converted", "not mapped"]
KINDS: tuple[Kind, ...] = ("converted", "not mapped", "mapped")  # the order a report lists them in
GUIDANCE_RULES = ("current", "before-2026-07-08")
TRAINER_TYPES = ("diffusion_trainer", "sd_trainer", "ui_trainer")
TURBO_SAMPLE_STEPS = 9  # AI Toolkit's Turbo default: 8 transformer forwards, counted as 9 by older pipelines
QTYPES = {"qfloat8": "float8", "float8": "float8", "qint8": "int8", "int8": "int8", "nf4": "nf4"}
LOW_BIT = re.compile(r"^q?u?int[1-6]\b")  # uint4, qint4, uint3|<accuracy recovery adapter>, ...: 4 bits and under
DTYPES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "fp32": "fp32", "float32": "fp32"}
TIMESTEPS = {"weighted": "weighted", "sigmoid": "sigmoid", "linear": "linear", "shift": "shift"}
BIASES = {"balanced": "balanced", "content": "high_noise", "style": "low_noise"}
VIDEO = "a video setting; Z-Image makes still images"
CONTROL = "control images are for edit models; Z-Image trains text-to-image"


@dataclass
class Finding:
    path: str  # the key in the AI Toolkit file, e.g. config.process[0].train.lr
    kind: Kind
    detail: str  # mapped/converted: "-> our.key = value" and the rule; not mapped: the reason

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class Imported:
    data: dict[str, Any]  # our job, as a job file holds it (paths as the AI Toolkit file wrote them)
    findings: list[Finding] = field(default_factory=list)
    source: str = "job file"

    def report(self) -> list[str]:
        """The findings as lines, converted first, then not mapped, then mapped."""
        lines = []
        for kind in KINDS:
            found = [f for f in self.findings if f.kind == kind]
            if found:
                lines.append(f"{kind} ({len(found)}):")
                lines += [f"  {f.path}: {f.detail}" for f in found]
        return lines

    def yaml(self) -> str:
        """The job file: the report as comments on top, then the keys that were set (our defaults for the rest)."""
        head = [f"# Imported from the AI Toolkit job {self.source} by zimage-lora import-job.", "#"]
        head += [f"# {line}" for line in self.report()]
        body = yaml.safe_dump(self.data, sort_keys=False, allow_unicode=True, width=120)
        return "\n".join(head) + "\n\n" + body


def import_job_file(path: Path, guidance_rule: str = "current") -> Imported:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found; give the path of an AI Toolkit job file (.yaml or .json)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read it as text ({e}); give an AI Toolkit job file (.yaml or .json)") from None
    return import_job_text(text, str(path), guidance_rule)


def import_job_text(text: str, source: str = "job file", guidance_rule: str = "current") -> Imported:
    """An AI Toolkit job (YAML or JSON text) as our job data and the findings; UserError for a file that is not
    one."""
    if guidance_rule not in GUIDANCE_RULES:
        raise UserError(f"--guidance-rule: {guidance_rule!r} is not one of {', '.join(GUIDANCE_RULES)}")
    root = _parse(text, source)
    process = _process(root, source)
    importer = _Importer(source, guidance_rule)
    importer.run(root, process)
    return importer.result()


def _parse(text: str, source: str) -> dict:
    try:
        root = yaml.safe_load(text)  # JSON is YAML
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise UserError(f"{source}: not a YAML or JSON file{where}; give an AI Toolkit job file") from None
    if not isinstance(root, dict):
        raise UserError(f"{source}: not an AI Toolkit job file (no job/config mapping at the top)")
    if root.get("version") == 1 and isinstance(root.get("job"), dict):
        raise UserError(f"{source} is a zimage-lora job already; train it with: zimage-lora train {source}")
    return root


def _process(root: dict, source: str) -> dict:
    if root.get("job") != "extension" or not isinstance(root.get("config"), dict):
        raise UserError(
            f"{source}: not an AI Toolkit job file (it needs 'job: extension' and a 'config' mapping with a process "
            "list, as AI Toolkit's UI writes)"
        )
    processes = root["config"].get("process")
    if not isinstance(processes, list) or not processes or not all(isinstance(p, dict) for p in processes):
        raise UserError(f"{source}: config.process must be a list holding the trainer's settings")
    if len(processes) > 1:
        raise UserError(f"{source}: config.process holds {len(processes)} processes; import one job per file")
    process = processes[0]
    model = process.get("model") if isinstance(process.get("model"), dict) else {}
    arch = model.get("arch")
    if arch != FAMILY_ALIAS and arch not in ALIASES:
        names = ", ".join([FAMILY_ALIAS, *ALIASES])
        shown = f"arch {arch!r}" if arch else "no model.arch"
        raise UserError(f"{source}: the job has {shown}, not a Z-Image model; zimage-lora imports {names} jobs")
    if process.get("type", "diffusion_trainer") not in TRAINER_TYPES:
        raise UserError(f"{source}: process type {process.get('type')!r} is not a trainer ({', '.join(TRAINER_TYPES)})")
    return process


class _Importer:
    """Walks the file once; every key it visits ends in a finding."""

    def __init__(self, source: str, guidance_rule: str):
        self.source, self.guidance_rule = source, guidance_rule
        self.data: dict[str, Any] = {"version": 1}
        self.findings: list[Finding] = []
        self.origin: dict[str, str] = {}  # our key -> the AI Toolkit key it came from (to undo a refused value)
        self.turbo = False

    # --- findings ---------------------------------------------------------------------------------------------
    def put(self, ours: str, value: Any, path: str, kind: Kind = "mapped", why: str = "") -> None:
        node = self.data
        parts = _split(ours)
        for part in parts[:-1]:
            node = node.setdefault(part, {}) if isinstance(part, str) else node[part]
        node[parts[-1]] = value
        self.origin[ours] = path
        detail = f"-> {ours} = {json.dumps(value)}" + (f" ({why})" if why else "")
        self.findings.append(Finding(path, kind, detail))

    def skip(self, path: str, reason: str) -> None:
        self.findings.append(Finding(path, "not mapped", reason))

    def note(self, path: str, detail: str) -> None:
        self.findings.append(Finding(path, "converted", detail))

    def rest(self, section: dict, prefix: str, done: set[str], reasons: dict[str, str] | None = None) -> None:
        """Every key of ``section`` not handled: not mapped, with its reason (or: unknown here)."""
        for key, value in section.items():
            if key in done:
                continue
            reason = (reasons or {}).get(key)
            if reason is None:
                reason = "not an AI Toolkit setting zimage-lora knows; nothing was done with it"
            self.skip(f"{prefix}.{key}", f"{reason} (value {json.dumps(value, default=str)})")

    # --- the walk -----------------------------------------------------------------------------------------------
    def run(self, root: dict, process: dict) -> None:
        config = root["config"]
        p = "config.process[0]"
        self.findings.append(Finding("job", "mapped", "-> a zimage-lora job file (extension: a trainer job)"))
        name = config.get("name")
        if isinstance(name, str) and name:
            self.put("job.name", _job_name(name), "config.name", *_renamed(name))
        else:
            self.put("job.name", "imported", "config.name", "converted", "the file names no job: a name was chosen")
        self.rest(config, "config", {"name", "process"})
        for key, value in root.items():
            if key == "meta":
                self.skip("meta", "AI Toolkit's own metadata; our LoRA files carry the job's settings in theirs")
            elif key not in ("job", "config"):
                self.skip(key, f"not part of an AI Toolkit job (value {json.dumps(value, default=str)})")
        self.job(process, p)
        self.model(process.get("model") or {}, f"{p}.model")
        self.network(process.get("network") or {}, f"{p}.network")
        self.save(process.get("save") or {}, f"{p}.save")
        self.train(process.get("train") or {}, f"{p}.train")
        for i, dataset in enumerate(process.get("datasets") or []):
            self.dataset(dataset, i, f"{p}.datasets[{i}]", process.get("trigger_word"))
        if not process.get("datasets"):
            self.skip(f"{p}.datasets", "the job lists no dataset; add one under datasets before training")
        self.sample(process.get("sample") or {}, f"{p}.sample")
        sections = {"model", "network", "save", "train", "datasets", "sample"}
        reasons = {
            "logging": "we log every step to metrics.jsonl and TensorBoard, and the web UI reads them",
            "performance_log_every": "step timings are in each run's train.log and metrics",
            "sqlite_db_path": "AI Toolkit's UI database; the zimage-lora UI keeps its own",
        }
        self.rest(process, p, {"type", "training_folder", "device", "trigger_word", *sections}, reasons)

    def job(self, process: dict, p: str) -> None:
        self.findings.append(Finding(f"{p}.type", "mapped", "-> training (zimage-lora train)"))
        if "training_folder" in process:
            self.put("job.output_dir", str(process["training_folder"]), f"{p}.training_folder")
            self._relative(f"{p}.training_folder", process["training_folder"])
        if "device" in process:
            self.put("job.device", str(process["device"]), f"{p}.device")
        if process.get("trigger_word"):
            self.put("job.trigger_word", str(process["trigger_word"]), f"{p}.trigger_word")

    def model(self, model: dict, p: str) -> None:
        alias, adapter, path = model.get("arch"), model.get("assistant_lora_path"), model.get("name_or_path")
        arch, why = arch_for_alias(alias, path, adapter)
        self.turbo = arch in (TURBO_ADAPTER, TURBO)
        self.put("model.arch", arch, f"{p}.arch", "mapped" if alias in ALIASES else "converted", why)
        if path:
            self.put("model.name_or_path", str(path), f"{p}.name_or_path")
            self._relative(f"{p}.name_or_path", path)
        if adapter and ARCHS[arch].adapter != "forbidden":
            self.put("model.training_adapter", str(adapter), f"{p}.assistant_lora_path")
            self._relative(f"{p}.assistant_lora_path", adapter)
        elif adapter:
            self.skip(f"{p}.assistant_lora_path", f"{arch} trains without a training adapter")
        elif ARCHS[arch].adapter == "required":
            why = "no assistant_lora_path: our default adapter"
            self.put("model.training_adapter", DEFAULT_TRAINING_ADAPTER, f"{p}.arch", "converted", why)
        for key, ours in (("quantize", "transformer"), ("quantize_te", "text_encoder")):
            qtype_key = "qtype" if key == "quantize" else "qtype_te"
            self._quant(model, key, qtype_key, ours, p)
        if "low_vram" in model:
            self.put("model.low_vram", bool(model["low_vram"]), f"{p}.low_vram")
        self._offload(model, p)
        if "vae_path" in model and model["vae_path"]:
            self.put("model.vae_path", str(model["vae_path"]), f"{p}.vae_path")
        done = {"arch", "assistant_lora_path", "name_or_path", "quantize", "qtype", "quantize_te", "qtype_te"}
        done |= {"low_vram", "vae_path", "layer_offloading"}
        done |= {"layer_offloading_transformer_percent", "layer_offloading_text_encoder_percent"}
        for key in ("model_kwargs", "quantize_kwargs"):
            if key in model and not model[key]:
                done.add(key)
                self.findings.append(Finding(f"{p}.{key}", "mapped", "empty: nothing to carry over"))
        reasons = {
            "model_kwargs": "extra arguments of AI Toolkit's model class; zimage-lora has none for Z-Image",
            "quantize_kwargs": "AI Toolkit's quantizer options; zimage-lora quantizes every main-block linear",
            "dtype": "the model runs in the precision train.mixed_precision picks (bf16 on recent GPUs)",
        }
        self.rest(model, p, done, reasons)

    def _quant(self, model: dict, key: str, qtype_key: str, ours: str, p: str) -> None:
        on, qtype = model.get(key), model.get(qtype_key)
        if key in model:
            if not on:
                self.put(f"quantization.{ours}", "none", f"{p}.{key}")
            elif qtype is None:
                self.put(f"quantization.{ours}", "float8", f"{p}.{key}", "converted", f"no {qtype_key}: float8")
            else:
                self.findings.append(Finding(f"{p}.{key}", "mapped", f"on: quantization.{ours} follows {qtype_key}"))
        if qtype is None:
            return
        if not on:
            self.skip(f"{p}.{qtype_key}", f"{key} is off, so nothing is quantized")
        elif str(qtype) in QTYPES:
            self.put(f"quantization.{ours}", QTYPES[str(qtype)], f"{p}.{qtype_key}")
        elif LOW_BIT.match(str(qtype)):
            self.put(
                f"quantization.{ours}",
                "nf4",
                f"{p}.{qtype_key}",
                "converted",
                f"{qtype} is a low-bit type zimage-lora lacks; nf4 (4 bits, bitsandbytes' format) is its lowest",
            )
        else:
            self.skip(f"{p}.{qtype_key}", f"{qtype!r} is not a type zimage-lora has (float8, int8, nf4)")

    def _offload(self, model: dict, p: str) -> None:
        on = model.get("layer_offloading")
        if "layer_offloading" in model:
            self.findings.append(
                Finding(f"{p}.layer_offloading", "mapped", f"{'on' if on else 'off'}: see the percentages")
            )
        for key, ours in (
            ("layer_offloading_transformer_percent", "model.layer_offload"),
            ("layer_offloading_text_encoder_percent", "model.text_encoder_offload"),
        ):
            if key not in model:
                if on:  # AI Toolkit offloads all of it by default
                    self.put(
                        ours, 1.0, f"{p}.layer_offloading", "converted", f"no {key}: all of it, as AI Toolkit does"
                    )
                continue
            if not on:
                self.skip(f"{p}.{key}", "layer_offloading is off")
                continue
            value = float(model[key])
            if value > 1:
                self.put(ours, value / 100, f"{p}.{key}", "converted", f"{value:g} percent as a fraction")
            else:
                self.put(ours, value, f"{p}.{key}")

    def network(self, network: dict, p: str) -> None:
        kind = network.get("type", "lora")
        if kind in ("lora", "lokr"):
            self.put("target.type", kind, f"{p}.type")
        elif kind == "locon":
            self.put(
                "target.type",
                "lora",
                f"{p}.type",
                "converted",
                "LoCon is LoRA plus convolutions: Z-Image's blocks have none",
            )
        else:
            self.skip(f"{p}.type", f"{kind!r} is not a network zimage-lora trains (lora, lokr, loha, dora)")
        rank = network.get("linear", network.get("rank"))
        if rank is not None:
            self.put("target.rank", int(rank), f"{p}.{'linear' if 'linear' in network else 'rank'}")
            self.put(
                "target.alpha",
                float(rank),
                f"{p}.{'linear' if 'linear' in network else 'rank'}",
                "converted",
                "alpha = rank",
            )
        if "linear_alpha" in network:
            self.note(
                f"{p}.linear_alpha",
                f"ignored: AI Toolkit trains Z-Image with alpha = rank whatever this says ({network['linear_alpha']}), "
                "so the import does too (target.alpha)",
            )
        if "lokr_factor" in network:
            self.put("target.lokr_factor", int(network["lokr_factor"]), f"{p}.lokr_factor")
        kwargs = network.get("network_kwargs") or {}
        if "network_kwargs" in network:
            self._modules(kwargs, f"{p}.network_kwargs")
        reasons = {
            "conv": "Z-Image's transformer blocks have no convolutions",
            "conv_alpha": "Z-Image's transformer blocks have no convolutions",
            "lokr_full_rank": "zimage-lora's LoKr always factors both sides (lokr_factor sets the split)",
            "alpha": "the alpha of an older AI Toolkit; for Z-Image alpha = rank (target.alpha)",
            "dropout": "zimage-lora has no LoRA dropout",
        }
        self.rest(network, p, {"type", "linear", "rank", "linear_alpha", "lokr_factor", "network_kwargs"}, reasons)

    def _modules(self, kwargs: dict, p: str) -> None:
        ignore = kwargs.get("ignore_if_contains") or []
        only = kwargs.get("only_if_contains") or []
        for key in ("ignore_if_contains", "only_if_contains"):
            if key in kwargs and not kwargs[key]:
                self.findings.append(Finding(f"{p}.{key}", "mapped", "empty: every layer of the default set"))
        if ignore or only:
            from zimage_lora.config import DEFAULT_TARGET_REGEX

            body = DEFAULT_TARGET_REGEX.removeprefix("^")
            guard = "".join(f"(?!.*{re.escape(str(s))})" for s in ignore)
            wanted = f"(?=.*(?:{'|'.join(re.escape(str(s)) for s in only)}))" if only else ""
            key = "ignore_if_contains" if ignore else "only_if_contains"
            self.put(
                "target.modules",
                f"^{guard}{wanted}{body}",
                f"{p}.{key}",
                "converted",
                "as a regex over our default layers",
            )
            if ignore and only:
                self.findings.append(
                    Finding(f"{p}.only_if_contains", "converted", "in the same regex as ignore_if_contains")
                )
        self.rest(kwargs, p, {"ignore_if_contains", "only_if_contains"})

    def save(self, save: dict, p: str) -> None:
        if "dtype" in save:
            if str(save["dtype"]) in DTYPES:
                self.put("save.dtype", DTYPES[str(save["dtype"])], f"{p}.dtype")
            else:
                self.skip(f"{p}.dtype", f"{save['dtype']!r} is not bf16, fp16 or fp32")
        if "save_every" in save:
            self.put("save.every", int(save["save_every"]), f"{p}.save_every")
        if "max_step_saves_to_keep" in save:
            self.put("save.keep", int(save["max_step_saves_to_keep"]), f"{p}.max_step_saves_to_keep")
        done = {"dtype", "save_every", "max_step_saves_to_keep"}
        if save.get("save_format", "safetensors") == "safetensors" and "save_format" in save:
            done.add("save_format")
            self.findings.append(Finding(f"{p}.save_format", "mapped", "safetensors: our LoRA files are safetensors"))
        hub = "zimage-lora does not upload; the LoRA file loads in ComfyUI and diffusers as it is, upload it yourself"
        reasons = {"save_format": "zimage-lora writes safetensors only", "push_to_hub": hub, "hf_repo_id": hub}
        reasons["hf_private"] = hub
        self.rest(save, p, done, reasons)

    def train(self, train: dict, p: str) -> None:
        simple = {
            "batch_size": ("train.batch_size", int),
            "steps": ("train.steps", int),
            "lr": ("train.lr", float),
            "gradient_checkpointing": ("train.gradient_checkpointing", bool),
            "max_grad_norm": ("train.max_grad_norm", float),
            "cache_text_embeddings": ("train.cache_text_embeddings", bool),
            "unload_text_encoder": ("train.unload_text_encoder", bool),
        }
        for key, (ours, cast) in simple.items():
            if key in train:
                self.put(ours, cast(train[key]), f"{p}.{key}")
        for key in ("gradient_accumulation", "gradient_accumulation_steps"):
            if key in train:
                self.put("train.grad_accum", int(train[key]), f"{p}.{key}")
        done = set(simple) | {"gradient_accumulation", "gradient_accumulation_steps"}
        done |= self._optimizer(train, p)
        done |= self._timesteps(train, p)
        done |= self._preservation(train, p)
        done |= self._sampling_switches(train, p)
        if "dtype" in train:
            precision = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}.get(DTYPES.get(str(train["dtype"]), ""))
            if precision:
                self.put("train.mixed_precision", precision, f"{p}.dtype")
            else:
                self.skip(f"{p}.dtype", f"{train['dtype']!r} is not bf16, fp16 or fp32")
            done.add("dtype")
        ema = train.get("ema_config")
        if isinstance(ema, dict):
            if "use_ema" in ema:
                self.put("train.ema.enabled", bool(ema["use_ema"]), f"{p}.ema_config.use_ema")
            if "ema_decay" in ema:
                self.put("train.ema.decay", float(ema["ema_decay"]), f"{p}.ema_config.ema_decay")
            self.rest(ema, f"{p}.ema_config", {"use_ema", "ema_decay"})
            done.add("ema_config")
        for key, fixed in (("train_unet", True), ("train_text_encoder", False), ("noise_scheduler", "flowmatch")):
            if key in train and train[key] == fixed:
                done.add(key)
                self.findings.append(
                    Finding(f"{p}.{key}", "mapped", f"{json.dumps(fixed)}: what zimage-lora always does")
                )
        loss = train.get("loss_type")
        if loss in ("mse", "mae", "pseudo_huber"):
            self.put("train.loss", loss, f"{p}.loss_type")
            done.add("loss_type")
        reasons = {
            "train_unet": "the LoRA always trains the transformer",
            "train_text_encoder": "zimage-lora trains no text-encoder LoRA (Z-Image's Qwen3 encoder stays frozen)",
            "noise_scheduler": "Z-Image trains with flow matching only",
            "loss_type": "not a loss zimage-lora has (mse, mae, pseudo_huber)",
            "switch_boundary_every": "for Wan 2.2's two experts; Z-Image has one transformer",
            "noise_offset": "does not apply to flow matching; zimage-lora has none",
            "min_snr_gamma": "an SNR weighting for noise-prediction models; zimage-lora has none",
            "lr_scheduler_params": "zimage-lora's schedules take train.warmup_steps only",
            "linear_timesteps": "zimage-lora's timestep types are weighted, sigmoid, linear, shift, lognorm",
            "linear_timesteps2": "zimage-lora's timestep types are weighted, sigmoid, linear, shift, lognorm",
            "bypass_guidance_embedding": "for Flux's guidance embedding; Z-Image has none",
            "weight_jitter": "zimage-lora has no weight jitter",
        }
        self.rest(train, p, done, reasons)

    def _optimizer(self, train: dict, p: str) -> set[str]:
        done = set()
        name = train.get("optimizer")
        if name is not None:
            done.add("optimizer")
            if str(name).lower() in OPTIMIZERS:
                self.put("train.optimizer", str(name).lower(), f"{p}.optimizer")
            else:
                self.skip(f"{p}.optimizer", f"{name!r} is not one of ours ({', '.join(OPTIMIZERS)}); adamw8bit is used")
        params = train.get("optimizer_params")
        if isinstance(params, dict):
            done.add("optimizer_params")
            if "weight_decay" in params:
                self.put("train.weight_decay", float(params["weight_decay"]), f"{p}.optimizer_params.weight_decay")
            reason = "zimage-lora's optimizers take their defaults for everything but lr and weight decay"
            self.rest(params, f"{p}.optimizer_params", {"weight_decay"}, {k: reason for k in params})
        schedule = train.get("lr_scheduler")
        if schedule is not None:
            done.add("lr_scheduler")
            if schedule in ("constant", "cosine", "linear"):
                self.put("train.lr_scheduler", schedule, f"{p}.lr_scheduler")
            else:
                self.skip(f"{p}.lr_scheduler", f"{schedule!r} is not constant, cosine or linear; constant is used")
        return done

    def _timesteps(self, train: dict, p: str) -> set[str]:
        done = set()
        kind = train.get("timestep_type")
        if kind is not None:
            done.add("timestep_type")
            if kind == "weighted":
                self.put(
                    "train.timestep_type",
                    "weighted",
                    f"{p}.timestep_type",
                    "converted",
                    "the name maps, the curve differs: ours peaks near sigma 0.8 (high-mid noise), AI Toolkit's "
                    "is its own bell-shaped table",
                )
            elif kind in TIMESTEPS:
                self.put("train.timestep_type", TIMESTEPS[kind], f"{p}.timestep_type")
            elif kind == "lognorm_blend":
                self.put(
                    "train.timestep_type", "lognorm", f"{p}.timestep_type", "converted",
                    "ours is the plain logit-normal; AI Toolkit blends in some uniform draws",
                )  # fmt: skip
            else:
                self.skip(f"{p}.timestep_type", f"{kind!r} is not a timestep type zimage-lora has; weighted is used")
        bias = train.get("content_or_style")
        if bias is not None:
            done.add("content_or_style")
            if bias in BIASES:
                self.put("train.timestep_bias", BIASES[bias], f"{p}.content_or_style", why="content draws more "
                         "high-noise steps (layout, subject), style more low-noise ones (texture)")  # fmt: skip
            else:
                self.skip(f"{p}.content_or_style", f"{bias!r} is not balanced, content or style")
        return done

    def _preservation(self, train: dict, p: str) -> set[str]:
        keys = {
            "diff_output_preservation": ("train.dop.enabled", bool),
            "diff_output_preservation_multiplier": ("train.dop.multiplier", float),
            "diff_output_preservation_class": ("train.dop.class_word", str),
            "blank_prompt_preservation": ("train.blank_prompt_preservation.enabled", bool),
            "blank_prompt_preservation_multiplier": ("train.blank_prompt_preservation.multiplier", float),
            "do_guidance_loss": ("train.guidance_loss.enabled", bool),
        }
        for key, (ours, cast) in keys.items():
            if key in train:
                self.put(ours, cast(train[key]), f"{p}.{key}")
        done = set(keys)
        target = train.get("guidance_loss_target")
        if target is not None:
            done.add("guidance_loss_target")
            if isinstance(target, (int, float)):
                self.put("train.guidance_loss.target", float(target), f"{p}.guidance_loss_target")
            else:
                self.skip(f"{p}.guidance_loss_target", "a range of targets; zimage-lora takes one number")
        if "do_differential_guidance" in train:
            on = bool(train["do_differential_guidance"])
            why = ""
            if on and not train.get("do_guidance_loss"):
                why = (
                    "it did nothing in AI Toolkit without do_guidance_loss (its code sits in that branch); here it "
                    "acts on every step: set it false to train as that job trained"
                )
            self.put(
                "advanced.differential_guidance.enabled",
                on,
                f"{p}.do_differential_guidance",
                "converted" if why else "mapped",
                why,
            )
        if "differential_guidance_scale" in train:
            scale = float(train["differential_guidance_scale"])
            self.put("advanced.differential_guidance.scale", scale, f"{p}.differential_guidance_scale")
        return done | {"do_differential_guidance", "differential_guidance_scale"}

    def _sampling_switches(self, train: dict, p: str) -> set[str]:
        if "skip_first_sample" in train:
            self.put("sample.first", not train["skip_first_sample"], f"{p}.skip_first_sample")
        if train.get("force_first_sample"):
            self.put("sample.first", True, f"{p}.force_first_sample")
        elif "force_first_sample" in train:
            self.findings.append(Finding(f"{p}.force_first_sample", "mapped", "false: sample.first decides"))
        if "disable_sampling" in train:
            self.put("sample.enabled", not train["disable_sampling"], f"{p}.disable_sampling")
        return {"skip_first_sample", "force_first_sample", "disable_sampling"}

    def dataset(self, ds: dict, i: int, p: str, trigger: str | None) -> None:
        if not isinstance(ds, dict):
            self.skip(p, "not a mapping of dataset settings")
            return
        ours = f"datasets[{i}]"
        self.data.setdefault("datasets", []).append({})
        path = ds.get("folder_path") or ds.get("dataset_path")
        if path:
            key = "folder_path" if ds.get("folder_path") else "dataset_path"
            self.put(f"{ours}.path", str(path), f"{p}.{key}")
            self._relative(f"{p}.{key}", path)
        else:
            self.put(f"{ours}.path", "./dataset", p, "converted", "no folder_path: ./dataset, next to the job file")
        simple = {
            "default_caption": ("default_caption", str),
            "caption_dropout_rate": ("caption_dropout", float),
            "num_repeats": ("repeats", int),
            "is_reg": ("is_reg", bool),
            "network_weight": ("network_weight", float),
            "flip_x": ("flip_x", bool),
            "flip_y": ("flip_y", bool),
            "mask_min_value": ("mask_min_value", float),
            "shuffle_tokens": ("shuffle_tokens", bool),
            "keep_tokens": ("keep_tokens", int),
            "token_dropout_rate": ("token_dropout", float),
        }
        for key, (name, cast) in simple.items():
            if key in ds and ds[key] is not None:
                self.put(f"{ours}.{name}", cast(ds[key]), f"{p}.{key}")
        if ds.get("caption_ext"):
            self.put(f"{ours}.caption_ext", str(ds["caption_ext"]).lstrip("."), f"{p}.caption_ext")
        if ds.get("mask_path"):
            self.put(f"{ours}.mask_path", str(ds["mask_path"]), f"{p}.mask_path")
        for key in ("cache_latents_to_disk", "cache_latents"):
            if key in ds:
                disk = bool(ds.get("cache_latents_to_disk")) or bool(ds.get("cache_latents"))
                why = "" if key == "cache_latents_to_disk" else "zimage-lora caches latents on disk"
                self.put(f"{ours}.cache_latents", disk, f"{p}.{key}", "mapped" if not why else "converted", why)
        if "resolution" in ds:
            sizes = ds["resolution"] if isinstance(ds["resolution"], list) else [ds["resolution"]]
            self.put(f"{ours}.resolutions", [int(s) for s in sizes], f"{p}.resolution")
        if trigger and not ds.get("is_reg"):
            self.put(
                f"{ours}.add_trigger",
                True,
                "config.process[0].trigger_word",
                "converted",
                f"AI Toolkit puts the trigger word in front of every caption that lacks it; add_trigger does the same "
                f"here (off, captions would hold {trigger!r} only where they write it or [trigger])",
            )
        done = set(simple) | {"folder_path", "dataset_path", "caption_ext", "resolution"}
        done |= {"mask_path"} if ds.get("mask_path") else set()
        done |= {"cache_latents_to_disk", "cache_latents"}
        idle = {"controls": [], "control_path": None, "num_frames": 1, "shrink_video_to_frames": False, "do_i2v": False}
        idle |= {f"control_path_{n}": None for n in (1, 2, 3)} | {"mask_path": None}
        for key, value in idle.items():
            if key in ds and key not in done and ds[key] in (value, None, [], ""):
                done.add(key)
                self.findings.append(Finding(f"{p}.{key}", "mapped", "empty or off: nothing to carry over"))
        reasons = {key: CONTROL for key in ("controls", "control_path", "control_path_1", "control_path_2")}
        reasons |= {"control_path_3": CONTROL, "num_frames": VIDEO, "shrink_video_to_frames": VIDEO, "do_i2v": VIDEO}
        reasons |= {
            "random_crop": "zimage-lora buckets by aspect and centre-crops to the bucket",
            "random_scale": "zimage-lora buckets by aspect and centre-crops to the bucket",
            "buckets": "zimage-lora always buckets by aspect ratio",
            "augments": "zimage-lora's augmentations are flip_x and flip_y",
            "augmentations": "zimage-lora's augmentations are flip_x and flip_y",
            "alpha_mask": "zimage-lora takes loss masks from mask_path",
            "type": "zimage-lora datasets are image folders",
        }
        self.rest(ds, p, done, reasons)

    def sample(self, sample: dict, p: str) -> None:
        simple = {
            "sample_every": ("sample.every", int),
            "width": ("sample.width", int),
            "height": ("sample.height", int),
        }
        simple |= {"seed": ("sample.seed", int), "walk_seed": ("sample.walk_seed", bool)}
        for key, (ours, cast) in simple.items():
            if key in sample:
                self.put(ours, cast(sample[key]), f"{p}.{key}")
        if sample.get("neg"):
            self.put("sample.negative_prompt", str(sample["neg"]), f"{p}.neg")
        elif "neg" in sample:
            self.findings.append(Finding(f"{p}.neg", "mapped", "empty: no negative prompt"))
        if "guidance_scale" in sample:
            self._guidance("sample.guidance", sample["guidance_scale"], f"{p}.guidance_scale")
        if "sample_steps" in sample:
            self._steps("sample.steps", sample["sample_steps"], f"{p}.sample_steps")
        scale = sample.get("network_multiplier")
        prompts = [{"prompt": str(text)} for text in sample.get("prompts") or []]
        for i, item in enumerate(sample.get("samples") or []):
            prompts.append(self._prompt(item, f"{p}.samples[{i}]", len(prompts)))
        for i, _ in enumerate(sample.get("prompts") or []):
            self.findings.append(Finding(f"{p}.prompts[{i}]", "mapped", f"-> sample.prompts[{i}]"))
        if scale is not None:
            for prompt in prompts:
                prompt.setdefault("lora_scale", float(scale))
            self.findings.append(Finding(f"{p}.network_multiplier", "mapped", "-> each prompt's lora_scale"))
        prompts = [q if set(q) != {"prompt"} else q["prompt"] for q in prompts if q.get("prompt")]
        if prompts:
            self.data.setdefault("sample", {})["prompts"] = prompts
            for i in range(len(prompts)):
                self.origin[f"sample.prompts[{i}]"] = f"{p}.samples[{i}]"
        done = set(simple) | {"neg", "guidance_scale", "sample_steps", "samples", "prompts", "network_multiplier"}
        if sample.get("sampler") in ("flowmatch", None) and "sampler" in sample:
            done.add("sampler")
            self.findings.append(Finding(f"{p}.sampler", "mapped", "flowmatch: Z-Image's Euler flow-matching sampler"))
        for key, idle in (("num_frames", 1), ("fps", None)):
            if key in sample and sample[key] in (idle, 1, None):
                done.add(key)
                self.findings.append(Finding(f"{p}.{key}", "mapped", f"{sample[key]}: a still image"))
        reasons = {
            "sampler": "previews use Z-Image's flow-matching Euler sampler",
            "num_frames": VIDEO,
            "fps": VIDEO,
            "format": "previews are PNG files",
            "ext": "previews are PNG files",
            "guidance_rescale": "zimage-lora has no guidance rescale",
        }
        self.rest(sample, p, done, reasons)

    def _prompt(self, item: Any, p: str, index: int) -> dict:
        if not isinstance(item, dict) or not item.get("prompt"):
            self.skip(p, "a sample without a prompt")
            return {}
        out: dict[str, Any] = {"prompt": str(item["prompt"])}
        self.findings.append(Finding(f"{p}.prompt", "mapped", f"-> sample.prompts[{index}].prompt"))
        for key, ours, cast in (("seed", "seed", int), ("width", "width", int), ("height", "height", int)):
            if key in item and item[key] is not None:
                out[ours] = cast(item[key])
                self.findings.append(Finding(f"{p}.{key}", "mapped", f"-> sample.prompts[{index}].{ours}"))
        if "network_multiplier" in item:
            out["lora_scale"] = float(item["network_multiplier"])
            self.findings.append(Finding(f"{p}.network_multiplier", "mapped", f"-> sample.prompts[{index}].lora_scale"))
        if item.get("guidance_scale") is not None:
            out["guidance"] = self._guidance_value(item["guidance_scale"])
            self.findings.append(Finding(f"{p}.guidance_scale", "converted", self._guidance_rule_text(out["guidance"])))
        if item.get("sample_steps") is not None:
            out["steps"], why = self._steps_value(item["sample_steps"])
            self.findings.append(
                Finding(f"{p}.sample_steps", "converted", f"-> sample.prompts[{index}].steps = {out['steps']} ({why})")
            )
        done = {"prompt", "seed", "width", "height", "network_multiplier", "guidance_scale", "sample_steps"}
        if "neg" in item and not item["neg"]:
            done.add("neg")
            self.findings.append(Finding(f"{p}.neg", "mapped", "empty: the section's negative prompt"))
        reasons = {
            "neg": "one negative prompt for all previews here: sample.negative_prompt",
            "ctrl_img": CONTROL,
            "ctrl_idx": CONTROL,
            "ctrl_img_1": CONTROL,
            "ctrl_img_2": CONTROL,
            "ctrl_img_3": CONTROL,
            "num_frames": VIDEO,
            "fps": VIDEO,
        }
        self.rest(item, p, done, reasons)
        return out

    # --- the rules ----------------------------------------------------------------------------------------------
    def _steps_value(self, steps: Any) -> tuple[int, str]:
        steps = int(steps)
        if self.turbo and steps == TURBO_SAMPLE_STEPS:
            return 8, "AI Toolkit's Turbo 9 meant 8 transformer forwards; our steps count forwards"
        return steps, "kept: our steps count transformer forwards (Turbo's 9 would have become 8)"

    def _steps(self, ours: str, steps: Any, path: str) -> None:
        value, why = self._steps_value(steps)
        self.put(ours, value, path, "converted", why)

    def _guidance_value(self, g: Any) -> float:
        return float(g) + 1 if self.guidance_rule == "before-2026-07-08" else float(g)

    def _guidance_rule_text(self, value: float) -> str:
        if self.guidance_rule == "before-2026-07-08":
            return (
                f"= {value:g}: the rule for AI Toolkit before 2026-07-08 (--guidance-rule before-2026-07-08), where a "
                "value g acted as classic CFG g + 1"
            )
        return (
            f"= {value:g}, kept: since 2026-07-08 AI Toolkit's value is classic CFG, as ours; a file written for an "
            "older AI Toolkit meant g + 1 (import it with --guidance-rule before-2026-07-08)"
        )

    def _guidance(self, ours: str, g: Any, path: str) -> None:
        value = self._guidance_value(g)
        self.put(
            ours, value, path, "converted", self._guidance_rule_text(value).removeprefix(f"= {value:g}").lstrip(", :")
        )

    def _relative(self, path: str, value: Any) -> None:
        text = str(value)
        if text and not Path(text).expanduser().is_absolute() and not _hub_like(text):
            self.note(
                path,
                f"{text!r} is relative: AI Toolkit read it from its own working folder, zimage-lora reads it from the "
                "job file's folder; make it absolute or move the job file",
            )

    # --- the result ---------------------------------------------------------------------------------------------
    def result(self) -> Imported:
        """Validate; a value our schema refuses goes back to our default and is listed as not mapped."""
        for _ in range(50):
            try:
                parse_job(self.data, Path.cwd(), check_paths=False, warnings=[])
                break
            except ConfigError as e:
                if not self._drop(e.problems):
                    raise UserError(f"{self.source}: the imported job is not valid: {e}") from None
        order = ["version", "job", "model", "quantization", "target", "save", "train", "datasets", "sample"]
        data = {key: self.data[key] for key in [*order, "advanced"] if key in self.data}
        return Imported(data, self.findings, self.source)

    def _drop(self, problems: list[str]) -> bool:
        """Undo the value behind the first problem that one of our keys caused (one per round: removing a preview
        prompt renumbers the others)."""
        for problem in problems:
            key = problem.partition(":")[0]
            matches = [k for k in self.origin if key == k or key.startswith((k + ".", k + "["))]
            if not matches:
                continue
            match = max(matches, key=len)
            source = self.origin.pop(match)
            self._remove(match)
            self.findings = [f for f in self.findings if not (f.path == source and f.detail.startswith(f"-> {match} "))]
            self.skip(source, f"refused by zimage-lora, so its default is used: {problem}")
            return True
        return False

    def _remove(self, ours: str) -> None:
        parts = _split(ours)
        node: Any = self.data
        for part in parts[:-1]:
            node = node[part]
        if not isinstance(parts[-1], int):
            node.pop(parts[-1], None)
            return
        del node[parts[-1]]  # a preview prompt: the later ones move up
        sources = [self.origin.pop(f"sample.prompts[{i}]") for i in range(parts[-1] + 1, len(node) + 1)]
        for i, source in enumerate(sources, start=parts[-1]):
            self.origin[f"sample.prompts[{i}]"] = source


def _split(key: str) -> list[str | int]:
    """``datasets[0].path`` -> ``["datasets", 0, "path"]``."""
    parts: list[str | int] = []
    for piece in key.split("."):
        name, *indices = piece.replace("]", "").split("[")
        parts.append(name)
        parts += [int(i) for i in indices]
    return parts


def _job_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")[:64]
    return cleaned or "imported"


def _renamed(name: str) -> tuple[Kind, str]:
    cleaned = _job_name(name)
    return ("mapped", "") if cleaned == name else ("converted", "run names take letters, digits, '.', '_' and '-'")


def _hub_like(text: str) -> bool:
    from zimage_lora.models.refs import is_hub_ref

    return is_hub_ref(text) and not Path(text).exists()
