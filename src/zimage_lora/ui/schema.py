"""The job config as the web UI sees it: form panels derived from the pydantic schema, and the UI's config form.

Panels: one per section of ``JobConfig``, in the order of the config file; every field's type, choices, default,
bounds and help text come from the pydantic models in config.py (nothing is copied by hand, so a new setting shows up
in the form by itself). Per-architecture facts (labels, preview steps and guidance, default model, the training
adapters and their notes) come from the registry in models/arch.py.

The UI's config differs from a job file only in its paths: they are relative to the data folder (``datasets/<n>``,
``models/<n>``), ``job.output_dir`` is always ``jobs``, and defaults that follow another setting (the arch's model
and preview steps, alpha = rank, the dataset's cache folder) stay empty so that changing that setting moves them.
``job_data`` turns it into the job that the trainer runs; validation is the CLI's (``parse_job``, ``check_job``).
"""

from __future__ import annotations

import copy
import re
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python

from zimage_lora.config import (
    DatasetSection,
    JobConfig,
    SamplePrompt,
    StrictYamlLoader,
    dump_yaml,
    job_to_dict,
    parse_job,
    preset_names,
    preset_yaml,
)
from zimage_lora.errors import ConfigError
from zimage_lora.models.arch import ARCHS

PANELS = [
    ("JOB", "job", "Job"),
    ("MODEL", "model", "Model"),
    ("QUANTIZATION", "quantization", "Quantization"),
    ("TARGET", "target", "Target"),
    ("SAVE", "save", "Save"),
    ("TRAINING", "train", "Training"),
    ("DATASETS", "datasets", "Datasets"),
    ("SAMPLE", "sample", "Sample"),
    ("ADVANCED", "advanced", "Advanced"),
]
MODEL_PATHS = ("name_or_path", "training_adapter", "text_encoder_path", "vae_path")
DATA_PREFIXES = ("datasets/", "models/", "jobs/")  # model paths that name something in the data folder
OUTPUT_DIR = "jobs"


# --- panels ---------------------------------------------------------------------------------------------------------


def schema() -> dict[str, Any]:
    panels = []
    for panel_id, section, title in PANELS:
        info = JobConfig.model_fields[section]
        model = _peel(info.annotation)[0]
        fields = _fields(section, model) if _is_model(model) else [_field(section, info)]
        panels.append(
            {"id": panel_id, "section": section, "title": title, "description": info.description, "fields": fields}
        )
    return {"panels": panels, "archs": archs()}


def archs() -> dict[str, Any]:
    """The registry as the UI needs it: labels, default models, preview settings, the adapter rule and the
    published adapters (newest first, each with the guide's note), and the arch each one's LoRAs are used with."""
    return {
        arch.name: {
            "label": arch.label,
            "default_model": arch.default_model,
            "sample_steps": arch.sample_steps,
            "sample_guidance": arch.sample_guidance,
            "adapter": arch.adapter,
            "adapters": {a.version: a.ref for a in arch.adapters},
            "adapter_notes": {a.version: a.note for a in arch.adapters},
            "use_with": arch.use_with,
            "inference": arch.use_with == arch.name,
        }
        for arch in ARCHS.values()
    }


def _fields(prefix: str, model: type[BaseModel]) -> list[dict[str, Any]]:
    out = []
    for name, info in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        inner = _peel(info.annotation)[0]
        out += _fields(key, inner) if _is_model(inner) else [_field(key, info)]
    return out


def _field(key: str, info: FieldInfo) -> dict[str, Any]:
    kind, nullable, metadata = _peel(info.annotation)
    entry: dict[str, Any] = {"key": key, "type": None, "enum": None}
    if get_origin(kind) is Literal:
        entry.update(type="enum", enum=list(get_args(kind)))
    elif get_origin(kind) is list:
        item, _, item_metadata = _peel(get_args(kind)[0])
        if item in (SamplePrompt, DatasetSection):
            entry.update(type="prompts" if item is SamplePrompt else "datasets", item_fields=_fields("", item))
        else:
            entry.update(type="list", item_type=_scalar(item), item_bounds=_bounds(item_metadata))
    else:
        entry["type"] = _scalar(kind)
    required = info.is_required()
    default = None if required else info.get_default(call_default_factory=True)
    entry.update(
        default=to_jsonable_python(default),
        required=required,
        nullable=nullable,
        description=info.description or "",
        min=None,
        max=None,
    )
    entry.update(_bounds([*info.metadata, *metadata]))
    return entry


