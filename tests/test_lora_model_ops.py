"""``lora extract`` and ``lora bake`` on the tiny model's real weights.

The inputs are made here, by hand: a tuned transformer = base + known random updates of known rank, LoRA and LoKr
files in their raw key layouts, and ComfyUI single files whose ``attention.qkv`` is to_q, to_k and to_v stacked along
the rows (with ``attention.out``, ``q_norm``/``k_norm``, ``x_embedder``, ``final_layer.*`` named as ComfyUI's
comfy/ldm/lumina/model.py names them). Expected values are computed here independently (``torch.linalg.svdvals``,
``alpha / rank * B @ A``, ``torch.kron``), never by the code under test.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file, save_file
from test_train_e2e import forward, transformer_inputs

from zimage_lora.errors import UserError
from zimage_lora.lora.io import serialize_safetensors
from zimage_lora.lora.model_ops import bake_loras, extract_lora, open_model

RANK = 3
UPDATED = {  # Linear layers the tuned model changes, inside and outside the blocks, and the rank of each change
    "layers.0.attention.to_q": 3,
    "layers.1.attention.to_v": 3,
    "layers.1.feed_forward.w2": 3,
    "layers.0.feed_forward.w3": 1,  # one row changed: a difference of lower rank than asked for
    "noise_refiner.0.adaLN_modulation.0": 3,
    "context_refiner.0.attention.to_out.0": 3,
    "all_x_embedder.2-1": 3,
    "all_final_layer.2-1.linear": 3,
}
NOT_LINEAR = ["layers.0.attention_norm1.weight", "all_x_embedder.2-1.bias"]  # changed too: no LoRA holds them


def state_of(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")


def write_folder(folder, config_from, state):
    (folder / "transformer").mkdir(parents=True)
    shutil.copy(config_from / "transformer" / "config.json", folder / "transformer" / "config.json")
    save_file(state, folder / "transformer" / "diffusion_pytorch_model.safetensors")
    return folder


def comfy_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """ComfyUI's native names, written here by hand: q/k/v stacked into qkv, the few renamed modules."""
    out = {}
    for key, value in state.items():
        m = re.match(r"^(.+)\.attention\.to_([qkv])\.weight$", key)
        if m:
            if m.group(2) == "q":
                block = m.group(1)
                fused = [state[f"{block}.attention.to_{x}.weight"] for x in "qkv"]
                out[f"{prefix}{block}.attention.qkv.weight"] = torch.cat(fused)
            continue
        name = key.replace(".attention.to_out.0.", ".attention.out.")
        name = name.replace(".attention.norm_q.", ".attention.q_norm.")
        name = name.replace(".attention.norm_k.", ".attention.k_norm.")
        name = re.sub(r"^all_x_embedder\.2-1\.", "x_embedder.", name)
        name = re.sub(r"^all_final_layer\.2-1\.", "final_layer.", name)
        out[prefix + name] = value
    return out


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_model_dir):
    """(folder, the update of each changed layer); stored in float32, so the difference read back is the update up
    to float32 rounding."""
    g = torch.Generator().manual_seed(11)
    state = state_of(tiny_model_dir)
    updates = {}
    for path, rank in UPDATED.items():
        out, inp = state[f"{path}.weight"].shape
        update = torch.randn(out, RANK, generator=g) @ torch.randn(RANK, inp, generator=g) * 0.05
        if rank == 1:
            update = torch.zeros(out, inp).index_copy(0, torch.tensor([5]), update[5:6])
        state[f"{path}.weight"] = state[f"{path}.weight"] + update
        updates[path] = update
    for key in NOT_LINEAR:
        state[key] = state[key] + 0.01
    return write_folder(tmp_path_factory.mktemp("tuned") / "model", tiny_model_dir, state), updates


def file_updates(path) -> dict[str, torch.Tensor]:
    """Each module's alpha / rank * B @ A, read straight from a zimage-lora file."""
    raw = load_file(path)
    out = {}
    for key in raw:
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("diffusion_model.").removesuffix(".lora_A.weight")
            down, up = raw[key].double(), raw[f"diffusion_model.{module}.lora_B.weight"].double()
            out[module] = float(raw[f"diffusion_model.{module}.alpha"]) / down.shape[0] * up @ down
    return out


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# --- extract --------------------------------------------------------------------------------------------------------


