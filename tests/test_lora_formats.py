"""LoRA files in every tool's layout: read, written, converted, inspected, on the tiny model's real layers.

The ComfyUI counts below are written by hand from its key rules at Comfy-Org/ComfyUI comfy/lora.py @17358c8f and
comfy/utils.py @09708eae (see ``zimage_lora.lora.loaders``): diffusers names are taken as ``diffusion_model.D``,
``transformer.D``, ``lycoris_D`` or bare ``D`` with the lora_A/B, lora_down/up or lora_A/B.default pairs;
ComfyUI's own names (fused ``attention.qkv``, ``attention.out``, ``x_embedder``, ``final_layer.*``) as
``diffusion_model.P`` or ``lora_unet_P``. The tiny model has 2 main blocks and 1 refiner of each kind: 37 Linear
layers (8 per main block and noise refiner, 7 in the context refiner, 6 outside the blocks).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli
from safetensors.torch import load_file

from zimage_lora.errors import UserError
from zimage_lora.lora.formats import (
    FORMATS,
    format_tensors,
    largest_difference,
    module_updates,
    read_network_file,
    transformer_names,
)
from zimage_lora.lora.io import read_safetensors, serialize_safetensors
from zimage_lora.lora.tools import convert_lora, inspect_lora
from zimage_lora.lora.variants import NetworkFile


@pytest.fixture(scope="module")
def names(tiny_model_dir):
    return transformer_names(tiny_model_dir)


@pytest.fixture(scope="module")
def network(names) -> NetworkFile:
    """A LoRA on every Linear layer of the tiny model, ranks 1-4 and alpha != rank (so folding the scale counts)."""
    g = torch.Generator().manual_seed(3)
    modules = {}
    for i, (path, (out, inp)) in enumerate(sorted(names.linears.items())):
        rank = 1 + i % 4
        modules[path] = {
            "lora_A.weight": torch.randn(rank, inp, generator=g) / inp**0.5,
            "lora_B.weight": torch.randn(out, rank, generator=g) * 0.1,
            "alpha": torch.tensor(0.5 * rank + 1.0),
        }
    return NetworkFile("lora", modules, {"zimage_lora.trigger_word": "zfox", "zimage_lora.step": "250"})


def write(path, tensors, metadata=None):
    path.write_bytes(serialize_safetensors(tensors, metadata or {}))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory, network):
    """The same LoRA in each format's layout."""
    root = tmp_path_factory.mktemp("formats")
    return {fmt: write(root / f"{fmt}.safetensors", format_tensors(network, fmt), network.metadata) for fmt in FORMATS}


def test_every_format_reads_back_and_converts_to_every_other_exactly(files, network, names, tmp_path):
    original = module_updates(network)
    assert len(original) == 37
    for source, path in files.items():
        tensors, meta = read_safetensors(path)
        read, fmt = read_network_file(tensors, meta, list(names.linears))
        assert fmt == source
        assert largest_difference(original, module_updates(read))[0] < 1e-6, source
        for target in FORMATS:
            out = tmp_path / f"{source}_to_{target}.safetensors"
            convert_lora(path, out, target, "fp32", names)
            again, found = read_network_file(*read_safetensors(out), list(names.linears))
            assert found == target
            worst, where = largest_difference(original, module_updates(again))
            assert worst < 1e-6, (source, target, where, worst)


def test_the_layouts_are_the_tools_layouts(files):
    """A few keys of each file, as each tool writes them (the scale folded into B where the layout has no alpha)."""
    keys = {fmt: set(load_file(path)) for fmt, path in files.items()}
    q = "layers.0.attention.to_q"
    assert {f"diffusion_model.{q}.lora_A.weight", f"diffusion_model.{q}.alpha"} <= keys["zimage-lora"]
    assert f"diffusion_model.{q}.lora_B.weight" in keys["ai-toolkit"] and not any(
        k.endswith(".alpha") for k in keys["ai-toolkit"]
    )
    assert f"transformer.{q}.lora_A.weight" in keys["diffusers"]
    assert {"lora_unet_layers_0_attention_to_q.lora_down.weight", "lora_unet_layers_0_attention_to_q.alpha"} <= keys[
        "kohya"
    ]
    assert f"{q}.lora_A.default.weight" in keys["diffsynth"]
    comfy = keys["comfyui"]
    assert "diffusion_model.layers.0.attention.qkv.lora_A.weight" in comfy and not any("to_q" in k for k in comfy)
    assert {"diffusion_model.layers.0.attention.out.alpha", "diffusion_model.x_embedder.lora_B.weight"} <= comfy
    assert "diffusion_model.final_layer.adaLN_modulation.1.lora_A.weight" in comfy


