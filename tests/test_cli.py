"""The command line as a user meets it: exit codes, one-line errors without tracebacks, the demo."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from zimage_lora.config import load_job_text, preset_names


def cli(*args: str) -> subprocess.CompletedProcess:
    from conftest import run_cli

    return run_cli(*args)


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr  # progress log may precede it
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def edit(job: Path, change) -> Path:
    data = yaml.safe_load(job.read_text())
    change(data)
    job.write_text(yaml.safe_dump(data, sort_keys=False))
    return job


@pytest.mark.parametrize(
    "change, needles",
    [
        (lambda d: d["train"].update(lrr=1e-4), ["train.lrr", "did you mean 'lr'"]),
        (lambda d: d["train"].update(lr="fast"), ["train.lr"]),
        (lambda d: d["train"].update(optimizer="adam"), ["train.optimizer", "adamw8bit"]),
        (lambda d: d["datasets"][0].update(path="./nowhere"), ["datasets[0].path", "not found"]),
        (lambda d: d["model"].pop("training_adapter"), ["model.training_adapter", "required"]),
        (
            lambda d: (
                d["quantization"].update(transformer="fp4")
                if "quantization" in d
                else d.update(quantization={"transformer": "fp4"})
            ),
            ["quantization.transformer", "float8", "nf4"],
        ),
        (lambda d: d["target"].update(type="lokrr"), ["target.type", "lokr"]),
        (
            lambda d: (d["train"].update(compile=True), d["model"].update(layer_offload=0.5)),
            ["train.compile", "model.layer_offload"],
        ),
        (lambda d: d["datasets"][0].update(resolutions=[500]), ["datasets[0].resolutions"]),
        (
            lambda d: (d["job"].pop("trigger_word"), d["sample"].update(prompts=["a", "[trigger] b"])),
            ["sample.prompts[1]", "job.trigger_word"],
        ),
    ],
    ids=[
        "unknown-key",
        "wrong-type",
        "bad-choice",
        "missing-dataset",
        "no-adapter",
        "bad-quantization",
        "bad-network-type",
        "compile-with-offload",
        "resolution-not-16",
        "trigger-without-word",
    ],
)
def test_config_mistakes_exit_2_with_one_line(make_job, change, needles):
    job = edit(make_job(), change)
    assert_user_error(cli("train", str(job), "--no-progress"), *needles)


def test_empty_dataset_folder(make_job, tmp_path):
    job = make_job()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    edit(job, lambda d: d["datasets"][0].update(path=str(empty)))
    assert_user_error(cli("train", str(job)), "datasets[0].path", "no images")


def test_unreadable_job_files(tmp_path):
    assert_user_error(cli("train", str(tmp_path / "missing.yaml")), "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("job:\n  name: [unclosed\n")
    assert_user_error(cli("train", str(bad)), "bad.yaml")
    bad.write_text("- just\n- a list\n")
    assert_user_error(cli("train", str(bad)))


def test_wrong_adapter_for_the_model(make_job, tmp_path):
    import torch

    from zimage_lora.lora.io import LoraWeights, save_lora

    # an adapter made for a bigger model: the right key names with the wrong shapes
    wrong = tmp_path / "wrong_adapter.safetensors"
    save_lora(
        wrong, {"layers.0.attention.to_q": LoraWeights(torch.ones(4, 3840), torch.ones(3840, 4), 4.0)}, "fp32", {}
    )
    job = edit(make_job(), lambda d: d["model"].update(training_adapter=str(wrong)))
    assert_user_error(cli("train", str(job), "--no-progress"), "training adapter", "does not fit")
    # and a file that is not an adapter of this architecture at all
    alien = tmp_path / "alien.safetensors"
    save_lora(alien, {"down_blocks.0.conv": LoraWeights(torch.ones(4, 8), torch.ones(8, 4), 4.0)}, "fp32", {})
    edit(job, lambda d: d["model"].update(training_adapter=str(alien)))
    assert_user_error(cli("train", str(job), "--no-progress"), "not a Linear layer")


def test_train_override_rerun_and_nan(make_job):
    job = make_job({"train": {"steps": 2}})
    done = cli("train", str(job), "--no-progress", "--set", "train.lr=5e-4")
    assert done.returncode == 0, done.stderr
    assert "LoRA:" in done.stdout and "loss:" in done.stdout
    assert "lr: 0.0005" in (job.parent / "output" / "tiny" / "config.yaml").read_text()
    # the run folder now holds a run: a second start must name both ways forward
    assert_user_error(cli("train", str(job), "--no-progress"), "--resume", "--overwrite")
    # an absurd learning rate blows the loss up: exit 3, the message names the step
    nan = cli(
        "train",
        str(job),
        "--no-progress",
        "--overwrite",
        "--set",
        "train.lr=1e30",
        "--set",
        "train.steps=6",
        "--set",
        "train.max_grad_norm=0",
    )
    assert nan.returncode == 3, nan.stderr
    assert "step" in nan.stderr and "learning rate" in nan.stderr and "Traceback" not in nan.stderr


@pytest.mark.parametrize("name", preset_names())
def test_init_prints_presets_that_validate(name, tmp_path):
    proc = cli("init", "--preset", name)
    assert proc.returncode == 0, proc.stderr
    cfg = load_job_text(proc.stdout, tmp_path, check_paths=False)
    assert cfg.target.rank in (8, 16)


def test_unknown_preset():
    assert_user_error(cli("init", "--preset", "nope"), "--preset", "turbo-adapter-v2")


def test_demo_runs_offline(tmp_path):
    """The demo's command, shortened to 60 steps (the full demo job's result is test_toyworld's LoRA test)."""
    proc = cli("demo", "--out", str(tmp_path / "demo"), "--steps", "60", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "demo" / "output" / "demo"
    assert (run / "demo.safetensors").is_file() and (run / "samples" / "contact_sheet.png").is_file()
    start, end = (float(x) for x in proc.stdout.split("loss: ")[1].split(" at the end")[0].split(" at the start, "))
    assert end < start  # the demo learns
    assert str(run / "demo.safetensors") in proc.stdout
    assert "stripes on prompts with the trigger: 0.00 before" in proc.stdout and (run / "before_after.png").is_file()
    assert (tmp_path / "demo" / "toy" / "turbo" / "model_index.json").is_file()
    assert len(list((tmp_path / "demo" / "dataset").glob("*.png"))) == 48


def test_tiny_model_and_adapter_commands(tmp_path):
    import torch
    from diffusers import ZImagePipeline

    from zimage_lora.lora.io import read_lora
    from zimage_lora.lora.network import check_adapter_fits

    assert cli("tiny-model", str(tmp_path / "m"), "--seed", "3").returncode == 0
    proc = cli("tiny-adapter", str(tmp_path / "m"), str(tmp_path / "a.safetensors"), "--rank", "2")
    assert proc.returncode == 0, proc.stderr
    pipe = ZImagePipeline.from_pretrained(str(tmp_path / "m"))
    adapter = read_lora(tmp_path / "a.safetensors")
    assert adapter.modules and all(w.rank == 2 and w.alpha == 2.0 for w in adapter.modules.values())
    assert all(torch.count_nonzero(w.down) and torch.count_nonzero(w.up) for w in adapter.modules.values())
    check_adapter_fits(pipe.transformer, adapter.modules, "tiny adapter")  # raises if a key or shape is off
    assert_user_error(cli("tiny-adapter", str(tmp_path / "nothing"), str(tmp_path / "b.safetensors")), "nothing")


def test_usage_mistakes_are_one_line(tmp_path):
    assert_user_error(cli("train"), "Missing argument", "--help")
    assert_user_error(cli("train", str(tmp_path / "x.yaml"), "--bogus"), "No such option: --bogus")
    assert_user_error(cli("frobnicate"), "frobnicate")
