"""The guide's claims, measured on the toy world (``zimage-lora toy-world experiment NAME OUT``).

- ``adapter``, the guide's central claim: the same concept (the demo's stripes) trained (a) on the toy Turbo without
  the adapter (raw Turbo), (b) on the toy Turbo with the toy adapter, (c) on the toy De-Turbo, previewed as
  the guide says (25 steps, CFG 3) and also used on the toy Turbo at 8 steps. At each checkpoint: the concept score
  on trigger prompts, the leak (change on the same prompts without the trigger) and the Turbo drift (attribute
  accuracy of the 8-step, no-CFG pictures without the trigger, against the untouched toy Turbo's).
- ``transfer``: a LoRA trained on the toy base used on the toy Turbo, and one trained on the Turbo (with the
  adapter) used on the base; each against its own model.
- ``adapters``: two toy adapters of different training length (the shipped one and one trained a tenth as long),
  through ``compare`` (the guide's v1 against v2 A/B test).
- ``preservation``: what keeps the stripes from leaking into pictures without the trigger, at PRESERVATION_STEPS
  steps: the striped pictures alone; with the plain pictures in the same dataset (the demo); the plain pictures as a
  regularisation dataset (``is_reg``); Blank Prompt Preservation; and the demo's data with the guidance loss.

Every arm trains the demo's job (``presets/demo.yaml``) with one change, on the same data and seeds; pictures are
scored on a fixed probe set of prompts (``PROBES`` of them, with and without the trigger). A difference between two
arms smaller than its standard error over the probe set is reported as "not shown".
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zimage_lora.models.arch import ARCHS, BASE, DETURBO, TURBO
from zimage_lora.toyworld import demo, score
from zimage_lora.toyworld.demo import TRIGGER
from zimage_lora.toyworld.evaluate import generate_images
from zimage_lora.training.scores import change, thumbnail

PROBES = 32
PROBE_SEED = 6_000_000
SHEET_COLUMNS = 8
Log = Callable[[str], None]


@dataclass(frozen=True)
class Setting:
    """How pictures are made: a model folder, the arch whose steps, guidance and shift it runs with."""

    model: str  # "turbo", "base" or "deturbo" (a folder of the toy models)
    arch: str

    @property
    def label(self) -> str:
        a = ARCHS[self.arch]
        return f"toy {self.model}, {a.cfg_label}"


TURBO_8 = Setting("turbo", TURBO)
DETURBO_25 = Setting("deturbo", DETURBO)
BASE_30 = Setting("base", BASE)


def _components(models: Path, setting: Setting, lora: Path | None, weight: float = 1.0):
    from PIL import Image  # noqa: F401 - loaded here so a missing Pillow fails before the models load

    from zimage_lora.lora import network
    from zimage_lora.lora.io import read_lora
    from zimage_lora.models.loading import load_components

    arch = ARCHS[setting.arch]
    comps = load_components(str(models / setting.model), scheduler_shift=arch.shift if arch.override_shift else None)
    if lora is not None:
        modules = read_lora(lora, network.linear_module_names(comps.transformer)).modules
        network.add_frozen_lora(comps.transformer, modules, "probe")
        comps.transformer.set_adapters(["probe"], [weight])
    return comps


def pictures(models: Path, setting: Setting, lora: Path | None, weight: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The probe prompts' pictures (with the trigger, without it) at ``setting`` with ``lora`` at ``weight``."""
    comps = _components(models, setting, lora, weight)
    arch = ARCHS[setting.arch]
    scenes = demo.probe_scenes(PROBES, PROBE_SEED)
    seeds = [PROBE_SEED + i for i in range(PROBES)]
    shift = comps.scheduler.config.shift
    make = lambda prompts: generate_images(comps, prompts, seeds, arch.sample_steps, arch.sample_guidance, shift)  # noqa: E731
    return make([s.caption(TRIGGER) for s in scenes]), make([s.caption() for s in scenes])


def leak(images: np.ndarray, reference: np.ndarray) -> float:
    """The mean change of the pictures without the trigger from the untouched model's (training/scores.py)."""
    return float(np.mean([change(thumbnail_of(a), thumbnail_of(b)) for a, b in zip(images, reference, strict=True)]))