def test_the_fused_qkv_file_gives_the_attention_of_the_separate_one(files, network, tiny_model_dir):
    """ComfyUI's weight: q, k and v stacked into one; the fused LoRA's update added to it (read straight from the
    file, not through our reader) gives the same q, k, v and attention output as the three separate updates."""
    from diffusers import ZImageTransformer2DModel

    model = ZImageTransformer2DModel.from_pretrained(tiny_model_dir, subfolder="transformer")
    attention = model.layers[0].attention
    fused_weight = torch.cat([attention.to_q.weight, attention.to_k.weight, attention.to_v.weight]).detach()
    raw = load_file(files["comfyui"])
    prefix = "diffusion_model.layers.0.attention.qkv"
    down, up, alpha = raw[f"{prefix}.lora_A.weight"], raw[f"{prefix}.lora_B.weight"], raw[f"{prefix}.alpha"]
    assert down.shape[0] == sum(network.modules[f"layers.0.attention.to_{x}"]["lora_A.weight"].shape[0] for x in "qkv")
    fused = fused_weight + float(alpha) / down.shape[0] * up @ down
    separate = {
        x: getattr(attention, f"to_{x}").weight.detach() + module_updates(network)[f"layers.0.attention.to_{x}"].float()
        for x in "qkv"
    }
    x = torch.randn(2, 7, fused_weight.shape[1], generator=torch.Generator().manual_seed(0))
    q, k, v = (x @ fused.T).chunk(3, dim=-1)
    assert torch.allclose(q, x @ separate["q"].T, atol=1e-5) and torch.allclose(v, x @ separate["v"].T, atol=1e-5)

    def attend(q, k, v):
        heads = model.config.n_heads
        split = [t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v)]
        return F.scaled_dot_product_attention(*split)

    expected = attend(x @ separate["q"].T, x @ separate["k"].T, x @ separate["v"].T)
    assert (attend(q, k, v) - expected).abs().max() < 1e-5


def test_a_dense_fused_qkv_lora_reads_as_its_three_slices(names):
    """A LoRA trained on ComfyUI's fused weight (not block-diagonal): each projection gets its rows of the update."""
    g = torch.Generator().manual_seed(5)
    out, inp = names.linears["layers.1.attention.to_q"]
    down, up = torch.randn(6, inp, generator=g), torch.randn(3 * out, 6, generator=g)
    prefix = "diffusion_model.layers.1.attention.qkv"
    tensors = {f"{prefix}.lora_A.weight": down, f"{prefix}.lora_B.weight": up, f"{prefix}.alpha": torch.tensor(3.0)}
    network, fmt = read_network_file(tensors, {}, list(names.linears))
    assert fmt == "comfyui" and sorted(network.modules) == [f"layers.1.attention.to_{x}" for x in "kqv"]
    full = 0.5 * up.double() @ down.double()
    for i, x in enumerate("qkv"):
        assert torch.allclose(module_updates(network)[f"layers.1.attention.to_{x}"], full[i * out : (i + 1) * out])


