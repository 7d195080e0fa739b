"""LoRA files: our layout written and read back byte for byte, the layouts people bring, and the ComfyUI names."""

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from zimage_lora.errors import UserError
from zimage_lora.lora.io import (
    LoraWeights,
    atomic_write_bytes,
    comfyui_target,
    parse_lora_tensors,
    read_lora,
    save_lora,
)

Q, OUT, W1 = "layers.0.attention.to_q", "layers.0.attention.to_out.0", "layers.1.feed_forward.w1"
MODULE_NAMES = [
    Q,
    "layers.0.attention.to_k",
    "layers.0.attention.to_v",
    OUT,
    W1,
    "layers.1.adaLN_modulation.0",
    "noise_refiner.0.attention.to_q",
]


def weights(rank: int = 4, fan_in: int = 8, fan_out: int = 12, alpha: float = 8.0, seed: int = 0) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    return LoraWeights(torch.randn(rank, fan_in, generator=g), torch.randn(fan_out, rank, generator=g), alpha)


def modules() -> dict[str, LoraWeights]:
    return {Q: weights(seed=0), OUT: weights(rank=2, alpha=1.0, seed=1), W1: weights(fan_out=32, alpha=0.5, seed=2)}


def header(path: Path) -> dict:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n])


# --- our layout --------------------------------------------------------------------------------------------------


DTYPES = [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)]


@pytest.mark.parametrize(("name", "dtype"), DTYPES)
def test_save_then_read_round_trips(tmp_path, name, dtype):
    path = tmp_path / "lora.safetensors"
    mods = modules()
    save_lora(path, mods, name, {"zimage.rank": "4"})

    raw = load_file(path)
    expected_keys = {f"diffusion_model.{m}.{k}" for m in mods for k in ("lora_A.weight", "lora_B.weight", "alpha")}
    assert set(raw) == expected_keys
    assert {t.dtype for t in raw.values()} == {dtype}
    assert raw[f"diffusion_model.{Q}.lora_A.weight"].shape == (4, 8)  # rank x in
    assert raw[f"diffusion_model.{Q}.lora_B.weight"].shape == (12, 4)  # out x rank
    assert raw[f"diffusion_model.{Q}.alpha"].shape == ()

    lora = read_lora(path)
    assert lora.layout == "zimage-lora"
    assert set(lora.modules) == set(mods)
    for m, w in mods.items():
        got = lora.modules[m]
        assert torch.equal(got.down, w.down.to(dtype)) and torch.equal(got.up, w.up.to(dtype))
        assert got.alpha == w.alpha and got.rank == w.rank


def test_same_inputs_give_identical_bytes(tmp_path):
    # one metadata key per field the recipe writes, and more: the header order must not depend on the process's
    # hash seed or on the dict's insertion order
    meta = {f"zimage.key_{i:02d}": f"value {i}" for i in range(12)}
    reversed_meta = dict(reversed(list(meta.items())))
    save_lora(tmp_path / "a.safetensors", modules(), "bf16", meta)
    for i in range(5):
        save_lora(tmp_path / f"b{i}.safetensors", modules(), "bf16", reversed_meta if i % 2 else meta)
        assert (tmp_path / f"b{i}.safetensors").read_bytes() == (tmp_path / "a.safetensors").read_bytes(), i


def test_same_inputs_give_identical_bytes_with_one_metadata_key(tmp_path):
    save_lora(tmp_path / "a.safetensors", modules(), "fp16", {"k": "v"})
    save_lora(tmp_path / "b.safetensors", modules(), "fp16", {"k": "v"})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_metadata_is_readable_by_safetensors(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_lora(path, modules(), "bf16", {"zimage.trigger": "ohwx", "zimage.rank": 4, "ss_network_alpha": 8.0})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"zimage.trigger": "ohwx", "zimage.rank": "4", "ss_network_alpha": "8.0"}
    assert read_lora(path).metadata == {"zimage.trigger": "ohwx", "zimage.rank": "4", "ss_network_alpha": "8.0"}


def test_weights_with_grad_or_non_contiguous_are_saved(tmp_path):
    w = LoraWeights(torch.randn(2, 4, requires_grad=True), torch.randn(4, 2).t().contiguous().t(), 2.0)
    save_lora(tmp_path / "x.safetensors", {Q: w}, torch.float32, {})
    got = read_lora(tmp_path / "x.safetensors").modules[Q]
    assert torch.equal(got.down, w.down.detach()) and torch.equal(got.up, w.up)


def test_atomic_write_replaces_the_whole_file_and_leaves_no_tmp(tmp_path):
    path = tmp_path / "out.safetensors"
    atomic_write_bytes(path, b"x" * 10_000)
    atomic_write_bytes(path, b"short")
    assert path.read_bytes() == b"short"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_atomic_write_overwrites_a_stale_tmp_from_a_crash(tmp_path):
    path = tmp_path / "out.bin"
    (tmp_path / "out.bin.tmp").write_bytes(b"half of an old write" * 100)
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_save_lora_leaves_no_tmp(tmp_path):
    save_lora(tmp_path / "a.safetensors", modules(), "bf16", {})
    save_lora(tmp_path / "a.safetensors", {Q: weights()}, "bf16", {})
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]
    assert set(read_lora(tmp_path / "a.safetensors").modules) == {Q}