def test_extract_recovers_a_known_rank_update_exactly(tiny_model_dir, tuned, tmp_path):
    folder, updates = tuned
    out = tmp_path / "extracted.safetensors"
    result = extract_lora(tiny_model_dir, folder, out, rank=RANK, dtype="fp32")
    found = file_updates(out)
    assert sorted(found) == sorted(UPDATED)
    for path, update in updates.items():
        assert relative(found[path], update) < 1e-5, path
    assert {f.path: f.rank for f in result.fits} == UPDATED
    assert result.energy == pytest.approx(1.0, abs=1e-9)
    assert result.worst.error < 1e-5
    assert sorted(result.not_representable) == sorted(NOT_LINEAR)
    assert result.unchanged == 37 - len(UPDATED)  # the tiny model's other Linear layers

    # a rank above a layer's width gives at most that width (float32 rounding fills the directions past the
    # update's); the one-row change, exactly rank 1, stays rank 1
    ranks = {f.path: f.rank for f in extract_lora(tiny_model_dir, folder, out, rank=100, dtype="fp32").fits}
    assert RANK < ranks["all_x_embedder.2-1"] <= 64 and ranks["layers.0.feed_forward.w3"] == 1


def test_extract_at_rank_1_states_the_energy_of_the_top_singular_value(tiny_model_dir, tuned, tmp_path):
    folder, _ = tuned
    base, tuned_state = state_of(tiny_model_dir), state_of(folder)
    result = extract_lora(tiny_model_dir, folder, tmp_path / "r1.safetensors", rank=1, dtype="fp32")
    kept = total = 0.0
    for fit in result.fits:
        s = torch.linalg.svdvals(tuned_state[f"{fit.path}.weight"].double() - base[f"{fit.path}.weight"].double())
        expected = float(s[0] ** 2 / (s**2).sum())
        assert fit.rank == 1 and fit.energy == pytest.approx(expected, rel=1e-9), fit.path
        assert fit.error == pytest.approx((1 - expected) ** 0.5, rel=1e-4, abs=1e-6)  # the rest, as a norm
        kept, total = kept + float(s[0] ** 2), total + float((s**2).sum())
    assert result.energy == pytest.approx(kept / total, rel=1e-9) and result.energy < 0.9


def test_extract_from_comfyui_single_files_equals_extract_from_the_folders(tiny_model_dir, tuned, tmp_path):
    folder, _ = tuned
    base_file, tuned_file = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"
    save_file(comfy_state(state_of(tiny_model_dir), "diffusion_model."), base_file)
    unused = {"norm_final.weight": torch.ones(64)}  # Lumina 2's leftover that some ComfyUI files carry
    save_file({**comfy_state(state_of(folder), ""), **unused}, tuned_file)
    config = json.loads((tiny_model_dir / "transformer" / "config.json").read_text())
    inferred = open_model(base_file).config  # a ComfyUI file has no configuration: its shapes give it
    assert {k: inferred.get(k) for k in config if not k.startswith("_")} == {
        k: v for k, v in config.items() if not k.startswith("_")
    }
    from_folders = extract_lora(tiny_model_dir, folder, tmp_path / "a.safetensors", rank=2, dtype="fp32")
    from_files = extract_lora(base_file, tuned_file, tmp_path / "b.safetensors", rank=2, dtype="fp32")
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert [f.energy for f in from_folders.fits] == [f.energy for f in from_files.fits]
    assert sorted(from_files.not_representable) == sorted(NOT_LINEAR)


