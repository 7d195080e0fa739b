"""Layer offloading, low_vram and partial checkpointing (issue 8): blocks really move, only the chosen blocks
recompute, and nothing but memory and time changes.

On the CPU the offloader's "device copy" is a fresh clone of the home copy, so these tests prove the mechanics:
which blocks are loaded and evicted when (counts per block, at most two offloaded blocks resident at once, empty
placeholders between uses), saved tensors kept as references, and losses and LoRA gradients bit-identical to a run
without offloading, with and without gradient checkpointing. The memory and overlap gains need a GPU: the CUDA
tests at the end (skipped here) check pinned homes, freed device memory and where low_vram components sit.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import training_differences
from diffusers import ZImageTransformer2DModel

from zimage_lora.config import DEFAULT_TARGET_REGEX, load_job
from zimage_lora.data.text_cache import PromptEmbeddings
from zimage_lora.lora import network
from zimage_lora.models.checkpointing import enable_checkpointing, main_blocks
from zimage_lora.models.loading import load_components
from zimage_lora.models.offload import BlockOffloader, OnDemand, offloaded_indices
from zimage_lora.models.quant import TRANSFORMER_BLOCKS, quantize_model
from zimage_lora.training.recipe import train

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_offloaded_blocks_are_spread_evenly():
    assert offloaded_indices(30, 0.5) == list(range(0, 30, 2))
    assert offloaded_indices(30, 1.0) == list(range(30))
    assert offloaded_indices(30, 0.1) == [0, 10, 20]
    assert offloaded_indices(30, 0.01) == [0]  # ceil: any fraction above 0 offloads at least one block
    assert offloaded_indices(30, 0.0) == []
    assert offloaded_indices(2, 0.5) == [0]


# --- the mechanics on a 4-block transformer ------------------------------------------------------------------------
def _model(device="cpu", quant=None, checkpointing: bool | float = False, dim=64):
    torch.manual_seed(0)
    model = ZImageTransformer2DModel(
        dim=dim, n_layers=4, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
        axes_dims=[8, 12, 12] if dim == 64 else [dim // 8, dim // 8 * 3 // 2, dim // 8 * 3 // 2],
        axes_lens=[1536, 512, 512],
    )  # fmt: skip
    model.requires_grad_(False)
    if quant:
        quantize_model(model, quant, TRANSFORMER_BLOCKS)
    model.to(device)
    network.add_user_lora(model, network.target_module_names(model, DEFAULT_TARGET_REGEX), 4, 4.0, seed=0)
    with torch.no_grad():  # a LoRA that is not zero, so every path carries gradient
        for p in network.user_parameters(model):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    if checkpointing:
        enable_checkpointing(model, float(checkpointing))  # True: every block recomputes
    return model.train()


def assert_same_steps(losses, grads, reference_losses, reference_grads) -> None:
    """The same losses and LoRA gradients up to float rounding (the largest difference 1e-5 of the largest value):
    two paths through other memory, not a rerun, so not necessarily the same bits on every CPU."""
    assert [float(v) for v in losses] == pytest.approx([float(v) for v in reference_losses], rel=1e-6)
    for ours, theirs in zip(grads, reference_grads, strict=True):
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert (ours[key] - theirs[key]).abs().max() <= 1e-5 * theirs[key].abs().max(), key


def _steps(model, offload: float, steps: int = 2, device="cpu"):
    """Loss and LoRA gradients of ``steps`` SGD steps; the offloader's record after each step."""
    offloader = BlockOffloader(model, offload, device) if offload else None
    params = network.named_user_parameters(model)
    optimizer = torch.optim.SGD(params.values(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    x = [torch.randn(16, 1, 8, 8, generator=g).to(device) for _ in range(2)]
    caps = [torch.randn(n, 32, generator=g).to(device) for n in (7, 7)]
    t = torch.rand(2, generator=g).to(device)
    losses, grads, between = [], [], []
    for _ in range(steps):
        loss = sum((o.float() ** 2).mean() for o in model(x, t, caps, return_dict=False)[0])
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in params.items()})
        optimizer.step()
        optimizer.zero_grad()
        if offloader is not None:
            between.append([offloader.on_device(i) for i in offloader.offloaded])
    return losses, grads, offloader, between


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("quant", [None, "int8"], ids=["bf16-weights", "int8-weights"])
def test_offload_gives_identical_losses_and_gradients_and_moves_every_block(checkpointing, quant):
    losses, grads, _, _ = _steps(_model(quant=quant, checkpointing=checkpointing), 0)
    model = _model(quant=quant, checkpointing=checkpointing)
    off_losses, off_grads, offloader, between = _steps(model, 1.0)
    assert_same_steps(off_losses, off_grads, losses, grads)
    assert offloader.offloaded == [0, 1, 2, 3]
    # each step loads every block twice (forward, then backward; a checkpoint's recompute finds it resident) ...
    assert offloader.loads == [4, 4, 4, 4] and offloader.evictions == [4, 4, 4, 4]
    # ... with the next block prefetched while one works: never more than two of the four on the device
    assert offloader.max_resident == 2
    assert between == [[False] * 4, [False] * 4]  # between steps every offloaded block is an empty placeholder
    frozen = offloader.tensors[2]
    assert frozen and all(t.numel() == 0 for t in frozen)
    assert all(p.numel() > 0 for p in network.user_parameters(model))  # the LoRA never leaves
    # without checkpointing autograd would keep every block's weights until the backward: references instead
    assert (offloader.saved_references > 0) != checkpointing
    # no-grad forwards (previews) load and evict each block once
    with torch.no_grad():
        model([torch.zeros(16, 1, 8, 8)], torch.zeros(1), [torch.zeros(5, 32)], return_dict=False)
    assert offloader.loads == [5, 5, 5, 5] and offloader.evictions == [5, 5, 5, 5]


