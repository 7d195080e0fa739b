"""One job on several processes (issue 16), proven with 2 CPU processes (gloo) started by
``zimage-lora train --num-processes 2`` through accelerate, on the tiny model of the real classes.

Every multi-process run is a real ``zimage-lora train`` in a subprocess; the single-process references are the same
recipe in this process. Runs are made once per module and shared. Comparisons use the suite's float tolerances
(``conftest.training_differences``): the same examples, noise and times reach the LoRA on either route, but the
gradients are summed in another order.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import BASE_JOB, cli_env, demo_dataset, merge, run_cli, training_differences, wait_for

from zimage_lora.config import load_job
from zimage_lora.errors import ConfigError, UserError
from zimage_lora.lora.io import read_lora
from zimage_lora.training import launch
from zimage_lora.training.distributed import split_sizes

IMAGES = 8
STEPS = 6
PROMPTS = [{"prompt": "a photo of [trigger]"}, {"prompt": "a red fox in snow"}, {"prompt": "[trigger] at night"}]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir, tiny_adapter):
    """A folder with the dataset, and ``job(name, **train)`` writing a job file for a run of its own (its own latent
    cache, so that each run's VAE encodes are its own)."""
    root = tmp_path_factory.mktemp("scaleout")
    demo_dataset(root / "dataset", IMAGES)

    def job(name: str, override: dict | None = None) -> Path:
        data = merge(
            BASE_JOB,
            {
                "job": {"name": name},
                "model": {"name_or_path": str(tiny_model_dir), "training_adapter": str(tiny_adapter)},
                "train": {"steps": STEPS},
                "save": {"every": 2, "keep": 10},
                # the data options hold per process: caption dropout and flips are keyed by the whole-batch index
                "datasets": [{"caption_dropout": 0.3, "flip_x": True, "cache_dir": f"./cache-{name}"}],
                "sample": {"every": 3, "steps": 2, "prompts": PROMPTS},
            },
        )
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(merge(data, override or {}), sort_keys=False))
        return path

    return SimpleNamespace(root=root, job=job)


def finished(world, name: str) -> SimpleNamespace:
    """A run folder read as ``training_differences`` reads a TrainResult."""
    root = world.root / "output" / name
    samples = sorted(p for p in (root / "samples").glob("*.png") if p.name != "contact_sheet.png")
    return SimpleNamespace(run_dir=root, final_lora=root / f"{name}.safetensors", samples=samples)


def single(world, name: str, batch: int, accum: int = 1) -> SimpleNamespace:
    from zimage_lora.training.recipe import train

    path = world.job(name, {"train": {"batch_size": batch, "grad_accum": accum}})
    train(load_job(path, [], warnings=[]), progress=False)
    return finished(world, name)