def thumbnail_of(image: np.ndarray) -> np.ndarray:
    from PIL import Image

    return thumbnail(Image.fromarray(image))


def measure(
    models: Path,
    setting: Setting,
    lora: Path | None,
    untouched: tuple[np.ndarray, np.ndarray],
    sheet: Path | None = None,
) -> dict:
    """Concept, leak and accuracy of a LoRA at a setting, against the untouched model's pictures there; ``sheet``:
    where to save the first SHEET_COLUMNS probes (rows: untouched without the trigger, with the trigger, without)."""
    scenes = demo.probe_scenes(PROBES, PROBE_SEED)
    with_trigger, without = pictures(models, setting, lora)
    if sheet is not None:
        demo.sheet([untouched[1][:SHEET_COLUMNS], with_trigger[:SHEET_COLUMNS], without[:SHEET_COLUMNS]], sheet)
    accuracy = score.accuracy(without, scenes)["all"]
    if sheet is not None:  # each probe's change, for the standard error of the leak
        changes = [change(thumbnail_of(a), thumbnail_of(b)) for a, b in zip(without, untouched[1], strict=True)]
        sheet.with_suffix(".changes.json").write_text(json.dumps(changes))
    return {
        "concept": score.concept_score(with_trigger, scenes),
        "leak": leak(without, untouched[1]),
        "accuracy": accuracy,
        "drift": score.accuracy(untouched[1], scenes)["all"] - accuracy,
    }


def standard_error(p: float, n: int = PROBES) -> float:
    return math.sqrt(max(p * (1 - p), 1e-12) / n)


def train_arm(out: Path, name: str, overrides: list[str], models: Path, log: Log, plain: int = 24, reg: int = 0):
    """The demo's job with ``overrides``, in ``out/name``, its own copy of the data (``plain`` pictures without the
    trigger beside the striped ones; ``reg`` plain pictures in ``reg/``) and the models' folder named."""
    from zimage_lora.config import load_job, preset_yaml
    from zimage_lora.training.recipe import train

    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "dataset").is_dir():
        demo.write_dataset(folder / "dataset", plain=plain)
    if reg and not (folder / "reg").is_dir():
        demo.write_dataset(folder / "reg", striped=0, plain=reg, seed=1)
    (folder / "job.yaml").write_text(preset_yaml("demo"))
    base = [
        f"model.name_or_path={models / 'turbo'}",
        f"model.training_adapter={models / 'training_adapter.safetensors'}",
    ]
    cfg = load_job(folder / "job.yaml", [*base, *overrides], warnings=[])
    log(f"{name}: training ({'; '.join(overrides) or 'the demo job'})")
    return cfg, train(cfg, overwrite=True, progress=False)


def checkpoints(result) -> list[tuple[int, Path]]:
    from zimage_lora.training.run_folder import RunFolder

    run = RunFolder(result.run_dir, result.run_dir.name)
    return [*run.checkpoints(), (result.steps, run.final_path)]


def experiment_adapter(out: Path, models: Path, log: Log) -> dict:
    adapter = models / "training_adapter.safetensors"
    arms = {
        "a_turbo_without_adapter": [f"model.arch={TURBO}", "model.training_adapter="],
        "b_turbo_with_adapter": [f"model.training_adapter={adapter}"],
        "c_deturbo": [
            f"model.arch={DETURBO}",
            f"model.name_or_path={models / 'deturbo'}",
            "model.training_adapter=",
        ],  # fmt: skip
    }
    untouched = {s: pictures(models, s, None) for s in (TURBO_8, DETURBO_25)}
    table = {}
    for name, overrides in arms.items():
        _, result = train_arm(out, name, overrides, models, log)
        rows = []
        for step, lora in checkpoints(result):
            sheets = {s: out / f"{name}_{s.model}.png" if step == result.steps else None for s in (TURBO_8, DETURBO_25)}
            row = {"step": step, "turbo_8": measure(models, TURBO_8, lora, untouched[TURBO_8], sheets[TURBO_8])}
            if name.startswith("c_"):
                row["deturbo_25"] = measure(models, DETURBO_25, lora, untouched[DETURBO_25], sheets[DETURBO_25])
            rows.append(row)
            log(f"  {name} step {step}: {json.dumps(row)}")
        table[name] = rows
    # does the adapter keep 8-step quality where plain Turbo training drifts? the gap at each step, and whether it
    # is more than its standard error over the probe set
    table["drift_gap"], table["drift_gap_shown"] = {}, {}
    for a, b in zip(table["a_turbo_without_adapter"], table["b_turbo_with_adapter"], strict=True):
        gap = a["turbo_8"]["drift"] - b["turbo_8"]["drift"]
        error = math.hypot(standard_error(a["turbo_8"]["accuracy"]), standard_error(b["turbo_8"]["accuracy"]))
        table["drift_gap"][str(a["step"])] = gap
        table["drift_gap_shown"][str(a["step"])] = abs(gap) > error
    return table


