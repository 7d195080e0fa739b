"""``zimage-lora`` subcommands. Thin: parse, then call the library.

Exit codes: 0 done, 1 crash, 2 user error (one line, no traceback), 3 non-finite loss.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train and run LoRAs for Z-Image (Turbo + training adapter, De-Turbo, Base).",
)


dataset_app = typer.Typer(no_args_is_help=True, help="Inspect dataset folders.")
app.add_typer(dataset_app, name="dataset")
lora_app = typer.Typer(no_args_is_help=True, help="LoRA files: inspect them, convert between tools' layouts.")
app.add_typer(lora_app, name="lora")
toy_app = typer.Typer(no_args_is_help=True, help="The toy world: a tiny pretrained Z-Image family that really draws.")
app.add_typer(toy_app, name="toy-world")


@app.command()
def train(
    job: Path = typer.Argument(..., help="The job file (YAML)."),
    set_: list[str] = typer.Option([], "--set", help="Override a key, e.g. --set train.lr=5e-5 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in the job's run folder."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Discard the run folder's previous run and start afresh."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    num_processes: int = typer.Option(
        None, "--num-processes", help="Train on N processes (N GPUs, or N CPU processes with job.device cpu)."
    ),
    gpus: str = typer.Option(None, "--gpus", help="Train on these GPUs, one process each, e.g. --gpus 0,1,2,3."),
) -> None:
    """Train a LoRA from a job file (on several GPUs with --gpus or --num-processes, through accelerate)."""
    from zimage_lora.config import load_job
    from zimage_lora.errors import UserError
    from zimage_lora.training import launch

    cfg = load_job(job, set_, warnings=[])  # the trainer logs the job's warnings itself
    if not launch.launched_by_launcher():
        processes, gpu_ids = launch.plan(cfg.job.device, num_processes, gpus)
        if processes > 1:
            _launch_processes(cfg, job, set_, resume, overwrite, progress, processes, gpu_ids)
            return
    elif num_processes is not None or gpus is not None:
        raise UserError("--num-processes and --gpus are for starting a job; a launcher already started this one")
    from zimage_lora.training.recipe import train as run_training

    result = run_training(cfg, resume=resume, overwrite=overwrite, progress=progress)
    if result is not None:  # None: a process other than the main one (the main one reports)
        _report(result)


def _launch_processes(cfg, job, set_, resume, overwrite, progress, processes, gpu_ids) -> None:
    from zimage_lora.config import check_job, run_dir
    from zimage_lora.training import launch
    from zimage_lora.training.run_folder import RunFolder

    check_job(cfg)  # a mistake in the job ends here, in one sentence, before any process starts
    RunFolder(run_dir(cfg), cfg.job.name).check_start(resume=resume, overwrite=overwrite)
    args = [str(job), *(f"--set={s}" for s in set_)]
    if gpu_ids is not None and cfg.job.device != [f"cuda:{i}" for i in gpu_ids]:
        args.append(f"--set=job.device=[{', '.join(f'cuda:{i}' for i in gpu_ids)}]")
    args += [flag for flag, on in (("--resume", resume), ("--overwrite", overwrite), ("--no-progress", not progress))
             if on]  # fmt: skip
    where = f"GPUs {','.join(map(str, gpu_ids))}" if gpu_ids is not None else f"{cfg.job.device}"
    typer.echo(f"starting {processes} processes on {where} through accelerate", err=True)
    command = launch.launcher_command(processes, gpu_ids, args, launch.free_port())
    code = launch.run_launcher(command, run_dir(cfg))
    if code:
        raise typer.Exit(code)


@app.command()
def validate(
    job: Path = typer.Argument(..., help="The job file (YAML)."),
    set_: list[str] = typer.Option([], "--set", help="Override a key (repeatable)."),
) -> None:
    """Check a job file and print the fully resolved job (loads no model); warnings go to stderr."""
    from zimage_lora.config import dump_yaml, load_job

    warnings: list[str] = []
    cfg = load_job(job, set_, warnings=warnings)
    for warning in warnings:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(dump_yaml(cfg), nl=False)


@app.command()
def init(
    preset: str = typer.Option(
        "turbo-adapter-v2",
        help="turbo-adapter-v2 (the recommended start), turbo-adapter-v1 (the safe baseline to go back to when "
        "training with v2 is unstable), deturbo or demo.",
    ),
):
    """Print a commented job file with the guide's baseline settings."""
    from zimage_lora.config import preset_names, preset_yaml
    from zimage_lora.errors import UserError

    if preset not in preset_names():
        raise UserError(f"--preset: unknown preset {preset!r}; choose one of {', '.join(preset_names())}")
    typer.echo(preset_yaml(preset), nl=False)