def test_partial_offload_leaves_the_other_blocks_alone():
    _, _, offloader, between = _steps(_model(), 0.5)
    assert offloader.offloaded == [0, 2]
    assert offloader.loads == [4, 0, 4, 0] and offloader.max_resident <= 2
    assert between[-1] == [False, False]
    offloader.remove()
    assert all(t.numel() for block in (0, 2) for t in _split(offloader, block))


def _split(offloader, block):
    from zimage_lora.models.offload import _split_tensors

    return _split_tensors(offloader.model.layers[block])[0]


# --- partial checkpointing (train.checkpoint_fraction) ---------------------------------------------------------------
def _forward_calls(model):
    """Forward calls per main block: 2 per step for a block that recomputes, 1 for one that keeps activations."""
    calls = [0] * len(main_blocks(model))
    for index, block in enumerate(main_blocks(model)):
        block.register_forward_pre_hook(lambda m, a, index=index: calls.__setitem__(index, calls[index] + 1))
    return calls


@pytest.mark.parametrize("offload", [0.0, 1.0], ids=["resident", "offloaded"])
def test_checkpoint_fraction_recomputes_only_the_chosen_blocks_and_changes_nothing_else(offload):
    runs = {}
    for setting in (False, 1.0, 0.5):
        model = _model(checkpointing=setting)
        calls = _forward_calls(model)
        losses, grads, offloader, _ = _steps(model, offload, steps=2)
        runs[setting] = losses, grads, calls, offloader
    reference_losses, reference_grads, _, _ = runs[False]
    for losses, grads, _, _ in runs.values():
        assert_same_steps(losses, grads, reference_losses, reference_grads)
    assert runs[False][2] == [2, 2, 2, 2]  # two steps, one forward each
    assert runs[1.0][2] == [4, 4, 4, 4]  # ... and a recompute each in the backward
    assert runs[0.5][2] == [4, 2, 4, 2]  # blocks 0 and 2 recompute, 1 and 3 keep their activations
    if offload:
        # a block that keeps its activations saves references to its offloaded weights, not the weights
        assert runs[0.5][3].saved_references > 0 and runs[1.0][3].saved_references == 0
        assert runs[0.5][3].loads == [4, 4, 4, 4] and runs[0.5][3].max_resident == 2


def test_checkpoint_fraction_spreads_the_recompute_and_is_checked():
    model = _model()
    assert enable_checkpointing(model, 0.5) == [0, 2]
    assert enable_checkpointing(model, 0.25) == [0] and enable_checkpointing(model, 1.0) == [0, 1, 2, 3]
    assert model.gradient_checkpointing
    with pytest.raises(ValueError, match="checkpoint fraction"):
        enable_checkpointing(model, 0.0)


# --- training jobs through the recipe ------------------------------------------------------------------------------
def _job(make_job, root, override):
    return train(load_job(make_job(override, folder=root)), progress=False)