def test_diffusers_loads_each_format_it_reads_as_we_do(files, network, tiny_model_dir):
    from diffusers import ZImagePipeline
    from test_train_e2e import forward, transformer_inputs

    pipe = ZImagePipeline.from_pretrained(str(tiny_model_dir), torch_dtype=torch.float32)
    inputs = transformer_inputs(pipe.transformer)
    base = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters()}
    merged = ZImagePipeline.from_pretrained(str(tiny_model_dir), torch_dtype=torch.float32).transformer
    layers = dict(merged.named_modules())
    with torch.no_grad():
        for path, delta in module_updates(network).items():
            layers[path].weight += delta.float()
    expected = forward(merged, inputs)
    for fmt, path in files.items():
        if fmt == "comfyui":  # diffusers 0.42.1 cannot convert ComfyUI's alpha keys on attention.out: it refuses
            with pytest.raises(ValueError):
                pipe.load_lora_weights(str(path), adapter_name=fmt)
            continue
        pipe.load_lora_weights(str(path), adapter_name=fmt)
        assert (forward(pipe.transformer, inputs) - expected).abs().max() < 1e-5, fmt
        pipe.delete_adapters(fmt)
        assert all(torch.equal(p, base[n]) for n, p in pipe.transformer.named_parameters() if n in base)


def comfy(report):
    c = report["loaders"]["comfyui"]
    return c["modules"], c["applied"], c["dropped"]