def test_extract_on_the_command_line(tiny_model_dir, tuned, tmp_path):
    folder, updates = tuned
    out = tmp_path / "kohya.safetensors"
    proc = run_cli(
        "lora", "extract", "--base", tiny_model_dir, "--tuned", folder, "-o", out, "--rank", "3", "--dtype", "fp32",
        "--to", "kohya",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert sum("energy kept 1.000000" in line for line in lines) == len(UPDATED) + 1  # each module, then overall
    assert any(line.startswith(f"{out}: kohya, {len(UPDATED)} modules, rank 1-3") for line in lines)
    assert any(line.strip().startswith("2 tensors differ that are not Linear weights") for line in lines)
    raw, key = load_file(out), "lora_unet_layers_0_attention_to_q"
    delta = float(raw[f"{key}.alpha"]) / 3 * raw[f"{key}.lora_up.weight"] @ raw[f"{key}.lora_down.weight"]
    assert relative(delta, updates["layers.0.attention.to_q"]) < 1e-5


# --- bake -----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_model_dir):
    """A LoRA (our layout, alpha != rank) and a LoKr (LyCORIS layout, no alpha: scale 1), with their dense updates."""
    root = tmp_path_factory.mktemp("loras")
    shapes = {k: v.shape for k, v in state_of(tiny_model_dir).items()}
    g = torch.Generator().manual_seed(5)
    lora, lora_delta = {}, {}
    for path in ["layers.0.attention.to_q", "layers.0.attention.to_k", "layers.1.feed_forward.w1", "all_x_embedder.2-1",
                 "layers.0.adaLN_modulation.0", "context_refiner.0.attention.to_out.0"]:  # fmt: skip
        out, inp = shapes[f"{path}.weight"]
        down, up = torch.randn(4, inp, generator=g) * 0.1, torch.randn(out, 4, generator=g) * 0.1
        lora |= {f"diffusion_model.{path}.lora_A.weight": down, f"diffusion_model.{path}.lora_B.weight": up,
                 f"diffusion_model.{path}.alpha": torch.tensor(6.0)}  # fmt: skip
        lora_delta[path] = 6.0 / 4 * up.double() @ down.double()
    lokr, lokr_delta = {}, {}
    for path, (w1, w2) in {
        "layers.0.attention.to_q": ((8, 8), (8, 8)),
        "layers.1.feed_forward.w2": ((8, 10), (8, 17)),
    }.items():
        a, b = torch.randn(*w1, generator=g) * 0.1, torch.randn(*w2, generator=g) * 0.1
        lokr |= {f"diffusion_model.{path}.lokr_w1": a, f"diffusion_model.{path}.lokr_w2": b}
        lokr_delta[path] = torch.kron(a.double(), b.double())
    save_file(lora, root / "lora.safetensors")
    save_file(lokr, root / "lokr.safetensors")
    return (root / "lora.safetensors", lora_delta), (root / "lokr.safetensors", lokr_delta)


def test_bake_into_a_diffusers_folder_gives_the_model_with_the_lora_applied(tiny_model_dir, loras, tmp_path):
    from diffusers import ZImageTransformer2DModel

    (path, deltas), _ = loras
    out = tmp_path / "baked"
    result = bake_loras(tiny_model_dir, [(path, 0.7)], out, dtype="fp32")
    assert result.layout == "diffusers" and result.changed == len(deltas)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert not list(tmp_path.glob(".*"))  # the temporary folder was renamed, nothing left beside
    baked = ZImageTransformer2DModel.from_pretrained(out).eval()
    expected = ZImageTransformer2DModel.from_pretrained(tiny_model_dir, subfolder="transformer").eval()
    layers = dict(expected.named_modules())
    with torch.no_grad():
        for module, delta in deltas.items():
            layers[module].weight += 0.7 * delta.float()
    inputs = transformer_inputs(expected)
    assert (forward(baked, inputs) - forward(expected, inputs)).abs().max() < 1e-5
    base = ZImageTransformer2DModel.from_pretrained(tiny_model_dir, subfolder="transformer").eval()
    assert (forward(base, inputs) - forward(expected, inputs)).abs().max() > 1e-2  # the LoRA does change the output


def test_two_loras_add_up_and_the_comfyui_file_fuses_qkv(tiny_model_dir, loras, tmp_path):
    (lora, lora_delta), (lokr, lokr_delta) = loras
    inputs = [(lora, 0.7), (lokr, 0.5)]
    bake_loras(tiny_model_dir, inputs, tmp_path / "folder", dtype="fp32")
    base, baked = state_of(tiny_model_dir), load_file(tmp_path / "folder" / "diffusion_pytorch_model.safetensors")
    for key in base:
        module = key.removesuffix(".weight")
        expected = base[key].double() + 0.7 * lora_delta.get(module, 0) + 0.5 * lokr_delta.get(module, 0)
        assert (baked[key].double() - expected).abs().max() < 1e-6, key

    comfy = tmp_path / "baked.safetensors"  # bf16, ComfyUI's names: rounded once from the float32 sum
    result = bake_loras(tiny_model_dir, inputs, comfy, dtype="bf16")
    assert result.layout == "comfyui" and result.changed == 7
    raw = load_file(comfy)
    assert all(k.startswith("diffusion_model.") for k in raw) and not any("to_q" in k for k in raw)
    fused = torch.cat([baked[f"layers.0.attention.to_{x}.weight"] for x in "qkv"]).to(torch.bfloat16)
    assert torch.equal(raw["diffusion_model.layers.0.attention.qkv.weight"], fused)
    assert torch.equal(raw["diffusion_model.x_embedder.weight"], baked["all_x_embedder.2-1.weight"].bfloat16())
    out = baked["layers.0.attention.to_out.0.weight"].bfloat16()
    assert torch.equal(raw["diffusion_model.layers.0.attention.out.weight"], out)
    assert raw.keys() == comfy_state(baked, "diffusion_model.").keys()
    back = open_model(comfy)  # and it reads back as the same transformer
    assert all(torch.equal(back.read(k), baked[k].bfloat16()) for k in baked)
    metadata = {
        "zimage_lora.base_model": str(tiny_model_dir),
        "zimage_lora.baked": "lora.safetensors:0.7, lokr.safetensors:0.5",
    }
    assert comfy.read_bytes() == serialize_safetensors(raw, metadata)  # the same bytes as the one-piece writer

    again = tmp_path / "again"  # a ComfyUI file is a model too: baked again into a folder
    bake_loras(comfy, [(lora, 0.0)], again, dtype="bf16")
    assert json.loads((again / "config.json").read_text())["axes_dims"] == [8, 12, 12]
    again_state = comfy_state(load_file(again / "diffusion_pytorch_model.safetensors"), "diffusion_model.")
    assert again_state.keys() == raw.keys() and all(torch.equal(v, raw[k]) for k, v in again_state.items())


def test_a_dora_baked_twice_takes_each_delta_against_the_original_weight(tiny_model_dir, tmp_path):
    """peft's DoRA: W' = m * (W + s B A) / ||W + s B A|| (norm of each output row); its delta depends on W."""
    g = torch.Generator().manual_seed(9)
    path = "layers.1.attention.to_k"
    weight = state_of(tiny_model_dir)[f"{path}.weight"].double()
    down, up = torch.randn(2, 64, generator=g) * 0.1, torch.randn(64, 2, generator=g) * 0.1
    magnitude = weight.norm(dim=1) * (1 + 0.1 * torch.rand(64, generator=g, dtype=torch.float64))
    dora = tmp_path / "dora.safetensors"
    save_file({f"diffusion_model.{path}.lora_A.weight": down, f"diffusion_model.{path}.lora_B.weight": up,
               f"diffusion_model.{path}.alpha": torch.tensor(4.0),
               f"diffusion_model.{path}.dora_magnitude": magnitude.float()}, dora)  # fmt: skip
    directed = weight + 4.0 / 2 * up.double() @ down.double()
    delta = magnitude.float().double()[:, None] * directed / directed.norm(dim=1, keepdim=True) - weight
    bake_loras(tiny_model_dir, [(dora, 0.5), (dora, 0.25)], tmp_path / "baked", dtype="fp32")
    baked = load_file(tmp_path / "baked" / "diffusion_pytorch_model.safetensors")[f"{path}.weight"]
    assert (baked.double() - (weight + 0.75 * delta)).abs().max() < 1e-6


# --- mistakes -------------------------------------------------------------------------------------------------------


def test_bad_inputs_are_one_sentence_and_nothing_is_written(tiny_model_dir, tuned, loras, tmp_path):
    from zimage_lora.models.tiny import small_transformer

    small = tmp_path / "small"
    small_transformer(dim=32, layers=2, heads=1, caption_dim=32, axes_dims=(8, 12, 12)).save_pretrained(small)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 64),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 4)}, foreign)  # fmt: skip
    (lora, _), _ = loras
    out, folder = tmp_path / "out.safetensors", tmp_path / "out"
    cases = [
        (lambda: extract_lora(tiny_model_dir, small, out, rank=2), "the two models differ in shape"),
        (lambda: extract_lora(tiny_model_dir, tmp_path / "nowhere", out, rank=2), "no such file or folder"),
        (lambda: extract_lora(tiny_model_dir, tiny_model_dir, out, rank=2), "there is no LoRA to extract"),
        (lambda: extract_lora(tiny_model_dir, lora, out, rank=2), "holds no Z-Image transformer"),
        (lambda: bake_loras(tiny_model_dir, [(foreign, 1.0)], folder), "not a LoRA for this transformer"),
        (lambda: bake_loras(tiny_model_dir, [(tmp_path / "missing.safetensors", 1.0)], out), "not found"),
        (lambda: bake_loras(small, [(lora, 1.0)], out), "another model size"),
    ]
    for call, message in cases:
        with pytest.raises(UserError, match=message) as caught:
            call()
        assert "\n" not in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.safetensors", "small"]

    proc = run_cli("lora", "bake", tiny_model_dir, foreign, f"{lora}:0.5", "-o", folder)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "not a LoRA for this transformer" in proc.stderr and "Traceback" not in proc.stderr
    assert not folder.exists()