def _metrics(result):
    return [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "extra",
    [
        {"train": {"gradient_checkpointing": True}},
        {"train": {"gradient_checkpointing": False, "dop": {"enabled": True, "class_word": "fox"}}},
    ],
    ids=["checkpointing", "dop-two-graphs"],
)
def test_offloaded_training_job_equals_the_plain_one(make_job, tmp_path, extra):
    job = {
        "train": {"steps": 3, **extra["train"]},
        "sample": {"every": 1000, "steps": 2, "prompts": ["[trigger], a fox"]},
    }
    plain = _job(make_job, tmp_path / "plain", job)
    offloaded = _job(make_job, tmp_path / "offload", {**job, "model": {"layer_offload": 1.0}})
    assert training_differences(plain, offloaded) == []  # losses, DOP losses, the LoRA and the previews
    assert ("dop_loss" in _metrics(offloaded)[-1]) == ("dop" in extra["train"])
    record = offloaded.memory["offload"]
    assert record["blocks"] == [0, 1] and record["max_resident"] <= 2
    assert record["loads"] == record["evictions"]
    # per step: a forward and a backward load (DOP: two forwards with grad, one prior without; one backward);
    # each of the two previews (step 0 and the end): 2 forwards
    per_step = 4 if "dop" in extra["train"] else 2
    assert record["loads"] == [3 * per_step + 2 * 2] * 2
    assert "layer offload: 2 of 2 blocks" in (offloaded.run_dir / "train.log").read_text()
    assert "offload" not in plain.memory


def test_the_comparison_catches_an_offloader_that_rounds_its_copies(make_job, tmp_path, monkeypatch):
    """The negative control of the test above: a plausible offloading bug (the device copies of the weights lose
    precision, here rounded through bf16) changes a run by far more than the tolerances allow."""
    job = {
        "train": {"steps": 3, "gradient_checkpointing": True},
        "sample": {"every": 1000, "steps": 2, "prompts": ["[trigger], a fox"]},
    }
    plain = _job(make_job, tmp_path / "plain", job)
    real_load = BlockOffloader.load

    def rounding_load(self, index):
        real_load(self, index)
        for t in self.tensors.get(index, []):
            if t.is_floating_point() and t.numel():
                t.data = t.data.to(torch.bfloat16).to(t.dtype)

    monkeypatch.setattr(BlockOffloader, "load", rounding_load)
    broken = _job(make_job, tmp_path / "broken", {**job, "model": {"layer_offload": 1.0}})
    problems = training_differences(plain, broken)
    assert any("LoRAs' effects differ" in p for p in problems), problems


def test_partially_checkpointed_job_equals_the_fully_checkpointed_one(make_job, tmp_path):
    job = {
        "train": {"steps": 3, "gradient_checkpointing": True},
        "sample": {"every": 1000, "steps": 2, "prompts": ["[trigger], a fox"]},
    }
    full = _job(make_job, tmp_path / "full", job)
    half = _job(make_job, tmp_path / "half", {**job, "train": {**job["train"], "checkpoint_fraction": 0.5}})
    assert training_differences(full, half) == []  # recomputed or kept activations: equal up to rounding
    assert "gradient checkpointing: 1 of 2 main blocks recompute" in (half.run_dir / "train.log").read_text()
    assert "main blocks recompute" not in (full.run_dir / "train.log").read_text()


@pytest.mark.parametrize("value", [0, -0.5, 1.5, "half"])
def test_checkpoint_fraction_outside_0_to_1_is_refused_in_one_line(make_job, value):
    from zimage_lora.errors import UserError

    with pytest.raises(UserError, match=r"train\.checkpoint_fraction") as err:
        load_job(make_job({"train": {"checkpoint_fraction": value}}))
    assert "\n" not in str(err.value)


# --- low_vram ------------------------------------------------------------------------------------------------------
def test_on_demand_component_visits_only_while_used(tiny_model_dir):
    comps = load_components(tiny_model_dir, parts=["text_encoder", "tokenizer"], low_vram=True)
    text = PromptEmbeddings(comps.tokenizer, comps.text_encoder, "cpu", low_vram=True)
    forwards = []
    comps.text_encoder.register_forward_pre_hook(
        lambda m, a, k: forwards.append(text.on_device.active), with_kwargs=True
    )
    text.cache(["a fox", "a car"])
    assert text.visits == 1 and forwards == [True, True] and not text.on_device.active
    text(["a fox"])  # cached: no visit
    assert text.visits == 1
    text(["a bird", "a fox", "a tree"])  # one visit encodes what is missing
    assert text.visits == 2 and forwards == [True] * 4 and not text.on_device.active
    nested = OnDemand(torch.nn.Linear(2, 2), "cpu", home="cpu")
    with nested.visit(), nested.visit():
        assert nested.active
    assert nested.visits == 1 and not nested.active


def test_low_vram_job_equals_the_plain_one_and_records_its_visits(make_job, tmp_path):
    job = {
        "train": {"steps": 3, "cache_text_embeddings": False},
        "sample": {"every": 2, "steps": 2, "prompts": ["[trigger], a fox"]},
    }
    plain = _job(make_job, tmp_path / "plain", job)
    low = _job(make_job, tmp_path / "low", {**job, "model": {"low_vram": True}})
    # on the CPU nothing moves, so the same kernels run on the same data: the same bytes
    assert [r["loss"] for r in _metrics(low)] == [r["loss"] for r in _metrics(plain)]
    assert low.final_lora.read_bytes() == plain.final_lora.read_bytes()
    previews = len(low.samples)
    assert previews == 3  # steps 0, 2 and the end
    # the text encoder comes for each step's captions and each preview's prompts; the VAE for the caching pass and
    # each preview's decode (on a GPU these are moves in and out; here the record is what can be checked)
    assert low.memory == {"text_encoder_visits": 3 + previews, "vae_visits": 1 + previews}
    log = (low.run_dir / "train.log").read_text()
    assert "train.cache_text_embeddings avoids that" in log