def test_inspect_counts_what_each_loader_applies_and_drops(files, network, names, tmp_path):
    reports = {fmt: inspect_lora(path, names) for fmt, path in files.items()}
    ours = reports["zimage-lora"]
    assert ours["modules"] == 37 and ours["by_block"] == {
        "context_refiner": 7,
        "layers": 16,
        "noise_refiner": 8,
        "outside the blocks": 6,
    }
    assert ours["ranks"] == [1, 2, 3, 4] and ours["metadata"] == {"trigger word": "zfox", "steps": "250"}
    # ComfyUI, by hand: every module of ours is mapped (37 patches, A + B + alpha each)
    assert comfy(ours) == (37, 111, 0)
    assert comfy(reports["ai-toolkit"]) == (37, 74, 0)  # no alpha keys
    assert comfy(reports["diffusers"]) == (37, 74, 0)  # transformer.D
    assert comfy(reports["diffsynth"]) == (37, 74, 0)  # bare D with lora_A/B.default
    # kohya names load only where the diffusers name is ComfyUI's own: w1-w3 (4 blocks x 3), adaLN of the 2 main blocks
    # and the noise refiner, cap_embedder.1, t_embedder.mlp.0/2: 18 modules; the other 19 (q/k/v, out, the
    # embedder and final layer's renamed ones) are dropped, 3 keys each
    assert comfy(reports["kohya"]) == (18, 54, 57)
    # fused: one qkv patch per block (4), out (4), w1-w3 (12), adaLN (3), x_embedder, final_layer x 2, the 3 embedders
    assert comfy(reports["comfyui"]) == (29, 87, 0)
    warnings = " ".join(ours["loaders"]["comfyui"]["warnings"])
    assert "12 q/k/v patches land on row slices" in warnings and "15 patches are on refiner blocks" in warnings
    assert "row slices" not in " ".join(reports["comfyui"]["loaders"]["comfyui"]["warnings"])

    # diffusers, computed by its own conversion; checked against what load_lora_weights injects into the real model
    for fmt in ("zimage-lora", "ai-toolkit", "diffusers", "diffsynth", "kohya"):
        count = reports[fmt]["loaders"]["diffusers"]
        assert (count["modules"], count["dropped"], count["refused"]) == (37, 0, None), fmt
    assert reports["comfyui"]["loaders"]["diffusers"]["refused"]

    # keys that match nothing: a block the model lacks, and the context refiner's adaLN (ComfyUI maps it to no weight)
    tensors = load_file(files["zimage-lora"])
    for module in ("layers.7.attention.to_q", "context_refiner.0.adaLN_modulation.0"):
        tensors[f"diffusion_model.{module}.lora_A.weight"] = torch.zeros(2, 64)
        tensors[f"diffusion_model.{module}.lora_B.weight"] = torch.zeros(64, 2)
        tensors[f"diffusion_model.{module}.alpha"] = torch.tensor(2.0)
    odd = inspect_lora(write(tmp_path / "odd.safetensors", tensors), names)
    assert sorted(odd["unmatched"]) == ["context_refiner.0.adaLN_modulation.0", "layers.7.attention.to_q"]
    assert comfy(odd) == (37, 111, 3)  # layers.7's 3 keys are not loaded; the adaLN's are taken, then NOT LOADED
    assert any(
        "NOT LOADED diffusion_model.context_refiner.0.adaLN_modulation.0" in w
        for w in odd["loaders"]["comfyui"]["warnings"]
    )
    assert odd["loaders"]["diffusers"]["modules"] == 37 and odd["loaders"]["diffusers"]["dropped"] == 4  # A, B each

    proc = run_cli("lora", "inspect", str(files["kohya"]), "--model", str(names.source), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["loaders"]["comfyui"]["dropped"] == 57
    text = run_cli("lora", "inspect", str(files["kohya"]), "--model", str(names.source)).stdout
    assert "kohya / musubi-tuner" in text and "comfyui: applies 18 modules (54 keys), drops 57 keys" in text


def test_bad_files_are_one_sentence_and_nothing_is_written(files, tmp_path, tiny_model_dir):
    (tmp_path / "notes.safetensors").write_text("not a tensor file")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(files["zimage-lora"].read_bytes()[:-100])
    g = torch.randn
    sdxl = write(
        tmp_path / "sdxl.safetensors",
        {
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": g(4, 640),
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": g(640, 4),
        },
    )
    flux = write(
        tmp_path / "flux.safetensors",
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": g(4, 3072),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": g(3072, 4),
        },
    )
    big = write(
        tmp_path / "big.safetensors",
        {
            "diffusion_model.layers.0.attention.to_q.lora_A.weight": g(4, 3840),
            "diffusion_model.layers.0.attention.to_q.lora_B.weight": g(3840, 4),
            "diffusion_model.layers.0.attention.to_q.alpha": torch.tensor(4.0),
        },
    )
    cases = [
        ("notes.safetensors", "is not a readable .safetensors file"),
        ("truncated.safetensors", "is not a readable .safetensors file"),
        (sdxl.name, "another model family"),
        (flux.name, "another model family"),
        (big.name, "update but the layer is 64x64"),
    ]
    names = transformer_names(tiny_model_dir)
    for name, expected in cases:
        with pytest.raises(UserError, match=expected):
            inspect_lora(tmp_path / name, names)
        with pytest.raises(UserError, match=expected):
            convert_lora(tmp_path / name, tmp_path / "out.safetensors", "kohya", "fp32", names)
    out = str(tmp_path / "out.safetensors")  # and on the command line: one sentence, exit 2
    for name, args in (("truncated.safetensors", ["inspect"]), (flux.name, ["convert", "--to", "kohya"])):
        proc = run_cli(
            "lora", *args, str(tmp_path / name), *([out] if "convert" in args else []), "--model", str(tiny_model_dir)
        )
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert dict(cases)[name] in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out.safetensors").exists()
    lokr = NetworkFile("lokr", {"layers.0.attention.to_q": {"lokr_w1": g(8, 8), "lokr_w2": g(8, 8)}}, {})
    path = write(tmp_path / "lokr.safetensors", format_tensors(lokr, "zimage-lora"))
    proc = run_cli(
        "lora", "convert", str(path), str(tmp_path / "out.safetensors"), "--to", "kohya", "--model", str(tiny_model_dir)
    )
    assert proc.returncode == 2 and "export-lora" in proc.stderr and not (tmp_path / "out.safetensors").exists()


# --- merge and resize -------------------------------------------------------------------------------------------


def random_lora(names, ranks: dict[str, int], seed: int) -> NetworkFile:
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for path, rank in ranks.items():
        out, inp = names.linears[path]
        modules[path] = {
            "lora_A.weight": torch.randn(rank, inp, generator=g) / inp**0.5,
            "lora_B.weight": torch.randn(out, rank, generator=g) * 0.1,
            "alpha": torch.tensor(rank * 2.0),
        }
    return NetworkFile("lora", modules, {})


Q0, W1 = "layers.0.attention.to_q", "layers.1.feed_forward.w1"