def _scalar(kind: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string"}
    return names.get(kind, "string")


def _bounds(metadata: list[Any]) -> dict[str, Any]:
    """min/max (with min_exclusive/max_exclusive for gt/lt), multiple_of, pattern, min_items from constraints."""
    out: dict[str, Any] = {}
    for item in metadata:
        if isinstance(item, FieldInfo):
            out.update(_bounds(item.metadata))
            continue
        for attr, key in (("ge", "min"), ("gt", "min"), ("le", "max"), ("lt", "max")):
            if getattr(item, attr, None) is not None:
                out[key] = getattr(item, attr)
                if attr in ("gt", "lt"):
                    out[f"{key}_exclusive"] = True
        for attr, key in (("multiple_of", "multiple_of"), ("pattern", "pattern"), ("min_length", "min_items")):
            if getattr(item, attr, None) is not None:
                out[key] = getattr(item, attr)
    return out


def _peel(annotation: Any) -> tuple[Any, bool, list[Any]]:
    """(type, nullable, constraints) of ``Annotated[X, ...]`` and ``X | None``."""
    nullable, metadata = False, []
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation, *extra = get_args(annotation)
            metadata += extra
        elif origin in (Union, types.UnionType):
            args = [a for a in get_args(annotation) if a is not type(None)]
            nullable = nullable or len(args) < len(get_args(annotation))
            annotation = args[0]
        else:
            return annotation, nullable, metadata


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


# --- the UI's config <-> the trainer's job --------------------------------------------------------------------------


def job_data(config: dict[str, Any], data: Path) -> dict[str, Any]:
    """The UI's config as job data for ``parse_job(..., base_dir=data)``: output in DATA/jobs, DATA's models."""
    out = copy.deepcopy(config)
    if isinstance(out.get("job"), dict):
        out["job"]["output_dir"] = str(data / OUTPUT_DIR)
    model = out.get("model")
    if isinstance(model, dict):
        for key in MODEL_PATHS:
            value = model.get(key)
            if isinstance(value, str) and value.startswith(DATA_PREFIXES):
                model[key] = str(data / value)  # a local path even when it does not exist (an error, not a hub id)
    return out


def ui_config(cfg: JobConfig, data: Path) -> dict[str, Any]:
    """A validated job as the UI's config: paths inside DATA relative to it, following defaults left empty."""
    out = job_to_dict(cfg)
    out["job"]["output_dir"] = OUTPUT_DIR
    model = out["model"]
    for key in MODEL_PATHS:
        model[key] = _relative(model[key], data)
    if model["name_or_path"] == ARCHS[cfg.model.arch].default_model:
        model["name_or_path"] = None
    if out["target"]["alpha"] == float(out["target"]["rank"]):
        out["target"]["alpha"] = None
    for dataset in out["datasets"]:
        if dataset["cache_dir"] == str(Path(dataset["path"]) / ".zimage_cache"):
            dataset["cache_dir"] = None
        dataset["path"] = _relative(dataset["path"], data)
        dataset["cache_dir"] = _relative(dataset["cache_dir"], data)
    validation = out["train"]["validation"]
    validation["images"] = [_relative(p, data) for p in validation["images"]]
    arch = ARCHS[cfg.model.arch]
    if out["sample"]["steps"] == arch.sample_steps:
        out["sample"]["steps"] = None
    if out["sample"]["guidance"] == arch.sample_guidance:
        out["sample"]["guidance"] = None
    return out


def _relative(value: str | None, data: Path) -> str | None:
    if value is None or not Path(value).is_absolute():
        return value
    path = Path(value)
    return path.relative_to(data).as_posix() if path.is_relative_to(data) else value


def config_yaml(config: dict[str, Any]) -> str:
    """The UI's config as a job file (its paths are relative to the data folder)."""
    return dump_yaml(JobConfig.model_validate(config))


ERROR_KEY = re.compile(r"^([A-Za-z_]\w*(?:\[\d+\]|\.[A-Za-z_]\w*)*): (.+)$")


def split_error(message: str) -> dict[str, Any]:
    """A ConfigError line as ``{"key": "train.lr", "message": ...}`` (key None when the line names no key)."""
    match = ERROR_KEY.match(message)
    return {"key": match[1], "message": message} if match else {"key": None, "message": message}


def validate(
    config: Any, data: Path, check_paths: bool = True, warnings: list[dict] | None = None
) -> tuple[dict[str, Any] | None, list[dict]]:
    """(the UI's config, normalised; []) or (None, errors): the CLI's message for each problem, so the form can mark
    every field at once (the schema's problems first; the checks that need a valid schema run once those are fixed).
    ``warnings`` collects what is allowed but unwise (as ``validate`` prints it), each ``{"key", "message"}``."""
    if not isinstance(config, dict):
        return None, [{"key": None, "message": "config: expected a mapping of sections (job, model, ...)"}]
    unchosen = _unchosen_datasets(config, data) if check_paths else {}
    found: list[str] = []
    try:
        cfg = parse_job(job_data(config, data), data, check_paths=check_paths, warnings=found)
    except ConfigError as e:
        errors = [split_error(problem) for problem in e.problems if split_error(problem)["key"] not in unchosen]
        return None, errors + [{"key": key, "message": message} for key, message in unchosen.items()]
    if unchosen:
        return None, [{"key": key, "message": message} for key, message in unchosen.items()]
    if warnings is not None:
        warnings.extend(split_error(w) for w in found)
    return ui_config(cfg, data), []


def _unchosen_datasets(config: dict[str, Any], data: Path) -> dict[str, str]:
    """``{"datasets[i].path": message}`` for each dataset whose folder is not chosen yet: an empty path would
    otherwise be read as the data folder itself ("no images in DATA"), which is not what the form shows."""
    entries = config.get("datasets")
    if not isinstance(entries, list):
        return {}
    folder = data / "datasets"
    have = folder.is_dir() and any(p.is_dir() for p in folder.iterdir())
    fix = "pick one of the data folder's datasets" if have else "there is none yet: create one on the Datasets page"
    return {
        f"datasets[{index}].path": f"datasets[{index}].path: no dataset chosen; {fix}"
        for index, entry in enumerate(entries)
        if isinstance(entry, dict) and not str(entry.get("path") or "").strip()
    }


def parse_yaml(text: str) -> tuple[Any, list[dict]]:
    try:
        return yaml.load(text, Loader=StrictYamlLoader), []  # the CLI's reader: a duplicate key is an error
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "not valid YAML"
        return None, [{"key": None, "message": f"yaml: syntax error{where}: {problem}"}]


def presets(data: Path) -> list[dict[str, Any]]:
    """The shipped presets as UI configs (their dataset folder still to be chosen)."""
    out = []
    for name in preset_names():
        raw = yaml.safe_load(preset_yaml(name))
        config, errors = validate(raw, data, check_paths=False)
        out.append({"name": name, "config": config if not errors else raw})
    return out