# --- on a GPU ------------------------------------------------------------------------------------------------------
@cuda_only
def test_cuda_offload_frees_device_memory_and_keeps_the_results():
    device = torch.device("cuda")
    losses, grads, _, _ = _steps(_model(device, dim=512), 0, device=device)
    model = _model(device, dim=512)
    before = torch.cuda.memory_allocated(device)
    off_losses, off_grads, offloader, _ = _steps(model, 1.0, device=device)
    frozen_bytes = sum(h.numel() * h.element_size() for homes in offloader.homes.values() for h in homes)
    assert all(h.is_pinned() for homes in offloader.homes.values() for h in homes)
    assert before - torch.cuda.memory_allocated(device) > 0.9 * frozen_bytes - 2**20  # the blocks left the GPU
    assert offloader.max_resident == 2
    torch.testing.assert_close(torch.stack(off_losses), torch.stack(losses), rtol=1e-5, atol=0)
    for ours, theirs in zip(off_grads, grads, strict=True):
        for k in ours:
            torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=1e-6)


@cuda_only
def test_cuda_low_vram_components_sit_on_the_cpu_between_uses(tiny_model_dir):
    comps = load_components(tiny_model_dir, parts=["text_encoder", "tokenizer"], device="cuda", low_vram=True)
    assert next(comps.text_encoder.parameters()).device.type == "cpu"
    text = PromptEmbeddings(comps.tokenizer, comps.text_encoder, torch.device("cuda"), low_vram=True)
    seen = []
    comps.text_encoder.register_forward_pre_hook(lambda m, a: seen.append(next(m.parameters()).device.type))
    text(["a fox"])
    assert seen == ["cuda"] and next(comps.text_encoder.parameters()).device.type == "cpu"


@cuda_only
def test_cuda_job_with_float8_offload_and_low_vram_trains_like_float8_alone(make_job, tmp_path):
    job = {
        "job": {"device": "cuda"},
        "quantization": {"transformer": "float8", "text_encoder": "float8"},
        "train": {"steps": 3, "gradient_checkpointing": True, "cache_text_embeddings": False},
        "sample": {"every": 1000, "steps": 2, "prompts": ["[trigger], a fox"]},
    }
    alone = _job(make_job, tmp_path / "alone", job)
    saver = _job(make_job, tmp_path / "saver", {**job, "model": {"layer_offload": 0.5, "low_vram": True}})
    losses, reference = [r["loss"] for r in _metrics(saver)], [r["loss"] for r in _metrics(alone)]
    assert losses == pytest.approx(reference, rel=1e-3)
    assert saver.memory["offload"]["max_resident"] <= 2 and len(saver.samples) == 2
    assert saver.memory["text_encoder_visits"] == 3 + 2


def test_out_of_memory_advice_names_the_memory_switches(make_job):
    from zimage_lora.training.recipe import out_of_memory_advice

    advice = out_of_memory_advice(load_job(make_job()), "CUDA out of memory")
    for tip in ("quantization.transformer: float8", "model.layer_offload: 0.5", "model.low_vram: true"):
        assert tip in advice, advice
    saving = {"quantization": {"transformer": "float8"}, "model": {"layer_offload": 1.0, "low_vram": True}}
    advice = out_of_memory_advice(load_job(make_job(saving)), "CUDA out of memory")
    assert "quantization.transformer: nf4" in advice and "layer_offload" not in advice and "low_vram" not in advice


def test_a_run_may_resume_with_other_memory_savers_but_not_other_weights():
    from zimage_lora.errors import UserError
    from zimage_lora.training.state import check_resumable

    saved = {"model": {"layer_offload": 0.0, "low_vram": False}, "train": {"steps": 10, "compile": False}}
    saved["quantization"] = {"transformer": "none"}
    changed = {**saved, "model": {"layer_offload": 0.5, "low_vram": True}}
    changed["train"] = {"steps": 10, "compile": True, "checkpoint_fraction": 0.5}
    check_resumable(saved, changed, 4)  # an out-of-memory run continues with more offloading
    with pytest.raises(UserError, match=r"^--resume: quantization\.transformer changed"):
        check_resumable(saved, {**changed, "quantization": {"transformer": "float8"}}, 4)