def experiment_transfer(out: Path, models: Path, log: Log) -> dict:
    arms = {
        "trained_on_base": (
            [f"model.arch={BASE}", f"model.name_or_path={models / 'base'}", "model.training_adapter="],
            BASE_30,
            TURBO_8,
        ),  # fmt: skip
        "trained_on_turbo_with_adapter": ([], TURBO_8, BASE_30),
    }
    untouched = {s: pictures(models, s, None) for s in (TURBO_8, BASE_30)}
    table = {}
    for name, (overrides, own, other) in arms.items():
        _, result = train_arm(out, name, overrides, models, log)
        lora = result.final_lora
        table[name] = {
            where: {"setting": s.label, **measure(models, s, lora, untouched[s], out / f"{name}_on_{s.model}.png")}
            for where, s in (("own", own), ("other", other))
        }
        log(f"  {name}: {json.dumps(table[name])}")
    return table


def experiment_adapters(out: Path, models: Path, log: Log, short_steps: int = 70) -> dict:
    """The shipped adapter against one trained a tenth as long, through ``compare``; each LoRA then measured."""
    from zimage_lora.toyworld.build import BuildConfig, _load_transformer, encoded_data, train_adapter
    from zimage_lora.training.compare import compare

    short = out / "short_adapter"
    if not (short / "training_adapter.safetensors").is_file():
        log(f"a second toy adapter, trained {short_steps} steps")
        base, turbo = (
            _load_transformer(models / "base" / "transformer"),
            _load_transformer(models / "turbo" / "transformer"),
        )
        train_adapter(base, turbo, encoded_data(models, 2048, seed=7), short, BuildConfig.full(), short_steps, log)
    job = out / "compare" / "job.yaml"
    job.parent.mkdir(parents=True, exist_ok=True)
    if not (job.parent / "dataset").is_dir():
        demo.write_dataset(job.parent / "dataset")
    demo.copy_models(job.parent / "toy", models)
    from zimage_lora.config import preset_yaml

    job.write_text(preset_yaml("demo"))
    variants = [
        f"model.training_adapter={models / 'training_adapter.safetensors'}",
        f"model.training_adapter={short / 'training_adapter.safetensors'}",
    ]
    result = compare(job, variants, progress=False, resume=True)  # a rerun keeps the variants already trained
    untouched = pictures(models, TURBO_8, None)
    table = {}
    for name, run in zip(("shipped", f"short_{short_steps}_steps"), result.runs, strict=True):
        table[name] = measure(models, TURBO_8, run.final_lora, untouched, out / f"{name}.png")
        log(f"  {name}: {json.dumps(table[name])}")
    table["grids"] = [str(p) for p in result.grids]
    table["summary"] = str(result.summary)
    return table


PRESERVATION_STEPS = 500


