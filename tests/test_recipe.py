"""The recipe's public lifecycle (setup, train_step, save, sample, close) and its keyed random draws.

The recorded losses below were measured once, when the draws became keyed by (seed, step, sample index); a change of
the numerics of a training step (loss, noise, timesteps, caption dropout, the optimizer) shows up here first.
"""

from __future__ import annotations

import json

import pytest
import torch

from zimage_lora.config import load_job
from zimage_lora.training.draws import KeyedDraws, keyed_generator
from zimage_lora.training.recipe import LoraRecipe, StepMetrics

# losses of steps 1-4 of LIFECYCLE_JOB (batch 2 x 2 accumulation steps, caption dropout 0.5), recorded once on an
# AMD EPYC (2 cores, torch 2.13.0 CPU) when the draws became keyed
RECORDED_LOSSES = [1.6064778566360474, 2.8559763431549072, 3.295496344566345, 1.7740110754966736]

LIFECYCLE_JOB = {
    "train": {"steps": 4, "batch_size": 2, "grad_accum": 2, "lr": 5e-4},
    "datasets": [{"path": "./dataset", "resolutions": [64], "caption_dropout": 0.5}],
    "sample": {"every": 1000, "steps": 2, "prompts": ["[trigger], a fox"]},
}


def test_the_public_lifecycle_trains_saves_and_samples_with_the_recorded_losses(make_job):
    recipe = LoraRecipe(load_job(make_job(LIFECYCLE_JOB, images=4)), progress=False)
    recipe.setup()
    try:
        metrics = [recipe.train_step(recipe.data.next(recipe.state, step)) for step in range(1, 5)]
        assert all(isinstance(m, StepMetrics) for m in metrics)
        assert [m.step for m in metrics] == [1, 2, 3, 4] and recipe.state.step == 4
        assert [m.loss for m in metrics] == pytest.approx(RECORDED_LOSSES, rel=1e-5)
        assert all(m.grad_norm > 0 and m.lr == 5e-4 and m.dop_loss is None for m in metrics)
        # 4 images in 3 buckets make 3 batches an epoch; 4 steps of 2 micro-batches took 8 of them (no
        # regularisation datasets: their own order is untouched)
        assert recipe.state.position() == {"epoch": 2, "batch": 2, "reg_epoch": 0, "reg_batch": 0}
        final = recipe.save(4, final=True)
        previews = recipe.sample(4)
    finally:
        recipe.close()
    assert final.is_file() and (recipe.run.state_dir / "000000004.pt").is_file()
    assert [p.name for p in previews] == ["000000004_00.png"]
    assert (recipe.run.samples_dir / "contact_sheet.png").is_file()


def test_train_runs_the_same_steps_as_the_lifecycle(make_job, tmp_path):
    """``train()`` is the lifecycle plus the loop: the same losses as stepping by hand."""
    from zimage_lora.training.recipe import train

    result = train(load_job(make_job(LIFECYCLE_JOB, images=4)), progress=False)
    losses = [json.loads(line)["loss"] for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx(RECORDED_LOSSES, rel=1e-5)


def test_keyed_draws_depend_on_their_key_only():
    def noise(seed, step, index):
        return KeyedDraws(seed).noise_and_sigma(step, index, (4, 8, 8), "sigmoid", "balanced", 3.0)

    a, sigma = noise(7, 3, 1)
    again, sigma_again = noise(7, 3, 1)
    assert torch.equal(a, again) and torch.equal(sigma, sigma_again)  # no hidden running state
    for other in (noise(8, 3, 1), noise(7, 4, 1), noise(7, 3, 2)):
        assert not torch.equal(a, other[0]) and not torch.equal(sigma, other[1])
    # each purpose has its own stream: the noise is not the generator the sigma came from
    assert not torch.equal(torch.randn(4, 8, 8, generator=keyed_generator(7, 3, 1, "sigma")), a)
    draws = KeyedDraws(7)
    dropped = [draws.caption_dropped(step, index, 0.3) for step in range(1, 201) for index in range(4)]
    assert 0.25 < sum(dropped) / len(dropped) < 0.35
    assert dropped == [draws.caption_dropped(step, index, 0.3) for step in range(1, 201) for index in range(4)]
    assert not any(draws.caption_dropped(step, 0, 0.0) for step in range(1, 201))


def test_one_batch_or_micro_batches_draw_the_same(make_job, tmp_path):
    """Batch 4, batch 2 x 2 accumulation and batch 1 x 4: the same examples get the same noise, noise level and
    caption dropout (keyed by their place in the step), so the step's loss and gradient are the same."""
    from importlib import resources

    from conftest import merge

    bundled = resources.files("zimage_lora") / "demo" / "dataset"
    square = {"a.png": "fox_01.png", "b.jpg": "fox_04.JPG", "c.png": "fox_07.png", "d.png": "fox_01.png"}  # one bucket
    base = {
        "train": {"steps": 1, "max_grad_norm": 0.0, "timestep_type": "sigmoid"},
        "datasets": [
            {"path": "./dataset", "resolutions": [64], "caption_dropout": 0.5, "default_caption": "[trigger], a fox"}
        ],
    }
    first = {}
    for batch, accum in [(4, 1), (2, 2), (1, 4)]:
        root = tmp_path / f"b{batch}"
        (root / "dataset").mkdir(parents=True)
        for name, source in square.items():
            (root / "dataset" / name).write_bytes((bundled / source).read_bytes())
        job = make_job(merge(base, {"train": {"batch_size": batch, "grad_accum": accum}}), folder=root)
        recipe = LoraRecipe(load_job(job), progress=False)
        recipe.setup()
        try:
            step = recipe.data.next(recipe.state, 1)
            assert [len(m) for m in step.micro] == [batch] * accum
            captions = [e.caption for m in step.micro for e in m]
            first[batch] = (recipe.train_step(step), captions)
        finally:
            recipe.close()
    (ref, captions), others = first[4], [first[2], first[1]]
    assert "" in captions and any(captions)  # the dropout drew both ways
    for metrics, other_captions in others:
        assert other_captions == captions
        assert metrics.loss == pytest.approx(ref.loss, rel=1e-5)
        assert metrics.grad_norm == pytest.approx(ref.grad_norm, rel=1e-4)