def test_merge_is_exact_for_plain_loras_and_keeps_the_stated_energy_when_reduced(names, tmp_path):
    from zimage_lora.lora.tools import merge_loras

    a = write(tmp_path / "a.safetensors", format_tensors(random_lora(names, {Q0: 2, W1: 3}, 1), "kohya"))
    b = write(tmp_path / "b.safetensors", format_tensors(random_lora(names, {Q0: 3}, 2), "comfyui"))
    ua = module_updates(read_network_file(*read_safetensors(a), list(names.linears))[0])
    ub = module_updates(read_network_file(*read_safetensors(b), list(names.linears))[0])
    expected = {Q0: 0.7 * ua[Q0] + 0.5 * ub[Q0], W1: 0.7 * ua[W1]}

    exact = merge_loras([(a, 0.7), (b, 0.5)], names)
    assert exact.network.modules[Q0]["lora_A.weight"].shape[0] == 5  # ranks side by side
    assert largest_difference(expected, module_updates(exact.network))[0] < 1e-6
    assert merge_loras([(a, 0.7), (b, 0.5)], names, rank=5).overall == pytest.approx(1.0, abs=1e-9)

    one = merge_loras([(a, 0.7), (b, 0.5)], names, rank=1)
    for path, update in expected.items():
        s2 = torch.linalg.svdvals(update).square()
        assert one.energy[path] == pytest.approx(float(s2[0] / s2.sum()), rel=1e-6)
        assert one.network.modules[path]["lora_A.weight"].shape[0] == 1
    s2 = {p: torch.linalg.svdvals(u).square() for p, u in expected.items()}
    overall = sum(float(v[0]) for v in s2.values()) / sum(float(v.sum()) for v in s2.values())
    assert one.overall == pytest.approx(overall, rel=1e-6)

    enough = merge_loras([(a, 0.7), (b, 0.5)], names, energy=0.9)
    for path, squares in s2.items():
        needed = int((torch.cumsum(squares, 0) / squares.sum() < 0.9).sum()) + 1  # the fewest reaching 90 %
        assert enough.network.modules[path]["lora_A.weight"].shape[0] == needed
        assert enough.energy[path] >= 0.9


def test_merge_with_a_lokr_goes_through_the_dense_update_and_resize_keeps_the_stated_energy(names, tmp_path):
    from zimage_lora.lora.tools import merge_loras, resize_lora

    g = torch.Generator().manual_seed(4)
    lokr = NetworkFile(
        "lokr", {Q0: {"lokr_w1": torch.randn(8, 8, generator=g), "lokr_w2": torch.randn(8, 8, generator=g) * 0.01}}, {}
    )
    k = write(tmp_path / "k.safetensors", format_tensors(lokr, "zimage-lora"))
    a = write(tmp_path / "a.safetensors", format_tensors(random_lora(names, {Q0: 2}, 1), "zimage-lora"))
    merged = merge_loras([(k, 1.0), (a, -1.0)], names)
    expected = module_updates(lokr)[Q0] - module_updates(random_lora(names, {Q0: 2}, 1))[Q0]
    assert largest_difference({Q0: expected}, module_updates(merged.network))[0] < 1e-6

    resized = resize_lora(a, names, rank=1, energy=None)
    s2 = torch.linalg.svdvals(module_updates(random_lora(names, {Q0: 2}, 1))[Q0]).square()
    assert resized.energy[Q0] == pytest.approx(float(s2[0] / s2.sum()), rel=1e-6)
    full = resize_lora(a, names, rank=2, energy=None)
    assert full.overall == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(UserError, match="--rank and --energy"):
        resize_lora(a, names, rank=2, energy=0.5)

    out = tmp_path / "merged.safetensors"
    proc = run_cli("lora", "merge", f"{k}:1.0", f"{a}:-1", "-o", str(out), "--rank", "4", "--model", str(names.source))
    assert proc.returncode == 0, proc.stderr
    assert "energy kept" in proc.stdout and read_network_file(*read_safetensors(out), list(names.linears))[0].modules