# --- delta -------------------------------------------------------------------------------------------------------


def test_delta_is_alpha_over_rank_times_b_a():
    w = weights(rank=4, fan_in=3, fan_out=5, alpha=2.0)
    expected = torch.zeros(5, 3)
    for r in range(4):  # the sum of rank-one updates
        expected += torch.outer(w.up[:, r], w.down[r])
    assert w.rank == 4 and w.scale == 0.5
    assert torch.allclose(w.delta(), 0.5 * expected, atol=1e-6)
    half = LoraWeights(w.down.bfloat16(), w.up.bfloat16(), 2.0)
    assert half.delta().dtype == torch.float32


# --- other layouts -----------------------------------------------------------------------------------------------


def peft_tensors(prefix: str, infix: str = "", alpha: bool = False) -> dict[str, torch.Tensor]:
    w = weights()
    out = {f"{prefix}{Q}.lora_A{infix}.weight": w.down, f"{prefix}{Q}.lora_B{infix}.weight": w.up}
    if alpha:
        out[f"{prefix}{Q}.alpha"] = torch.tensor(16.0)
    return out


@pytest.mark.parametrize("prefix", ["transformer.", "base_model.model.", "model.diffusion_model."])
def test_diffusers_and_peft_prefixes_are_read_with_alpha_equal_to_rank(prefix):
    mods, layout = parse_lora_tensors(peft_tensors(prefix))
    assert layout == "diffusers"
    assert list(mods) == [Q]
    assert mods[Q].alpha == 4.0 and mods[Q].scale == 1.0
    assert torch.equal(mods[Q].down, weights().down) and torch.equal(mods[Q].up, weights().up)


def test_alpha_next_to_a_diffusers_prefix_is_kept():
    mods, _ = parse_lora_tensors(peft_tensors("transformer.", alpha=True))
    assert mods[Q].alpha == 16.0


def test_peft_state_dict_with_the_adapter_name_is_read():
    # PeftModel.state_dict() names LoRA weights `<path>.lora_A.default.weight` (`default` is the adapter name)
    mods, layout = parse_lora_tensors(peft_tensors("base_model.model.", infix=".default"))
    assert layout == "diffusers"
    assert list(mods) == [Q]
    assert torch.equal(mods[Q].down, weights().down) and mods[Q].alpha == 4.0


