"""AI Toolkit's job form, the fields added so far (issue 17): loss types, the sampling switches, the LoKr factor.
Each test shows the field's effect, not only that it is accepted."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from zimage_lora.config import load_job
from zimage_lora.lora import network
from zimage_lora.models.loading import load_components
from zimage_lora.training import flow
from zimage_lora.training.recipe import LoraRecipe, train

# --- loss types -------------------------------------------------------------------------------------------------


def test_each_loss_type_equals_its_formula():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    weights = torch.tensor([0.5, 1.0, 2.0])
    d = (pred - target).flatten(1)
    by_hand = {
        "mse": (d * d).mean(1),
        "mae": d.abs().mean(1),
        "pseudo_huber": ((d * d + 0.01**2).sqrt() - 0.01).mean(1),
    }
    for kind, per_item in by_hand.items():
        expected = float((per_item * weights).mean())
        # the transformer's output is the negative velocity; the target velocity is noise - x0 (x0 = 0 here)
        got, logged = flow.guided_flow_loss(-pred, torch.zeros_like(target), target, weights, None, kind)
        assert math.isclose(float(got), expected, rel_tol=1e-6) and float(logged) == float(got), kind
    # pseudo-Huber: quadratic (d^2 / 2c) for |d| << c, linear (|d| - c) for |d| >> c
    small, large = torch.full((1, 1), 1e-4), torch.full((1, 1), 10.0)
    assert math.isclose(float(flow.elementwise_loss(small, 0 * small, "pseudo_huber")), 1e-8 / 0.02, rel_tol=1e-3)
    assert math.isclose(float(flow.elementwise_loss(large, 0 * large, "pseudo_huber")), 10.0 - 0.01, rel_tol=1e-6)


def _step_data(recipe, micro):
    """Step 1's latents, their keyed noise and the timestep weights of a micro-batch, as the recipe draws them."""
    train_cfg = recipe.cfg.train
    x0 = torch.stack([e.latent for e in micro])
    draws = [
        recipe.draws.noise_and_sigma(1, e.index, x0.shape[1:], train_cfg.timestep_type, train_cfg.timestep_bias,
                                     recipe.arch.shift)
        for e in micro
    ]  # fmt: skip
    noise = torch.stack([n for n, _ in draws])
    return x0, noise, flow.timestep_weights(torch.cat([s for _, s in draws]), train_cfg.timestep_type)


@pytest.mark.parametrize("kind", ["mae", "pseudo_huber"])
def test_the_loss_type_reaches_the_logged_loss(make_job, kind):
    """One real step on the tiny model: the logged loss is the chosen formula on the step's own prediction (read by a
    hook on the transformer) and target (the examples' latents and their keyed noise)."""
    cfg = load_job(make_job({"train": {"loss": kind, "batch_size": 2}}), [], warnings=[])
    recipe = LoraRecipe(cfg)
    try:
        recipe.setup()
        batch = recipe.data.next(SimpleNamespace(epoch=0, batch=0), 1)
        outputs = []
        hook = recipe.transformer.register_forward_hook(lambda m, a, out: outputs.append(out[0]))
        try:
            logged = recipe.train_step(batch).loss
        finally:
            hook.remove()
        x0, noise, weights = _step_data(recipe, batch.micro[0])
        velocity = -torch.stack([o.detach().float().squeeze(1) for o in outputs[0]])
        d = (velocity - (noise - x0)).flatten(1)
        per_item = d.abs().mean(1) if kind == "mae" else ((d * d + 0.01**2).sqrt() - 0.01).mean(1)
        assert math.isclose(logged, float((per_item * weights).mean()), rel_tol=1e-5)
    finally:
        recipe.close()


# --- sampling switches ------------------------------------------------------------------------------------------
PROMPTS = ["a photo of [trigger]", "a red fox", "[trigger] at night"]


def _run(make_job, tmp_path, name: str, sample: dict):
    job = make_job({"job": {"name": name}, "train": {"steps": 4}, "save": {"every": 100},
                    "sample": {"every": 2, "steps": 1, "prompts": PROMPTS, **sample}},
                   folder=tmp_path / name)  # fmt: skip
    result = train(load_job(job, [], warnings=[]), progress=False)
    samples = result.run_dir / "samples"
    written = {p.name: Image.open(p).text for p in sorted(samples.glob("0*.png"))}
    reference = sorted(p.name for p in (samples / "reference").glob("*.png"))
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return written, reference, rows