def experiment_preservation(out: Path, models: Path, log: Log) -> dict:
    short = [f"train.steps={PRESERVATION_STEPS}", f"save.every={PRESERVATION_STEPS}", "sample.enabled=false"]
    dataset = "{path: ./dataset, caption_dropout: 0.05, resolutions: [128]}"
    reg = "{path: ./reg, caption_dropout: 0.05, resolutions: [128], is_reg: true}"
    arms = {  # name: (overrides, plain pictures in the dataset, plain pictures as regularisation)
        "striped_only": ([], 0, 0),
        "plain_pictures_in_the_dataset": ([], 24, 0),
        "plain_pictures_as_regularisation": ([f"datasets=[{dataset}, {reg}]", "train.reg_ratio=0.5"], 0, 24),
        "blank_prompt_preservation": (["train.blank_prompt_preservation.enabled=true"], 0, 0),
        "guidance_loss_3": (["train.guidance_loss.enabled=true", "train.guidance_loss.target=3"], 24, 0),
    }
    untouched = pictures(models, TURBO_8, None)
    table = {}
    for name, (overrides, plain, reg_pictures) in arms.items():
        _, result = train_arm(out, name, [*short, *overrides], models, log, plain=plain, reg=reg_pictures)
        table[name] = measure(models, TURBO_8, result.final_lora, untouched, out / f"{name}.png")
        log(f"  {name}: {json.dumps(table[name])}")
    base = table["striped_only"]
    table["leak_shown"] = {  # a leak lower than the striped-only arm's by more than its standard error over the probes
        name: bool(base["leak"] - m["leak"] > math.hypot(*_leak_errors(out, name)))
        for name, m in table.items()
        if name not in ("striped_only", "leak_shown")
    }
    return table


def _leak_errors(out: Path, name: str) -> tuple[float, float]:
    """The standard errors of two arms' leaks over the probe set (their per-probe changes, saved by ``measure``)."""
    return tuple(float(np.std(v) / math.sqrt(len(v))) for v in (_changes(out, "striped_only"), _changes(out, name)))


def _changes(out: Path, name: str) -> list[float]:
    return json.loads((out / f"{name}.changes.json").read_text())


def _cells(m: dict) -> str:
    return f"{m['concept']:.2f} | {m['leak']:.3f} | {m['accuracy']:.2f} | {m['drift']:+.2f}"


HEADER = "| concept | leak | accuracy | drift |"


def markdown(name: str, result: dict) -> str:
    """An experiment's result as the tables of docs/experiments.md (concept: share of trigger pictures with stripes;
    leak: change of the pictures without the trigger; accuracy: their attributes right; drift: the untouched model's
    accuracy minus this one's, at the same setting)."""
    lines = []
    if name == "adapter":
        lines += [f"| arm | step | setting {HEADER}", "|---|---|---|---|---|---|---|"]
        for arm, rows in result.items():
            if arm.startswith("drift_gap"):
                continue
            for row in rows:
                for key, setting in (("turbo_8", TURBO_8), ("deturbo_25", DETURBO_25)):
                    if key in row:
                        lines.append(f"| {arm} | {row['step']} | {setting.label} | {_cells(row[key])} |")
        lines += ["", "| step | drift gap (a - b) | more than its standard error |", "|---|---|---|"]
        for step, gap in result["drift_gap"].items():
            lines.append(f"| {step} | {gap:+.3f} | {'shown' if result['drift_gap_shown'][step] else 'not shown'} |")
    elif name == "transfer":
        lines += [f"| LoRA | used on {HEADER}", "|---|---|---|---|---|---|"]
        for arm, used in result.items():
            for where in ("own", "other"):
                lines.append(f"| {arm} | {used[where]['setting']} ({where}) | {_cells(used[where])} |")
    elif name == "preservation":
        lines += [f"| arm ({PRESERVATION_STEPS} steps, toy Turbo 8 steps) {HEADER} leak below striped only |"]
        lines += ["|---|---|---|---|---|---|"]
        for arm, m in result.items():
            if arm == "leak_shown":
                continue
            shown = "-" if arm == "striped_only" else ("shown" if result["leak_shown"][arm] else "not shown")
            lines.append(f"| {arm} | {_cells(m)} | {shown} |")
    else:
        lines += [f"| adapter while training {HEADER}", "|---|---|---|---|---|"]
        lines += [f"| {arm} | {_cells(m)} |" for arm, m in result.items() if isinstance(m, dict)]
    return "\n".join(lines) + "\n"


EXPERIMENTS = {
    "adapter": experiment_adapter,
    "transfer": experiment_transfer,
    "adapters": experiment_adapters,
    "preservation": experiment_preservation,
}


def run_experiment(name: str, out: Path, models: Path | None = None, log: Log = print) -> dict:
    models = models or demo.shipped_models()
    out.mkdir(parents=True, exist_ok=True)
    result = EXPERIMENTS[name](out, models, log)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown(name, result))
    return result