@app.command("tiny-model")
def tiny_model(out: Path = typer.Argument(..., help="Folder to write."), seed: int = typer.Option(0)) -> None:
    """Write a tiny random Z-Image pipeline (the real classes, diffusers layout) for tests and demos."""
    from zimage_lora.models.tiny import build_tiny_model

    typer.echo(str(build_tiny_model(out, seed=seed)))


@app.command("tiny-adapter")
def tiny_adapter(
    model_dir: Path = typer.Argument(..., help="A diffusers-layout model folder."),
    out: Path = typer.Argument(..., help="The .safetensors file to write."),
    rank: int = typer.Option(4, min=1),
    seed: int = typer.Option(0),
) -> None:
    """Write a random LoRA in the training-adapter format (non-zero A and B) for a model."""
    from zimage_lora.models.tiny_adapter import write_random_adapter

    typer.echo(str(write_random_adapter(model_dir, out, rank=rank, seed=seed)))


@app.command()
def demo(
    out: Path = typer.Option(Path("zimage-demo"), help="Folder for the demo's models, data, job and run."),
    steps: int = typer.Option(None, min=1, help="Train this many steps instead of the demo job's (a quick look)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Train the offline demo: the toy Z-Image Turbo (with the toy training adapter) learns a texture, stripes, from
    a generated dataset, in about three minutes on two CPU cores; prints how often the stripes appear before and
    after, with and without the trigger word."""
    from zimage_lora.config import load_job, preset_yaml
    from zimage_lora.quiet import quiet_libraries
    from zimage_lora.toyworld import demo as toy
    from zimage_lora.training.recipe import train as run_training

    quiet_libraries()
    out.mkdir(parents=True, exist_ok=True)
    toy.copy_models(out / "toy")
    if not (out / "dataset").is_dir():
        toy.write_dataset(out / "dataset")
    job = out / "demo.yaml"
    job.write_text(preset_yaml("demo"))
    cfg = load_job(job, [f"train.steps={steps}"] if steps else [], warnings=[])
    typer.echo(f"demo job: {job}")
    before = toy.concept_report(toy.load_turbo(cfg))
    result = run_training(cfg, overwrite=True, progress=progress)
    after = toy.concept_report(toy.load_turbo(cfg, result.final_lora))
    _report(result)
    for label, key in (
        ("stripes on prompts with the trigger", "concept_with_trigger"),
        ("stripes on the same prompts without it", "concept_without_trigger"),
        ("attributes right without the trigger", "accuracy_without_trigger"),
    ):
        typer.echo(f"{label}: {before[key]:.2f} before, {after[key]:.2f} after")
    rows = [*before["images"], *after["images"]]
    typer.echo(f"before/after: {toy.sheet(rows, result.run_dir / 'before_after.png')} (rows: trigger before, "
               "plain before, trigger after, plain after)")  # fmt: skip


def _field_help(name: str) -> str:
    """A generation option's help: the request's own description (``sampling/request.py``), written once."""
    from zimage_lora.sampling.request import GenerationRequest

    return GenerationRequest.model_fields[name].description or ""


def _arch_help() -> str:
    from zimage_lora.models.arch import inference_archs

    choices = ", ".join(f"{a.name} ({a.cfg_label})" for a in inference_archs())
    return f"{_field_help('arch')} One of {choices}."


@app.command()
def generate(
    prompt: str = typer.Option(..., help=_field_help("prompt")),
    model: str = typer.Option(None, help=_field_help("model")),
    arch: str = typer.Option(None, help=_arch_help()),
    lora: list[str] = typer.Option([], help="LoRA file, optionally FILE:WEIGHT (repeatable)."),
    negative: str = typer.Option("", help=_field_help("negative_prompt")),
    steps: int = typer.Option(None, help=_field_help("steps")),
    guidance: float = typer.Option(None, help=_field_help("guidance")),
    width: int = typer.Option(1024, help=_field_help("width")),
    height: int = typer.Option(1024, help=_field_help("height")),
    seed: int = typer.Option(42, help=_field_help("seed")),
    count: int = typer.Option(1, help=_field_help("count")),
    out: Path = typer.Option(Path("generated"), help="Folder for the PNGs (settings in their text metadata)."),
    device: str = typer.Option("auto", help=_field_help("device")),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    quantize: str = typer.Option("none", help=_field_help("quantize")),
    compile_: bool = typer.Option(False, "--compile/--no-compile", help=_field_help("compile")),
    fuse: bool = typer.Option(True, "--fuse/--no-fuse", help=_field_help("fuse")),
) -> None:
    """Generate images with a base model and LoRAs (the guide's "Run LoRA")."""
    from zimage_lora.quiet import quiet_libraries
    from zimage_lora.sampling.generate import generate as run_generate
    from zimage_lora.sampling.request import GenerationRequest, LoraRef

    quiet_libraries()
    flags = {"negative_prompt": "--negative", "loras": "--lora", "compile": "--compile"}
    request = GenerationRequest.build(
        {name: flags.get(name, f"--{name}") for name in GenerationRequest.model_fields},
        model=model,
        arch=arch,
        loras=[LoraRef.parse(text) for text in lora],
        prompt=prompt,
        negative_prompt=negative,
        steps=steps,
        guidance=guidance,
        width=width,
        height=height,
        seed=seed,
        count=count,
        quantize=quantize,
        compile=compile_,
        fuse=fuse,
        device=device,
    )
    for path in run_generate(request, out, progress=progress):
        typer.echo(str(path))


@app.command("export-lora")
def export_lora(
    source: Path = typer.Argument(..., help="A LoRA, LoKr, LoHa or DoRA file."),
    out: Path = typer.Argument(..., help="The plain LoRA file to write."),
    model: str = typer.Option(..., help="The base model (DoRA needs its weights; a hub id or a folder)."),
    rank: int = typer.Option(None, min=1, help="Rank of the export; empty = exact (the delta's own rank)."),
    dtype: str = typer.Option("bf16", help="bf16, fp16 or fp32."),
) -> None:
    """Turn any network file into a plain LoRA that every tool reads (exact, or a rank-limited SVD)."""
    from zimage_lora.errors import UserError
    from zimage_lora.lora.io import SAVE_DTYPES, save_lora
    from zimage_lora.lora.variants import export_plain_lora, read_network
    from zimage_lora.models.loading import load_components
    from zimage_lora.quiet import quiet_libraries

    quiet_libraries()
    if dtype not in SAVE_DTYPES:
        raise UserError(f"--dtype: {dtype!r} is not one of {', '.join(SAVE_DTYPES)}")
    transformer = load_components(model, parts=("transformer",)).transformer
    network = read_network(source, [name for name, _ in transformer.named_modules()])  # kohya/lycoris_ names
    modules, error = export_plain_lora(network, transformer, rank)
    meta = {**network.metadata, "zimage_lora.network": "lora", "zimage_lora.exported_from": network.kind}
    save_lora(out, modules, dtype, meta)
    ranks = sorted({w.rank for w in modules.values()})
    typer.echo(
        f"{out}: {len(modules)} modules from {network.kind}, rank {ranks[0]}-{ranks[-1]}, "
        f"largest relative error {error:.2e}"
    )


@app.command()
def compare(
    job: Path = typer.Argument(..., help="The job file (YAML)."),
    vary: list[str] = typer.Option(..., help="One variant: KEY=VALUE, or several joined by ';' (repeat, 2+)."),
    folder: Path = typer.Option(
        None, help="Where the variants' runs and the grids go; empty = OUTPUT_DIR/NAME_compare."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue a stopped comparison (finished variants are kept)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard the folder's comparison and start afresh."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Train the job once per variant and put their previews side by side (the guide's A/B test)."""
    from zimage_lora.training.compare import compare as run_compare
    from zimage_lora.training.compare import score_text

    result = run_compare(job, vary, progress=progress, resume=resume, overwrite=overwrite, folder=folder)
    for index, run in enumerate(result.runs):  # the variants trained so far
        loss, scores = result.losses[index], result.scores[index] if result.scores else {}
        facts = ([f"final loss {loss:.4f}"] if loss is not None else []) + ([score_text(scores)] if scores else [])
        where = run.final_lora if run.stopped_at is None else run.run_dir
        typer.echo(f"{result.variants[index]}: {where}" + (f" ({'; '.join(facts)})" if facts else ""))
    if result.stopped is not None:
        variant, step = result.stopped
        again = " ".join(f"--vary {v!r}" for v in vary)
        where = f" --folder {folder}" if folder is not None else ""
        typer.echo(
            f"stopped: variant {variant} ({result.variants[variant]}) at step {step}, saved; continue with: "
            f"zimage-lora compare {job} {again}{where} --resume"
        )
        return
    typer.echo(f"grids: {result.folder} ({len(result.grids)} steps)")
    typer.echo(f"summary: {result.summary}")


@app.command("import-job")
def import_job(
    file: Path = typer.Argument(..., help="The AI Toolkit job file (YAML or JSON, as its UI writes it)."),
    out: Path = typer.Option(
        None, "-o", "--out", help="Where to write our job; empty = FILE's folder, <stem>_zimage.yaml."
    ),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    guidance_rule: str = typer.Option(
        "current",
        help="How to read sample guidance_scale: current (AI Toolkit since 2026-07-08: classic CFG, kept) or "
        "before-2026-07-08 (a value g acted as classic g + 1).",
    ),
) -> None:
    """Turn an AI Toolkit job (arch zimage, zimage:turbo, zimage:deturbo) into a zimage-lora job; every key is
    mapped, converted by a stated rule, or listed with the reason it was not."""
    from zimage_lora.aitoolkit import import_job_file
    from zimage_lora.config import load_job
    from zimage_lora.errors import ConfigError, UserError

    imported = import_job_file(file, guidance_rule)
    out = out if out is not None else file.with_name(f"{file.stem}_zimage.yaml")
    if out.exists() and not force:
        raise UserError(f"-o {out}: the file exists; pass --force to replace it or choose another name")
    text = imported.yaml()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        from zimage_lora.files import atomic_write_bytes

        atomic_write_bytes(out, text.encode())
    except OSError as e:
        raise UserError(f"-o {out}: cannot write it ({e.strerror}); choose a writable place") from None
    for line in imported.report():
        typer.echo(line)
    try:
        load_job(out, warnings=[])
        typer.echo(f"wrote {out}; train it with: zimage-lora train {out}")
    except ConfigError as e:
        typer.echo(f"wrote {out}; fix these before training (the paths are the AI Toolkit job's):")
        for problem in e.problems:
            typer.echo(f"  {problem}")


_MODEL_HELP = "A model folder whose transformer names the layers; empty = Z-Image's own (built without weights)."


@lora_app.command("inspect")
def lora_inspect(
    file: Path = typer.Argument(..., help="A LoRA, LoKr, LoHa or DoRA file in any layout."),
    model: Path = typer.Option(None, help=_MODEL_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """What the file holds (format, modules by block and kind, ranks, metadata) and what diffusers and ComfyUI
    load of it."""
    import json

    from zimage_lora.lora.formats import transformer_names
    from zimage_lora.lora.tools import inspect_lora, inspect_text
    from zimage_lora.quiet import quiet_libraries

    quiet_libraries()
    report = inspect_lora(file, transformer_names(model))
    typer.echo(json.dumps(report, indent=2) if as_json else "\n".join(inspect_text(report)))


@lora_app.command("convert")
def lora_convert(
    source: Path = typer.Argument(..., help="The LoRA file to read (any layout)."),
    out: Path = typer.Argument(..., help="The file to write."),
    to: str = typer.Option(..., help="zimage-lora, ai-toolkit, diffusers, kohya, comfyui or diffsynth."),
    dtype: str = typer.Option("bf16", help="bf16, fp16 or fp32."),
    model: Path = typer.Option(None, help=_MODEL_HELP),
) -> None:
    """Write the same weight updates in another tool's layout (checked before anything is written)."""
    from zimage_lora.lora.formats import transformer_names
    from zimage_lora.lora.tools import convert_lora
    from zimage_lora.quiet import quiet_libraries

    quiet_libraries()
    written, worst = convert_lora(source, out, to, dtype, transformer_names(model))
    typer.echo(
        f"{out}: {to}, {len(written.modules)} modules, updates kept within {worst:.1e} (before {dtype} rounding)"
    )


@lora_app.command("extract")
def lora_extract(
    base: Path = typer.Option(..., help="The base model: a diffusers folder or a ComfyUI .safetensors file."),
    tuned: Path = typer.Option(..., help="The fine-tuned model of the same size, in either form."),
    out: Path = typer.Option(..., "-o", "--out", help="The LoRA file to write."),
    rank: int = typer.Option(..., min=1, help="The rank of each module (fewer where the difference has fewer)."),
    dtype: str = typer.Option("bf16", help="bf16, fp16 or fp32."),
    to: str = typer.Option("zimage-lora", help="The output format (see lora convert)."),
    device: str = typer.Option("cpu", help="Where the float64 SVDs run (cpu, cuda)."),
) -> None:
    """A LoRA from the difference of two transformers (SVD of each changed Linear weight), with the energy kept."""
    from zimage_lora.lora.model_ops import extract_lora, extract_text
    from zimage_lora.quiet import quiet_libraries

    quiet_libraries()
    result = extract_lora(base, tuned, out, rank, dtype, to, device, echo=typer.echo)
    typer.echo("\n".join(extract_text(result, out, to, dtype)))


@lora_app.command("bake")
def lora_bake(
    model: Path = typer.Argument(..., help="The model: a diffusers folder or a ComfyUI .safetensors file."),
    loras: list[str] = typer.Argument(..., help="LoRA files in any layout, each optionally with :WEIGHT."),
    out: Path = typer.Option(
        ..., "-o", "--out", help="A new folder (diffusers transformer) or a .safetensors file (ComfyUI's names)."
    ),
    dtype: str = typer.Option("bf16", help="bf16, fp16 or fp32."),
) -> None:
    """The transformer with the LoRAs added into its weights, for tools that load no LoRA."""
    from zimage_lora.lora.model_ops import bake_loras, bake_text
    from zimage_lora.quiet import quiet_libraries

    quiet_libraries()
    result = bake_loras(model, [_weighted(spec) for spec in loras], out, dtype)
    typer.echo("\n".join(bake_text(result, dtype)))


def _weighted(spec: str) -> tuple[Path, float]:
    """``file.safetensors[:WEIGHT]``."""
    from zimage_lora.errors import UserError

    path, sep, weight = spec.rpartition(":")
    if not sep or "/" in weight:
        return Path(spec), 1.0
    try:
        return Path(path), float(weight)
    except ValueError:
        raise UserError(f"{spec}: the weight after ':' must be a number, e.g. {path}:0.7") from None


def _report_reduction(out: Path, reduced, fmt: str) -> None:
    ranks = sorted({int(p["lora_A.weight"].shape[0]) for p in reduced.network.modules.values()})
    worst = min(reduced.energy.items(), key=lambda item: item[1])
    typer.echo(
        f"{out}: {fmt}, {len(reduced.network.modules)} modules, rank {ranks[0]}-{ranks[-1]}; energy kept "
        f"{reduced.overall:.6f} overall, lowest {worst[1]:.6f} ({worst[0]})"
    )


@lora_app.command("merge")
def lora_merge(
    loras: list[str] = typer.Argument(..., help="LoRA files, each optionally with :WEIGHT (a.safetensors:0.7)."),
    out: Path = typer.Option(..., "-o", "--out", help="The merged file."),
    rank: int = typer.Option(None, help="Reduce each module to this rank (SVD)."),
    energy: float = typer.Option(None, help="Keep the fewest ranks holding this fraction of each update's energy."),
    to: str = typer.Option("zimage-lora", help="The output format (see lora convert)."),
    dtype: str = typer.Option("bf16", help="bf16, fp16 or fp32."),
    model: Path = typer.Option(None, help=_MODEL_HELP),
) -> None:
    """Several LoRAs as one: exact for plain LoRAs (ranks side by side), else by SVD with the energy kept printed."""
    from zimage_lora.lora.formats import transformer_names
    from zimage_lora.lora.tools import merge_loras, write_network
    from zimage_lora.quiet import quiet_libraries

    quiet_libraries()
    reduced = merge_loras([_weighted(spec) for spec in loras], transformer_names(model), rank, energy)
    write_network(reduced.network, out, to, dtype)
    _report_reduction(out, reduced, to)


@lora_app.command("resize")
def lora_resize(
    file: Path = typer.Argument(..., help="The LoRA file to reduce."),
    out: Path = typer.Option(..., "-o", "--out", help="The reduced file."),
    rank: int = typer.Option(None, help="The rank to keep (SVD of each module's update)."),
    energy: float = typer.Option(None, help="Keep the fewest ranks holding this fraction of each update's energy."),
    to: str = typer.Option("zimage-lora", help="The output format (see lora convert)."),
    dtype: str = typer.Option("bf16", help="bf16, fp16 or fp32."),
    model: Path = typer.Option(None, help=_MODEL_HELP),
) -> None:
    """A LoRA at a lower rank: the best approximation of each module's update, with the energy kept printed."""
    from zimage_lora.lora.formats import transformer_names
    from zimage_lora.lora.tools import resize_lora, write_network
    from zimage_lora.quiet import quiet_libraries

    quiet_libraries()
    reduced = resize_lora(file, transformer_names(model), rank, energy)
    write_network(reduced.network, out, to, dtype)
    _report_reduction(out, reduced, to)


@app.command()
def ui(
    host: str = typer.Option("127.0.0.1", help="Address to listen on; anything but loopback needs --token."),
    port: int = typer.Option(8675, help="Port to listen on."),
    data: Path = typer.Option(Path("zimage-lora-ui"), help="The data folder: datasets, jobs, models, ui.db."),
    token: str = typer.Option(
        None, envvar="ZIMAGE_LORA_UI_TOKEN", help="Require this token (Authorization header or the login page)."
    ),
    lora_dir: list[Path] = typer.Option(
        [],
        "--lora-dir",
        help="A folder of .safetensors LoRAs (e.g. ComfyUI's models/loras) the playground offers, read-only; "
        "repeat for more.",
    ),
) -> None:
    """Serve the web UI: datasets, jobs with live progress, the playground."""
    from zimage_lora.ui.server import serve

    serve(data, host, port, token, lora_dir)


@toy_app.command("build")
def toy_world_build(
    out: Path = typer.Argument(..., help="Folder for the build (each stage in its own subfolder)."),
    tiny: bool = typer.Option(False, "--tiny", help="Every stage in seconds (a check of the pipeline, not models)."),
    seed: int = typer.Option(0),
    until: str = typer.Option(None, help="Stop after this stage."),
) -> None:
    """Train the toy world's VAE, base, Turbo, training adapter and De-Turbo from nothing (resumable per stage)."""
    from zimage_lora.errors import UserError
    from zimage_lora.quiet import quiet_libraries
    from zimage_lora.toyworld.build import STAGES, BuildConfig, build

    quiet_libraries()
    if until is not None and until not in STAGES:
        raise UserError(f"--until: {until!r} is not a stage; choose one of {', '.join(STAGES)}")
    config = BuildConfig.tiny(seed) if tiny else BuildConfig.full(seed)
    build(out, config, lambda message: typer.echo(message, err=True), until=until)
    typer.echo(f"released models: {out / 'release'}")


@toy_app.command("experiment")
def toy_world_experiment(
    name: str = typer.Argument(
        ...,
        help="adapter (the guide's central claim), transfer, adapters (v1 against v2) or preservation (regularisation, "
        "Blank Prompt Preservation and the guidance loss against leakage).",
    ),
    out: Path = typer.Argument(..., help="Folder for the runs and the results (<name>.json)."),
) -> None:
    """Measure one of the guide's claims on the toy world (docs/experiments.md): trains the arms, scores them."""
    from zimage_lora.errors import UserError
    from zimage_lora.quiet import quiet_libraries
    from zimage_lora.toyworld.experiments import EXPERIMENTS, run_experiment

    quiet_libraries()
    if name not in EXPERIMENTS:
        raise UserError(f"experiment {name!r} is not one of {', '.join(EXPERIMENTS)}")
    run_experiment(name, out, log=lambda message: typer.echo(message, err=True))
    typer.echo(str(out / f"{name}.json"))


@toy_app.command("models")
def toy_world_models(out: Path = typer.Argument(..., help="Folder to copy the shipped toy models to.")) -> None:
    """Copy the shipped toy models (turbo/, base/, deturbo/, training_adapter.safetensors) to a folder."""
    from zimage_lora.toyworld.demo import copy_models

    typer.echo(str(copy_models(out)))


@toy_app.command("dataset")
def toy_world_dataset(
    out: Path = typer.Argument(..., help="Folder to write the pictures and captions to."),
    striped: int = typer.Option(24, min=0, help="Striped shapes, captioned with the trigger word zst."),
    plain: int = typer.Option(24, min=0, help="Plain shapes with their ordinary captions."),
    seed: int = typer.Option(0),
) -> None:
    """Write a toy-world dataset (128x128 PNGs with .txt captions), the demo's by default."""
    from zimage_lora.toyworld.demo import write_dataset

    typer.echo(str(write_dataset(out, striped, plain, seed)))


@dataset_app.command("check")
def dataset_check(
    folder: Path = typer.Argument(..., help="The dataset folder."),
    resolutions: str = typer.Option("512,768,1024", help="Training resolutions, comma-separated."),
    trigger: str = typer.Option(None, help="The trigger word, to find captions that lack it."),
    caption_ext: str = typer.Option("txt", help="Extension of the caption files."),
    recursive: bool = typer.Option(False, help="Also look in sub-folders."),
) -> None:
    """Report a dataset's images, captions, duplicates and buckets; exit 2 only if it cannot train."""
    from zimage_lora.config import parse_resolutions
    from zimage_lora.data.check import check_dataset, format_report

    sizes = parse_resolutions(resolutions, "--resolutions")
    report = check_dataset(folder, sizes, trigger, caption_ext.lstrip("."), recursive)
    typer.echo(format_report(report, trigger))
    if not report.trainable:
        raise typer.Exit(2)


@app.command()
def caption(
    folder: Path = typer.Argument(..., help="The dataset folder: writes image.txt beside each image."),
    model: str = typer.Option(
        None, "--model", help="Captioning model: a hub id, a local folder or a known name (default Qwen3-VL-8B)."
    ),
    mode: str = typer.Option("character", help="character, style, object or tags (comma-separated tags)."),
    trigger: str = typer.Option(None, help="A trigger word to put first in each caption."),
    trigger_style: str = typer.Option(
        "placeholder", "--trigger-style", help="placeholder: write \\[trigger] (the job's word replaces it); word."
    ),
    prompt: str = typer.Option(None, help="Your own instruction in place of the mode's."),
    max_words: int = typer.Option(None, "--max-words", min=1, help="Cap each caption at N words."),
    skip_existing: bool = typer.Option(False, "--skip-existing", help="Keep captions that exist (the default)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace captions that exist."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Write nothing; print the proposals."),
    json_out: Path = typer.Option(None, "--json", help="Also write the proposals to this JSON file."),
    quantize: str = typer.Option(None, "--quantize", help="nf4 or int8: less GPU memory (docs/captioning.md)."),
    batch: int = typer.Option(1, "--batch", min=1, help="Pictures per batch."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    recursive: bool = typer.Option(False, help="Also caption the images of sub-folders."),
    zimage_model: str = typer.Option(
        None, "--zimage-model", help="A Z-Image folder or hub id: count caption tokens with its tokenizer."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
) -> None:
    """Write a caption for each image of a dataset folder with a vision-language model (docs/captioning.md)."""
    from zimage_lora.captioning.registry import DEFAULT_MODEL
    from zimage_lora.captioning.run import CaptionOptions, format_report
    from zimage_lora.captioning.run import caption as run_captioning
    from zimage_lora.errors import UserError

    if skip_existing and overwrite:
        raise UserError("--skip-existing and --overwrite contradict each other: give one of them")
    options = CaptionOptions(
        mode=mode,
        trigger=trigger,
        trigger_style=trigger_style,
        prompt=prompt,
        max_words=max_words,
        overwrite=overwrite,
        dry_run=dry_run,
        batch=batch,
        recursive=recursive,
    )
    report = run_captioning(
        folder,
        model or DEFAULT_MODEL,
        options,
        device=device,
        quantize=quantize,
        zimage_model=zimage_model,
        json_out=json_out,
        progress=progress,
    )
    typer.echo(format_report(report, options))


def _report(result) -> None:
    if result.complete:
        typer.echo(f"the run is complete: {result.steps} steps, nothing to resume; LoRA: {result.final_lora}")
        return
    if result.stopped_at is not None:
        typer.echo(f"stopped at step {result.stopped_at}, saved in {result.run_dir}; continue with --resume")
        return
    if result.first_loss is not None:
        typer.echo(
            f"loss: {result.first_loss:.4f} at the start, {result.last_loss:.4f} at the end (means of up to 20 steps)"
        )
    typer.echo(f"LoRA: {result.final_lora}")
    if result.samples:
        typer.echo(f"samples: {result.samples[0].parent} ({len(result.samples)} images)")
    if result.contact_sheet is not None:
        typer.echo(f"contact sheet: {result.contact_sheet}")


def main() -> None:
    from zimage_lora.errors import NonFiniteLoss, ProcessLost, UserError
    from zimage_lora.quiet import quiet_libraries

    quiet_libraries()

    try:
        code = app(standalone_mode=False)  # a command's typer.Exit(n) comes back as n
        if isinstance(code, int) and code:
            sys.exit(code)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLoss as e:
        print(f"error: non-finite loss at {e}", file=sys.stderr)
        sys.exit(3)
    except ProcessLost as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except _click_errors() as e:  # a usage mistake (missing argument, unknown option): one line, exit 2
        print(f"error: {e.format_message()} (see zimage-lora --help)", file=sys.stderr)
        sys.exit(2)


def _click_errors() -> tuple[type[BaseException], ...]:
    """Usage-error classes of click, and of the copy of click that newer typer versions carry inside."""
    import click

    classes: list[type[BaseException]] = [click.exceptions.ClickException]
    try:
        from typer._click.exceptions import ClickException
    except ImportError:  # older typer uses click itself
        pass
    else:
        classes.append(ClickException)
    return tuple(classes)


if __name__ == "__main__":
    main()