def test_a_real_peft_model_state_dict_is_read():
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q = torch.nn.Linear(8, 8)
            self.to_out = torch.nn.ModuleList([torch.nn.Linear(8, 8)])

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = Attention()

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Block()])

    torch.manual_seed(0)
    model = get_peft_model(Model(), LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_out.0"]))
    saved = get_peft_model_state_dict(model)  # what peft writes to adapter_model.safetensors
    mods, _ = parse_lora_tensors(saved)
    assert set(mods) == {Q, OUT}
    full = {k: v for k, v in model.state_dict().items() if ".lora_" in k}  # what torch.save(model.state_dict()) has
    mods_full, _ = parse_lora_tensors(full)
    assert set(mods_full) == {Q, OUT}
    for m in (Q, OUT):
        assert torch.equal(mods_full[m].down, mods[m].down) and torch.equal(mods_full[m].up, mods[m].up)


def test_kohya_keys_map_back_through_the_models_module_names():
    w = weights()
    tensors = {
        "lora_unet_layers_0_attention_to_q.lora_down.weight": w.down,
        "lora_unet_layers_0_attention_to_q.lora_up.weight": w.up,
        "lora_unet_layers_0_attention_to_q.alpha": torch.tensor(2.0),
        "lora_unet_layers_0_attention_to_out_0.lora_down.weight": w.down,
        "lora_unet_layers_0_attention_to_out_0.lora_up.weight": w.up,
    }
    mods, layout = parse_lora_tensors(tensors, module_names=MODULE_NAMES)
    assert layout == "kohya"
    assert set(mods) == {Q, OUT}
    assert mods[Q].alpha == 2.0 and mods[OUT].alpha == 4.0
    assert torch.equal(mods[Q].down, w.down) and torch.equal(mods[Q].up, w.up)


def test_kohya_keys_need_the_module_names():
    w = weights()
    tensors = {"lora_unet_layers_0_attention_to_q.lora_down.weight": w.down}
    tensors["lora_unet_layers_0_attention_to_q.lora_up.weight"] = w.up
    with pytest.raises(UserError, match="kohya"):
        parse_lora_tensors(tensors)
    with pytest.raises(UserError, match="lora_unet_layers_9_attention_to_q"):
        parse_lora_tensors({k.replace("layers_0", "layers_9"): v for k, v in tensors.items()}, MODULE_NAMES)


def test_kohya_file_is_read_from_disk(tmp_path):
    w = weights()
    path = tmp_path / "kohya.safetensors"
    save_file(
        {
            "lora_unet_layers_1_feed_forward_w1.lora_down.weight": w.down,
            "lora_unet_layers_1_feed_forward_w1.lora_up.weight": w.up,
        },
        path,
    )
    lora = read_lora(path, module_names=MODULE_NAMES)
    assert lora.layout == "kohya" and set(lora.modules) == {W1}
    with pytest.raises(UserError, match="kohya"):
        read_lora(path)


def test_module_with_a_but_no_b_is_rejected():
    w = weights()
    with pytest.raises(UserError, match=rf"{Q}.*lora_B"):
        parse_lora_tensors({f"diffusion_model.{Q}.lora_A.weight": w.down})
    with pytest.raises(UserError, match=rf"{Q}.*lora_A"):
        parse_lora_tensors({f"diffusion_model.{Q}.lora_B.weight": w.up, f"diffusion_model.{Q}.alpha": torch.ones(())})


@pytest.mark.parametrize(
    ("down", "up"),
    [((4, 8), (12, 3)), ((4, 8, 1, 1), (12, 4, 1, 1)), ((4,), (12, 4))],
)
def test_mismatched_shapes_are_rejected(down, up):
    tensors = {f"diffusion_model.{Q}.lora_A.weight": torch.zeros(down)}
    tensors[f"diffusion_model.{Q}.lora_B.weight"] = torch.zeros(up)
    with pytest.raises(UserError, match="mismatched shapes"):
        parse_lora_tensors(tensors)


@pytest.mark.parametrize(
    "extra",
    [
        "lora_unet_layers_0_attention_to_q.dora_scale",
        "lora_unet_layers_0_attention_to_q.lokr_w1",
        "lora_unet_layers_0_attention_to_q.hada_w1_a",
    ],
)
def test_dora_and_lycoris_files_are_rejected_by_name(extra):
    w = weights()
    tensors = {
        "lora_unet_layers_0_attention_to_q.lora_down.weight": w.down,
        "lora_unet_layers_0_attention_to_q.lora_up.weight": w.up,
        extra: torch.zeros(12, 1),
    }
    with pytest.raises(UserError, match="DoRA/LoKr"):
        parse_lora_tensors(tensors, MODULE_NAMES)


def test_peft_dora_magnitude_is_rejected():
    tensors = peft_tensors("transformer.")
    tensors[f"transformer.{Q}.lora_magnitude_vector"] = torch.ones(12)
    with pytest.raises(UserError, match="lora_magnitude_vector"):
        parse_lora_tensors(tensors)


def test_unknown_or_empty_contents_are_rejected():
    with pytest.raises(UserError, match="no tensors"):
        parse_lora_tensors({})
    with pytest.raises(UserError, match="unexpected key"):
        parse_lora_tensors({"diffusion_model.layers.0.attention.to_q.weight": torch.zeros(2, 2)})


def test_a_file_that_is_not_safetensors_is_a_user_error(tmp_path):
    bad = tmp_path / "lora.safetensors"
    bad.write_bytes(b"\x00" * 3 + b"this is a pickle, not a safetensors file" * 10)
    with pytest.raises(UserError, match="lora.safetensors"):
        read_lora(bad)
    with pytest.raises(UserError, match="not found"):
        read_lora(tmp_path / "missing.safetensors")


def test_a_truncated_file_is_a_user_error(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_lora(path, modules(), "bf16", {})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(UserError, match="lora.safetensors"):
        read_lora(path)


# --- ComfyUI names -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", ["layers.0", "layers.29", "noise_refiner.1", "context_refiner.0"])
def test_attention_maps_to_the_fused_qkv_rows(block):
    dim = 3840
    assert comfyui_target(f"{block}.attention.to_q", dim) == (f"diffusion_model.{block}.attention.qkv", (0, dim))
    assert comfyui_target(f"{block}.attention.to_k", dim) == (f"diffusion_model.{block}.attention.qkv", (dim, 2 * dim))
    assert comfyui_target(f"{block}.attention.to_v", dim) == (
        f"diffusion_model.{block}.attention.qkv",
        (2 * dim, 3 * dim),
    )
    assert comfyui_target(f"{block}.attention.to_out.0", dim) == (f"diffusion_model.{block}.attention.out", None)


@pytest.mark.parametrize("block", ["layers.3", "noise_refiner.0", "context_refiner.1"])
def test_feed_forward_and_modulation_keep_their_names(block):
    for w in ("w1", "w2", "w3"):
        assert comfyui_target(f"{block}.feed_forward.{w}", 64) == (f"diffusion_model.{block}.feed_forward.{w}", None)
    assert comfyui_target(f"{block}.adaLN_modulation.0", 64) == (f"diffusion_model.{block}.adaLN_modulation.0", None)


@pytest.mark.parametrize(
    "path",
    [
        "cap_embedder.1",
        "t_embedder.mlp.0",
        "all_final_layer.2-1.adaLN_modulation.1",
        "layers.0.attention.to_q.lora_A",
        "layers.0.attention.norm_q",
        "layers.0.feed_forward.w4",
        "blocks.0.attention.to_q",
    ],
)
def test_non_block_paths_have_no_comfyui_target(path):
    assert comfyui_target(path, 64) is None