def test_the_sampling_switches_change_which_previews_are_written_and_their_seeds(make_job, tmp_path):
    plain, _, _ = _run(make_job, tmp_path, "plain", {})
    assert sorted({name[:9] for name in plain}) == ["000000000", "000000002", "000000004"]
    assert {info["seed"] for info in plain.values()} == {"42"}

    walked, _, _ = _run(make_job, tmp_path, "walk", {"walk_seed": True, "seed": 10})
    assert {name: info["seed"] for name, info in walked.items() if name.startswith("000000002")} == {
        "000000002_00.png": "10",
        "000000002_01.png": "11",
        "000000002_02.png": "12",
    }

    later, _, _ = _run(make_job, tmp_path, "later", {"start_step": 3})
    assert sorted({name[:9] for name in later}) == ["000000000", "000000004"]  # no round at 2; the final one stays

    hidden, reference, rows = _run(make_job, tmp_path, "hidden", {"first": False})
    assert sorted({name[:9] for name in hidden}) == ["000000002", "000000004"]
    assert reference == ["000000000_00.png", "000000000_01.png", "000000000_02.png"]  # still rendered, for the scores
    assert "leak" in next(r for r in rows if r["step"] == 2)

    off, reference, rows = _run(make_job, tmp_path, "off", {"enabled": False})
    assert off == {} and reference == [] and not any("leak" in r for r in rows)


# --- LoKr factor ------------------------------------------------------------------------------------------------