def several(world, name: str, override: dict, *args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    done = run_cli("train", world.job(name, override), "--num-processes", "2", "--no-progress", *args, fault=fault)
    return done


def record(run, rank: int) -> dict:
    return json.loads((run.run_dir / "processes" / f"rank-{rank}.json").read_text())


@pytest.fixture(scope="module")
def runs(world):
    """The shared runs: one process at batch 4 and two at batch 2 each (effective batch 4), the same with 2
    accumulation micro-steps, and two sharded processes."""
    out = {"single": single(world, "single", 4), "single_accum": single(world, "single_accum", 2, accum=2)}
    for name, override in {
        "ddp": {"train": {"batch_size": 2}},
        "accum": {"train": {"batch_size": 1, "grad_accum": 2}},
        "shard": {"train": {"batch_size": 2}, "model": {"shard": True}},
    }.items():
        done = several(world, name, override)
        assert done.returncode == 0, done.stderr[-3000:]
        out[name] = finished(world, name)
    return out


def test_two_processes_train_the_lora_of_one_process_with_twice_the_batch(runs):
    assert training_differences(runs["single"], runs["ddp"]) == []
    assert training_differences(runs["single_accum"], runs["accum"]) == []
    facts = json.loads((runs["ddp"].run_dir / "run.json").read_text())
    assert (facts["processes"], facts["effective_batch"], facts["batch_images"]) == (2, 4, 4)
    log = (runs["ddp"].run_dir / "train.log").read_text()
    assert "effective batch 4 = train.batch_size 2 x train.grad_accum 1 x 2 processes" in log


def test_each_process_trains_its_own_part_of_every_batch(runs):
    """The records: at every step the two parts are disjoint, together the whole batch, split as the rule says."""
    for name, micro in (("ddp", 1), ("accum", 2)):
        parts = [record(runs[name], rank) for rank in (0, 1)]
        assert [p["micro_steps"] for p in parts] == [micro, micro]
        for step in range(1, STEPS + 1):
            mine = [p["batches"][str(step)] for p in parts]
            together = sorted(mine[0] + mine[1])
            assert together == list(range(len(together))) and not set(mine[0]) & set(mine[1]), (name, step, mine)
            if micro == 1:  # one whole micro-batch: rank 0 the first part, rank 1 the rest
                assert [len(m) for m in mine] == split_sizes(len(together), 2), (step, mine)
                assert all(i < j for i in mine[0] for j in mine[1])
        total = sum(len(p["batches"][str(s)]) for p in parts for s in range(1, STEPS + 1))
        assert total > STEPS * 2  # most batches hold 4 examples; a bucket's last one fewer


def test_gradients_are_exchanged_once_per_step_and_never_on_micro_steps(runs):
    """The communication hook's count per optimizer step: the same with 2 micro-steps as with one (a bucket is
    all-reduced on the last micro-step only), and at least one bucket."""
    once = record(runs["ddp"], 0)["exchanges"]
    buckets = set(once.values())
    assert len(buckets) == 1 and min(buckets) >= 1
    for rank in (0, 1):
        assert record(runs["accum"], rank)["exchanges"] == once
        assert record(runs["ddp"], rank)["exchanges"] == once


def test_caching_encodes_each_image_once_in_total(runs):
    parts = [record(runs["ddp"], rank) for rank in (0, 1)]
    assert sum(p["vae_encoded_images"] for p in parts) == 2 * IMAGES  # one bucket each (64 px), as is and mirrored
    assert all(p["vae_encoded_images"] > 0 for p in parts)  # split, not done by one
    single_log = (runs["single"].run_dir / "train.log").read_text()
    prompts = int(re.search(r"text: (\d+) distinct prompts", single_log).group(1))
    assert sum(p["text_encoded_prompts"] for p in parts) == prompts
    assert all(p["text_encoded_prompts"] > 0 for p in parts)


def test_the_main_process_alone_writes_the_run(runs):
    run = runs["ddp"].run_dir
    log = (run / "train.log").read_text()
    assert log.count("zimage-lora 0.1") == 1 and "done:" in log
    assert len((run / "metrics.jsonl").read_text().splitlines()) == STEPS
    assert (run / "processes" / "rank-1.log").is_file()
    # previews split by prompt, written by one: each round complete, equal to the single process's (checked above)
    assert len(runs["ddp"].samples) == 3 * len(PROMPTS)
    assert record(runs["ddp"], 0)["saves"] == record(runs["ddp"], 1)["saves"] == [2, 4, 6]  # 6: the final LoRA


def test_a_sharded_base_gives_the_data_parallel_lora(runs):
    assert training_differences(runs["ddp"], runs["shard"]) == []
    assert "sharded across 2 processes (FSDP2)" in (runs["shard"].run_dir / "train.log").read_text()


def test_a_killed_process_ends_the_other_and_resume_completes_the_run(world, runs):
    started = time.monotonic()
    done = several(world, "killed", {"train": {"batch_size": 2}}, fault="kill@step:3#rank1")
    took = time.monotonic() - started
    assert done.returncode == 1, done.stderr[-2000:]
    assert took < 60, took  # both gone, startup included (gloo's own timeout would be 30 minutes)
    assert "another process of this job is gone" in done.stderr
    assert "process 1 ended with signal SIGKILL" in done.stderr
    killed = world.root / "output" / "killed"
    checkpoints = sorted(killed.glob("killed_*.safetensors"))
    states = sorted((killed / "state").glob("*.pt"))
    assert [p.name for p in checkpoints] == ["killed_000000002.safetensors"] and len(states) == 1
    for path in checkpoints:
        assert read_lora(path).modules
    for path in states:
        assert torch.load(path, weights_only=False)["step"] == 2
    resumed = several(world, "killed", {"train": {"batch_size": 2}}, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert training_differences(runs["ddp"], finished(world, "killed")) == []


def test_a_hung_process_is_given_up_on_after_the_process_timeout(world):
    """Process 1 held after step 2 (alive, not answering): process 0 waits at the step's exchange for
    ``job.process_timeout`` (10 s here), not gloo's 30 minutes, then ends in one line; held, it is let go afterwards
    so that the test does not wait for the launcher's own 30-second kill."""
    holds = world.root / "hung-holds"
    holds.mkdir()
    env = {**cli_env("wait@step:2#rank1"), "ZIMAGE_LORA_FAULT_DIR": str(holds)}
    job = world.job("hung", {"train": {"batch_size": 2}, "job": {"process_timeout": 10}})
    err = world.root / "hung.err"
    with open(err, "wb") as sink:
        command = [sys.executable, "-m", "zimage_lora.cli", "train", str(job), "--num-processes", "2", "--no-progress"]
        proc = subprocess.Popen(command, env=env, stderr=sink)
    try:
        wait_for(lambda: (holds / "held-step-2.rank1").exists(), 120, "process 1 held after step 2")
        held_at = time.monotonic()
        wait_for(lambda: "stopped answering (timed out)" in err.read_text(), 60, "process 0 to give up")
        waited = time.monotonic() - held_at
        (holds / "release-step-2.rank1").touch()
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            launch.kill_tree(proc.pid)
    assert code == 1
    assert 5 <= waited < 50, waited  # about the 10-s timeout (seen from outside), nowhere near gloo's own
    assert "error: process 0: another process of this job is gone or stopped answering" in err.read_text()


def test_ctrl_c_saves_once_and_requests_act_on_every_process_at_the_same_step(world, runs):
    """Both processes held in turn: a save request written while process 0 waits after step 2 is carried out by
    both at step 2; a Ctrl-C to ``zimage-lora train`` while it waits after step 4 saves once there, exit 0. Then
    ``--resume`` on one process (same images per micro-batch) completes the LoRA of the uninterrupted run."""
    holds = world.root / "holds"
    holds.mkdir()
    override = {"train": {"batch_size": 2}, "save": {"every": 100}}
    env = {**cli_env("wait@step:2#rank0,wait@step:4#rank0"), "ZIMAGE_LORA_FAULT_DIR": str(holds)}
    command = [sys.executable, "-m", "zimage_lora.cli", "train", str(world.job("stopped", override))]
    err = world.root / "stopped.err"  # a file, not a pipe: a pipe nobody reads fills and blocks the writers
    with open(err, "wb") as sink:
        proc = subprocess.Popen([*command, "--num-processes", "2", "--no-progress"], env=env, stderr=sink)
    run = world.root / "output" / "stopped"
    try:
        wait_for(lambda: (holds / "held-step-2.rank0").exists(), 120, "process 0 held after step 2")
        (run / "requests").mkdir(exist_ok=True)
        (run / "requests" / "save").touch()
        (holds / "release-step-2.rank0").touch()
        wait_for(lambda: (holds / "held-step-4.rank0").exists(), 120, "process 0 held after step 4")
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: (run / "requests" / "stop").exists(), 60, "the Ctrl-C turned into a stop request")
        (holds / "release-step-4.rank0").touch()
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            launch.kill_tree(proc.pid)
    stderr = err.read_text()
    assert code == 0, stderr[-2000:]
    assert "stopped at step 4" in stderr
    assert [p.name for p in sorted(run.glob("stopped_*.safetensors"))] == [
        "stopped_000000002.safetensors",
        "stopped_000000004.safetensors",
    ]
    for rank in (0, 1):
        assert json.loads((run / "processes" / f"rank-{rank}.json").read_text())["saves"] == [2, 4]
    # another number of processes: the images of a whole micro-batch must stay 4
    refused = run_cli("train", world.job("stopped", override), "--resume", "--no-progress")
    assert refused.returncode == 2
    assert "set train.batch_size: 4" in refused.stderr and "Traceback" not in refused.stderr
    resumed = run_cli(
        "train", world.job("stopped", override), "--resume", "--no-progress", "--set", "train.batch_size=4"
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    from conftest import LORA_EFFECT_REL, lora_effect_difference

    assert lora_effect_difference(runs["ddp"].final_lora, finished(world, "stopped").final_lora) < LORA_EFFECT_REL


def test_two_machines_through_accelerates_own_configuration(world, runs):
    """Multi-node as far as one machine allows: two launchers, machine rank 0 and 1 of ``--num_machines 2``, one
    process each, meeting at the main address; the global main process alone writes the run."""
    port = str(launch.free_port())
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2"]
    command += ["--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", port]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    job = world.job("nodes", {"train": {"batch_size": 2}})
    machines = []
    for rank in (0, 1):
        err = open(world.root / f"nodes-{rank}.err", "wb")  # noqa: SIM115 - closed below
        args = [*command, "--machine_rank", str(rank), "-m", "zimage_lora.cli", "train", str(job), "--no-progress"]
        machines.append((subprocess.Popen(args, env=cli_env(), stdout=err, stderr=err), err))
    try:
        codes = [proc.wait(timeout=240) for proc, _ in machines]
    finally:
        for proc, err in machines:
            err.close()
            if proc.poll() is None:
                launch.kill_tree(proc.pid)
    assert codes == [0, 0], (world.root / "nodes-0.err").read_text()[-2000:]
    facts = json.loads((world.root / "output" / "nodes" / "run.json").read_text())
    assert facts["processes"] == 2
    assert training_differences(runs["ddp"], finished(world, "nodes")) == []


def test_torchrun_of_the_module_trains_the_same_lora(world, runs):
    """``torchrun`` instead of accelerate's launcher: the processes find their rank and world in the environment."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port"]
    job = world.job("torchrun", {"train": {"batch_size": 2}})
    done = subprocess.run(
        [*torchrun, str(launch.free_port()), "-m", "zimage_lora.cli", "train", str(job), "--no-progress"],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert training_differences(runs["ddp"], finished(world, "torchrun")) == []


# --- the job's settings and the launcher's command line (no processes) --------------------------------------------


SHARD_REFUSALS = {
    "quantization.transformer=float8": "cannot shard a float8-quantized transformer",
    "model.layer_offload=0.5": "cannot be combined with model.layer_offload",
    "train.compile=true": "cannot be combined with train.compile",
    "target.type=lokr": "trains target.type lora only",
    "train.optimizer=adamw8bit": "train.optimizer adamw8bit cannot step sharded parameters",
    "train.ema.enabled=true": "cannot be combined with train.ema",
}


@pytest.mark.parametrize("setting", sorted(SHARD_REFUSALS))
def test_sharding_refuses_what_it_cannot_combine_with_in_one_sentence(world, setting):
    path = world.job("refused", {"model": {"shard": True}})
    with pytest.raises(ConfigError) as caught:
        load_job(path, [setting], warnings=[])
    message = str(caught.value)
    assert SHARD_REFUSALS[setting] in message and "\n" not in message
    load_job(path, [setting, "model.shard=false"], warnings=[])  # the same setting unsharded is fine


def test_a_list_of_devices_and_the_launcher_command():
    from zimage_lora.config import JobSection

    assert JobSection(name="j", device=["cuda:1", "cuda:3"]).device == ["cuda:1", "cuda:3"]
    assert JobSection(name="j", device=["cuda:2"]).device == "cuda:2"
    for bad in (["cuda:1", "cuda:1"], ["cpu", "cuda:0"], []):
        with pytest.raises(ValueError):
            JobSection(name="j", device=bad)
    assert launch.plan(["cuda:1", "cuda:3"], None, None) == (2, [1, 3])
    assert launch.plan("cpu", 2, None) == (2, None)
    assert launch.plan("auto", None, "0,2") == (2, [0, 2])
    assert launch.plan("cpu", None, None) == (1, None)
    for args, said in (
        (("cpu", None, "0,1"), "use --num-processes"),
        (("auto", 2, "0,1"), "exclude each other"),
        (("cuda:1", 2, None), "a single GPU"),
        ((["cuda:0", "cuda:1"], 3, None), "lists 2 GPUs"),
        (("auto", None, "0,0"), "each GPU number once"),
        (("auto", None, "a,b"), "separated by commas"),
    ):
        with pytest.raises(UserError, match=said):
            launch.plan(*args)
    command = launch.launcher_command(2, [1, 3], ["job.yaml", "--resume"], 29500)
    assert command[1:3] == ["-m", "zimage_lora.training.launch"] and "--multi_gpu" in command
    assert command[command.index("--gpu_ids") + 1] == "1,3"
    assert command[command.index("--num_processes") + 1] == "2"
    assert command[-4:] == ["zimage_lora.cli", "train", "job.yaml", "--resume"]