def _split(d: int, factor: int) -> tuple[int, int]:
    """The expected (smaller, larger) parts of a dimension: (f, d/f) when f divides d, else the most even split
    whose smaller part is at most f (any size for f = -1)."""
    if factor > 0 and d % factor == 0:
        return tuple(sorted((factor, d // factor)))
    m = max(k for k in range(1, int(d**0.5) + 1) if d % k == 0 and (factor < 0 or k <= factor))
    return m, d // m


@pytest.mark.parametrize("factor", [-1, 2, 4, 8])
def test_the_lokr_factor_gives_the_factor_shapes(tiny_model_dir, factor):
    transformer = load_components(tiny_model_dir).transformer
    names = network.target_module_names(transformer, r"layers\.0\.feed_forward\.w1")
    network.add_user_lora(transformer, names, rank=2, alpha=2, seed=0, kind="lokr", lokr_factor=factor)
    layer = transformer.get_submodule(names[0])
    out_small, out_large = _split(layer.base_layer.out_features, factor)
    in_small, in_large = _split(layer.base_layer.in_features, factor)
    assert tuple(layer.lokr_w1[network.USER].shape) == (out_small, in_small)
    w2 = layer.lokr_w2_a[network.USER] @ layer.lokr_w2_b[network.USER]
    assert tuple(w2.shape) == (out_large, in_large)


# --- Blank Prompt Preservation and the guidance loss --------------------------------------------------------------


def _preserving_run(make_job, tmp_path, name: str, bpp: bool):
    train_cfg = {"steps": 60, "lr": 3e-3, "blank_prompt_preservation": {"enabled": bpp, "multiplier": 2.0}}
    job = make_job({"job": {"name": name}, "model": {"arch": "zimage_deturbo"}, "target": {"rank": 8},
                    "save": {"every": 1000}, "train": train_cfg}, images=4, folder=tmp_path / name)  # fmt: skip
    return train(load_job(job, [], warnings=[]), progress=False)


def test_blank_prompt_preservation_keeps_the_empty_prompts_prediction(make_job, tmp_path, tiny_model_dir):
    """Measured as for DOP: how far the LoRA moves the model's output on the empty prompt, relative to the base
    (here: 0.96 without, 0.22 with, multiplier 2)."""
    from test_advanced import _relative_change

    plain = _preserving_run(make_job, tmp_path, "plain", False)
    kept = _preserving_run(make_job, tmp_path, "kept", True)
    without = _relative_change(tiny_model_dir, plain.final_lora, ["", ""])
    with_bpp = _relative_change(tiny_model_dir, kept.final_lora, ["", ""])
    assert with_bpp <= 0.5 * without, (with_bpp, without)
    rows = [json.loads(line) for line in (kept.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["bpp_loss"] == 0.0 and rows[-1]["bpp_loss"] > 0 and "dop_loss" not in rows[-1]


def test_the_guidance_loss_trains_toward_its_formula(make_job):
    """The loss of a step is the MSE against u + g (target - u), u the model's output on the empty prompt (the first
    forward, without gradient); the logged loss stays the plain one."""
    g = 2.5
    cfg = load_job(make_job({"train": {"batch_size": 2, "guidance_loss": {"enabled": True, "target": g}}}), [],
                   warnings=[])  # fmt: skip
    recipe = LoraRecipe(cfg)
    try:
        recipe.setup()
        with torch.no_grad():  # a LoRA that is not zero, so that the empty prompt's prediction carries it
            for p in network.user_parameters(recipe.transformer):
                p.normal_(0, 0.05)
        micro = recipe.data.next(SimpleNamespace(epoch=0, batch=0), 1).micro[0]
        outputs = []
        hook = recipe.transformer.register_forward_hook(lambda m, a, out: outputs.append(out[0]))
        try:
            loss, plain, _ = recipe.micro_loss(1, micro)
        finally:
            hook.remove()
        assert len(outputs) == 2  # the empty prompt's forward, then the caption's
        x0, noise, weights = _step_data(recipe, micro)
        u, pred = (-torch.stack([o.detach().float().squeeze(1) for o in out]) for out in outputs)
        target = noise - x0
        assert not torch.allclose(u, pred)  # the caption matters
        wanted = u + g * (target - u)
        per_item = ((pred - wanted) ** 2).flatten(1).mean(1)
        assert math.isclose(float(loss.detach()), float((per_item * weights).mean()), rel_tol=1e-5)
        logged = ((pred - target) ** 2).flatten(1).mean(1)
        assert math.isclose(float(plain), float((logged * weights).mean()), rel_tol=1e-5)
    finally:
        recipe.close()


def test_blank_prompt_preservation_and_dop_exclude_each_other(make_job):
    from zimage_lora.errors import ConfigError

    job = make_job({"train": {"blank_prompt_preservation": {"enabled": True}}})
    with pytest.raises(ConfigError, match="cannot be combined with train.dop.enabled"):
        load_job(job, ["train.dop.enabled=true", "train.dop.class_word=fox"], warnings=[])


# --- DATASETS panel: caption tags, flips, the LoRA weight ------------------------------------------------------------
TAGS = "zfox, red, fox, snow, tree, night, moon"


def test_shuffled_tags_keep_the_first_ones_and_vary_after_them():
    from zimage_lora.data.dataset import edit_tags
    from zimage_lora.training.draws import KeyedDraws

    rest = sorted(TAGS.split(", ")[2:])
    seen = set()
    for seed in range(20):
        edited = edit_tags(TAGS, 2, True, 0.0, KeyedDraws(seed).tags(1, 0))
        tags = edited.split(", ")
        assert tags[:2] == ["zfox", "red"] and sorted(tags[2:]) == rest
        seen.add(edited)
    assert len(seen) >= 10  # 120 orders of 5 tags: 20 seeds give many
    again = [edit_tags(TAGS, 2, True, 0.0, KeyedDraws(7).tags(3, 1)) for _ in range(2)]
    assert again[0] == again[1]  # one seed, one step, one example: one order


def test_token_dropout_drops_each_later_tag_at_its_rate_and_never_a_kept_one():
    from zimage_lora.data.dataset import edit_tags
    from zimage_lora.training.draws import KeyedDraws

    dropped = dict.fromkeys(TAGS.split(", "), 0)
    for step in range(200):
        kept = set(edit_tags(TAGS, 2, False, 0.5, KeyedDraws(0).tags(step, 0)).split(", "))
        for tag in dropped:
            dropped[tag] += tag not in kept
    assert dropped["zfox"] == dropped["red"] == 0
    assert all(80 <= dropped[t] <= 120 for t in TAGS.split(", ")[2:]), dropped


def _batches(tmp_path, store, image, **options):
    from zimage_lora.config import DatasetSection
    from zimage_lora.data.batches import DatasetBatches
    from zimage_lora.data.dataset import ImageItem, Sample
    from zimage_lora.training.draws import KeyedDraws

    ds = DatasetSection(path=str(tmp_path), caption_dropout=0.0, **options)
    items, samples = [ImageItem(image, TAGS, 0)], [Sample(0, 64, (64, 64))]
    return DatasetBatches(items, samples, store.get, [ds], 1, 1, 5, KeyedDraws(5))


def test_flips_are_drawn_per_step_cached_and_resumed(tmp_path, tiny_model_dir):
    from conftest import demo_dataset
    from PIL import ImageOps

    from zimage_lora.data.cache import LatentStore
    from zimage_lora.data.dataset import load_rgb

    image = sorted(demo_dataset(tmp_path / "data", 1).glob("*.png"))[0]
    store = LatentStore(load_components(tiny_model_dir, parts=("vae",)).vae, "cpu")
    cache = tmp_path / "cache"
    assert store.prepare([(image, (64, 64), cache, flip) for flip in ("", "x")]) == (2, 0)
    assert len(list(cache.glob("*.safetensors"))) == 2  # the flipped latent is an entry of its own

    batches = _batches(tmp_path, store, image, flip_x=True)
    position = SimpleNamespace(epoch=0, batch=0)
    drawn = [batches.next(position, step).micro[0][0] for step in range(1, 201)]
    flips = [e.flip for e in drawn]
    assert set(flips) == {"", "x"} and 80 <= flips.count("x") <= 120
    flipped = next(e for e in drawn if e.flip == "x")
    mirrored = tmp_path / "mirrored.png"
    ImageOps.mirror(load_rgb(image)).save(mirrored)
    assert torch.allclose(flipped.latent, store.encode([mirrored], (64, 64))[0], atol=1e-5)
    assert not torch.allclose(flipped.latent, next(e for e in drawn if e.flip == "").latent, atol=1e-3)

    resumed_at = SimpleNamespace(epoch=0, batch=0)
    for step in range(1, 101):  # a run saved at step 100 stores its position; a new process continues from it
        _batches(tmp_path, store, image, flip_x=True).next(resumed_at, step)
    again = _batches(tmp_path, store, image, flip_x=True)
    assert [again.next(resumed_at, step).micro[0][0].flip for step in range(101, 201)] == flips[100:]

    plain = _batches(tmp_path, store, image)
    assert {plain.next(SimpleNamespace(epoch=0, batch=0), step).micro[0][0].flip for step in range(1, 51)} == {""}

    tagged = _batches(tmp_path, store, image, shuffle_tokens=True, keep_tokens=1)  # the tag edits reach the batches
    captions = [tagged.next(SimpleNamespace(epoch=0, batch=0), step).micro[0][0] for step in range(1, 21)]
    assert all(e.caption.startswith("zfox, ") and e.full_caption == TAGS for e in captions)
    assert len({e.caption for e in captions}) > 5


def test_a_datasets_lora_weight_reaches_the_forward_of_its_items_only(make_job, tmp_path):
    from conftest import demo_dataset

    demo_dataset(tmp_path / "half", 3)
    datasets = [
        {"path": "./dataset", "resolutions": [64], "caption_dropout": 0.0},
        {"path": "./half", "resolutions": [64], "caption_dropout": 0.0, "network_weight": 0.5},
    ]
    cfg = load_job(make_job({"train": {"batch_size": 2}, "datasets": datasets}), [], warnings=[])
    recipe = LoraRecipe(cfg)
    try:
        recipe.setup()
        name = network.target_module_names(recipe.transformer, cfg.target.modules or r"layers\.0\..*to_q")[0]
        layer = recipe.transformer.get_submodule(name)
        seen = []
        hook = layer.register_forward_pre_hook(lambda m, a: seen.append(m.scaling[network.USER]))
        base = cfg.target.resolved_alpha / cfg.target.rank
        weights_seen = set()
        try:
            for step in range(1, 9):
                batch = recipe.data.next(recipe.state, step)
                weights = {cfg.datasets[e.dataset].network_weight for e in batch.micro[0]}
                assert len(weights) == 1  # a batch never mixes LoRA weights
                seen.clear()
                recipe.train_step(batch)
                weight = weights.pop()
                assert seen and all(math.isclose(s, base * weight) for s in seen), (step, seen)
                weights_seen.add(weight)
        finally:
            hook.remove()
        assert weights_seen == {1.0, 0.5}
        assert layer.scaling[network.USER] == base  # back to 1 after the step (previews, validation, saves)
    finally:
        recipe.close()


def test_tag_edits_refuse_cached_text_embeddings_in_one_sentence(make_job):
    from zimage_lora.errors import ConfigError

    with pytest.raises(ConfigError, match=r"datasets\[0\].shuffle_tokens: each step's caption differs"):
        load_job(make_job({"datasets": [{"shuffle_tokens": True}]}), [], warnings=[])
    job = make_job({"datasets": [{"token_dropout": 0.3}], "train": {"cache_text_embeddings": False}})
    assert load_job(job, [], warnings=[]).datasets[0].token_dropout == 0.3


# --- loss masks -------------------------------------------------------------------------------------------------------


def _mask_image(path, size=(96, 64)):
    """White where x < 48, black elsewhere, and one 8x8 block at x 48-55 half white (its top 4 rows)."""
    import numpy as np

    pixels = np.zeros((size[1], size[0]), dtype=np.uint8)
    pixels[:, :48] = 255
    pixels[:4, 48:56] = 255
    Image.fromarray(pixels, "L").save(path)
    return path


def test_a_mask_is_cropped_and_flipped_with_its_image_and_averaged_per_latent_cell(tmp_path):
    from zimage_lora.data.masks import mask_grid

    mask = _mask_image(tmp_path / "m.png")
    grid = mask_grid(mask, (96, 64), (64, 64), "")  # the 96x64 image's centre 64x64: x 16-79
    assert grid.shape == (8, 8)
    assert torch.equal(grid[:, :4], torch.ones(8, 4)) and float(grid[0, 4]) == 0.5
    assert float(grid[1:, 4:].sum()) == 0 and float(grid[0, 5:].sum()) == 0
    mirrored = mask_grid(mask, (96, 64), (64, 64), "x")
    assert torch.equal(mirrored, grid.flip(1))
    assert torch.equal(mask_grid(mask, (96, 64), (64, 64), "y"), grid.flip(0))


def test_masked_cells_weigh_the_loss_by_the_minimum_value(tmp_path):
    from zimage_lora.data.masks import cell_weights, mask_grid

    grid = mask_grid(_mask_image(tmp_path / "m.png"), (96, 64), (64, 64), "")[None]
    g = torch.Generator().manual_seed(0)
    out, x0, noise = (torch.randn(1, 16, 8, 8, generator=g) for _ in range(3))
    changed = x0.clone()
    changed[..., 1:, 4:] += torch.randn(1, 16, 7, 4, generator=g)  # only cells where the mask is 0
    w = torch.ones(1)

    def loss_and_grad(x, cells):
        pred = out.clone().requires_grad_(True)
        loss, _ = flow.guided_flow_loss(pred, x, noise, w, None, "mse", cells=cells)
        loss.backward()
        return loss.detach(), pred.grad

    zero = cell_weights(grid, 0.0)
    (a, ga), (b, gb) = loss_and_grad(x0, zero), loss_and_grad(changed, zero)
    assert torch.equal(a, b) and torch.equal(ga, gb)  # bit-identical
    plain_change = float(loss_and_grad(changed, None)[0] - loss_and_grad(x0, None)[0])
    m = 0.1
    masked_change = float(
        loss_and_grad(changed, cell_weights(grid, m))[0] - loss_and_grad(x0, cell_weights(grid, m))[0]
    )
    assert math.isclose(masked_change, m * plain_change, rel_tol=1e-4)


def test_a_run_with_masks_trains_and_names_an_image_without_one(make_job, tmp_path):
    job = make_job({"datasets": [{"mask_path": "./masks", "mask_min_value": 0.2, "flip_x": True}]})
    (tmp_path / "masks").mkdir()
    images = sorted((tmp_path / "dataset").glob("*.png"))
    for image in images[:-1]:
        _mask_image(tmp_path / "masks" / image.name, Image.open(image).size)
    cfg = load_job(job, [], warnings=[])
    recipe = LoraRecipe(cfg)
    try:
        recipe.setup()
        masks = []
        for step in range(1, 7):
            batch = recipe.data.next(recipe.state, step)
            masks += [e.mask for e in batch.micro[0]]
            assert math.isfinite(recipe.train_step(batch).loss)
    finally:
        recipe.close()
    weighted = [m for m in masks if m is not None]
    assert weighted and len(weighted) < len(masks)  # the masked images and the one without
    assert all(math.isclose(float(m.min()), 0.2, rel_tol=1e-6) and float(m.max()) == 1.0 for m in weighted)
    log = (recipe.run.root / "train.log").read_text()
    assert f"no mask for {images[-1].name}" in log
    with pytest.raises(Exception, match="mask_path: folder not found"):
        load_job(job, ["datasets.0.mask_path=./nowhere"], warnings=[])


# --- regularisation ---------------------------------------------------------------------------------------------------


def _reg_job(make_job, tmp_path, weight: float):
    from conftest import demo_dataset

    reg = demo_dataset(tmp_path / "reg", 3)
    for image in reg.glob("*.png"):  # captions that would carry the trigger: a regularisation image never does
        image.with_suffix(".txt").write_text("a photo of [trigger], a fox, zfox in snow")
    datasets = [
        {"path": "./dataset", "resolutions": [64], "caption_dropout": 0.0},
        {"path": "./reg", "resolutions": [64], "caption_dropout": 0.0, "is_reg": True},
    ]
    train_cfg = {"reg_ratio": 0.25, "reg_weight": weight, "max_grad_norm": 0}
    return load_job(make_job({"datasets": datasets, "train": train_cfg}, folder=tmp_path), [], warnings=[])


def test_regularisation_fills_its_share_of_batches_without_the_trigger(make_job, tmp_path):
    cfg = _reg_job(make_job, tmp_path, 0.5)
    recipe = LoraRecipe(cfg)
    try:
        recipe.setup()
        position = SimpleNamespace(epoch=0, batch=0, reg_epoch=0, reg_batch=0)
        drawn = [recipe.data.next(position, step).micro[0][0] for step in range(1, 201)]
    finally:
        recipe.close()
    reg = [e for e in drawn if cfg.datasets[e.dataset].is_reg]
    assert len(reg) == 50  # 0.25 of 200, spread evenly
    assert all("zfox" not in e.caption and "zfox" not in e.full_caption for e in reg)
    assert {e.caption for e in reg} == {"a photo of, a fox, in snow"}
    assert any("zfox" in e.caption for e in drawn if not cfg.datasets[e.dataset].is_reg)


def test_a_regularisation_batch_is_weighted_by_reg_weight(make_job, tmp_path):
    """The same first regularisation batch (step 4 at reg_ratio 0.25) on two fresh runs that differ only in
    reg_weight: the gradient (its logged norm, unclipped) scales by the weight; the logged loss does not."""
    norms, losses = {}, {}
    for weight in (1.0, 0.5):
        cfg = _reg_job(make_job, tmp_path / str(weight), weight)
        recipe = LoraRecipe(cfg)
        try:
            recipe.setup()
            position = SimpleNamespace(epoch=0, batch=0, reg_epoch=0, reg_batch=0)
            batch = next(b for b in (recipe.data.next(position, s) for s in range(1, 9)) if b.step == 4)
            assert cfg.datasets[batch.micro[0][0].dataset].is_reg
            step = recipe.train_step(batch)
            norms[weight], losses[weight] = step.grad_norm, step.loss
        finally:
            recipe.close()
    assert math.isclose(norms[0.5], 0.5 * norms[1.0], rel_tol=1e-5) and norms[1.0] > 0
    assert math.isclose(losses[0.5], losses[1.0], rel_tol=1e-6)


def test_regularisation_settings_refused_in_one_sentence(make_job):
    from zimage_lora.errors import ConfigError

    with pytest.raises(ConfigError, match="every dataset is regularisation"):
        load_job(make_job({"datasets": [{"is_reg": True}]}), [], warnings=[])
    second = {"path": "./dataset", "resolutions": [64], "is_reg": True}
    job = make_job({"datasets": [{"path": "./dataset", "resolutions": [64]}, second], "train": {"reg_ratio": 0}})
    with pytest.raises(ConfigError, match="train.reg_ratio: 0 never draws"):
        load_job(job, [], warnings=[])


# --- text-encoder layer offloading ----------------------------------------------------------------------------------


def test_text_encoder_offloading_gives_the_resident_embeddings(make_job, tmp_path):
    """The same job with half the text encoder's layers streamed in: the same cached embeddings, bit for bit, with
    the offloaded layers loaded once per prompt and at most two on the device at once (recorded)."""
    cached = {}
    for fraction in (0.0, 0.5):
        job = make_job({"job": {"name": f"te{int(fraction * 10)}"}, "model": {"text_encoder_offload": fraction}})
        recipe = LoraRecipe(load_job(job, [], warnings=[]))
        try:
            recipe.setup()
            cached[fraction] = dict(recipe.text.cached)
            record = recipe.memory_record()
        finally:
            recipe.close()
    assert cached[0.0].keys() == cached[0.5].keys() and len(cached[0.0]) > 2
    assert all(torch.equal(cached[0.0][p], cached[0.5][p]) for p in cached[0.0])
    offload = record["text_encoder_offload"]
    assert offload["layers"] == [0, 1]  # ceil(0.5 x 3) of the tiny encoder's 3 layers
    assert offload["loads"][:2] == [len(cached[0.5])] * 2 and offload["max_resident"] <= 2
    with pytest.raises(Exception, match="model.text_encoder_offload: not with model.low_vram"):
        load_job(job, ["model.low_vram=true"], warnings=[])
