"""Loading, encoding and hub resolution, checked against diffusers' own ZImagePipeline on a tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from diffusers import ZImagePipeline
from PIL import Image
from safetensors.torch import load_file
from transformers import Qwen2Tokenizer

from zimage_lora.errors import UserError
from zimage_lora.models import hub
from zimage_lora.models.devices import device_name, resolve_device
from zimage_lora.models.hub import parse_ref, resolve_file, resolve_model_dir
from zimage_lora.models.loading import default_dtype, load_components
from zimage_lora.models.text import encode_prompts
from zimage_lora.models.tiny import build_tiny_model
from zimage_lora.models.vae import decode_latents, encode_latents, pil_to_tensor, tensor_to_pil

TRANSFORMER_WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
PROMPTS = ["", "a cat", "a photo of a red fox sitting in deep snow at dawn, 35mm", "猫 on a mat"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "zimage", seed=0)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir) -> ZImagePipeline:
    return ZImagePipeline.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def components(tiny_model_dir):
    return load_components(str(tiny_model_dir))


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Hub offline, with an empty cache so nothing cached on this machine can answer."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


# --- tiny builder ---------------------------------------------------------------------------------------------------


def test_tiny_model_is_deterministic_per_seed(tiny_model_dir, tmp_path):
    state = torch.random.get_rng_state()
    again = build_tiny_model(tmp_path / "again", seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG stream is left alone
    other = build_tiny_model(tmp_path / "other", seed=1)
    for weights in (TRANSFORMER_WEIGHTS, "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (again / weights).read_bytes() == (tiny_model_dir / weights).read_bytes(), weights
        assert (other / weights).read_bytes() != (tiny_model_dir / weights).read_bytes(), weights


def test_tiny_model_layout_dtype_and_pad_tokens(tiny_model_dir):
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "ZImagePipeline"
    assert index["transformer"] == ["diffusers", "ZImageTransformer2DModel"]
    assert index["text_encoder"] == ["transformers", "Qwen3Model"]
    for sub in ("transformer", "text_encoder", "tokenizer", "vae", "scheduler"):
        assert (tiny_model_dir / sub).is_dir()
    weights = load_file(tiny_model_dir / TRANSFORMER_WEIGHTS)
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert {t.dtype for t in load_file(tiny_model_dir / "vae/diffusion_pytorch_model.safetensors").values()} == {
        torch.float32
    }
    for name in ("x_pad_token", "cap_pad_token"):
        assert weights[name].abs().min() > 0, name
    size = sum(f.stat().st_size for f in tiny_model_dir.rglob("*") if f.is_file())
    assert size < 4_000_000


def test_tiny_tokenizer_renders_the_qwen3_template(components):
    tokenizer = components.tokenizer
    assert isinstance(tokenizer, Qwen2Tokenizer)
    messages = [{"role": "user", "content": "a cat"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert text == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    no_think = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert no_think == text + "<think>\n\n</think>\n\n"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.decode(ids) == text
    assert tokenizer.pad_token == "<|endoftext|>"
    assert len(tokenizer("é").input_ids) == 2  # byte level: two UTF-8 bytes, no merges


# --- loading ---------------------------------------------------------------------------------------------------------


def test_pipeline_generates_and_our_loader_reads_the_same_weights(pipe, components, tiny_model_dir):
    image = pipe(
        "a cat",
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=0.0,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64) and image.mode == "RGB"
    assert np.asarray(image).std() > 0

    ours = dict(components.transformer.named_parameters())
    for name, param in pipe.transformer.named_parameters():
        assert torch.equal(ours[name], param), name
    assert torch.equal(components.text_encoder.embed_tokens.weight, pipe.text_encoder.embed_tokens.weight)
    assert torch.equal(components.vae.decoder.conv_out.weight, pipe.vae.decoder.conv_out.weight)
    assert components.scheduler.config.shift == 3.0
    assert components.source["transformer"] == str(tiny_model_dir.resolve())


def test_loaded_components_are_frozen_in_eval_mode(components):
    for model in (components.transformer, components.text_encoder, components.vae):
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())


def test_dtype_parts_and_scheduler_shift(tiny_model_dir):
    loaded = load_components(
        str(tiny_model_dir), dtype=torch.bfloat16, parts=("transformer", "vae"), scheduler_shift=6.0
    )
    assert loaded.transformer.dtype == torch.bfloat16
    assert loaded.vae.dtype == torch.float32  # the VAE stays fp32
    assert loaded.text_encoder is None and loaded.tokenizer is None
    assert loaded.scheduler.config.shift == 6.0
    assert loaded.source["scheduler"] == "builtin Z-Image default"


def test_transformer_only_folder_falls_back_for_the_rest(tiny_model_dir, tmp_path):
    deturbo = tmp_path / "deturbo"
    shutil.copytree(tiny_model_dir / "transformer", deturbo / "transformer")
    with pytest.raises(UserError, match=r"has no text_encoder/ subfolder.*model\.text_encoder_path"):
        load_components(str(deturbo))

    loaded = load_components(str(deturbo), fallback_ref=str(tiny_model_dir))
    assert loaded.source["transformer"] == str(deturbo.resolve())
    for part in ("text_encoder", "tokenizer", "vae", "scheduler"):
        assert loaded.source[part] == str(tiny_model_dir.resolve()), part
    assert loaded.text_encoder is not None and loaded.vae is not None


def test_overrides_choose_where_text_encoder_and_vae_come_from(tiny_model_dir, tmp_path):
    other = build_tiny_model(tmp_path / "other", seed=1)
    loaded = load_components(
        str(tiny_model_dir),
        text_encoder_path=str(other),
        vae_path=str(other),
        parts=("text_encoder", "tokenizer", "vae"),
    )
    reference = load_components(str(other), parts=("text_encoder", "vae"))
    assert torch.equal(loaded.text_encoder.embed_tokens.weight, reference.text_encoder.embed_tokens.weight)
    assert torch.equal(loaded.vae.decoder.conv_out.weight, reference.vae.decoder.conv_out.weight)
    assert loaded.source["tokenizer"] == str(other.resolve())

    vae_less = tmp_path / "vae-less"
    shutil.copytree(other, vae_less, ignore=shutil.ignore_patterns("vae"))
    with pytest.raises(UserError, match=r"model\.vae_path .*vae-less has no vae/ subfolder"):
        load_components(str(tiny_model_dir), vae_path=str(vae_less), parts=("vae",))
    with pytest.raises(UserError, match=r"model\.vae_path folder .*transformer is not a diffusers-layout"):
        load_components(str(tiny_model_dir), vae_path=str(other / "transformer"), parts=("vae",))


def test_missing_or_broken_subfolder_is_a_user_error(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / TRANSFORMER_WEIGHTS).unlink()
    with pytest.raises(UserError, match="could not load the transformer from .*broken/transformer"):
        load_components(str(broken), parts=("transformer",))

    no_scheduler = tmp_path / "no-scheduler"
    shutil.copytree(tiny_model_dir, no_scheduler, ignore=shutil.ignore_patterns("scheduler"))
    with pytest.raises(UserError, match="no-scheduler has no scheduler/ subfolder"):
        load_components(str(no_scheduler), parts=("scheduler",))


def test_resolve_device_and_default_dtype():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    # the rule itself, for a machine of any size: the queue's device keys and the trainer's devices agree
    assert [device_name(s, gpus=2) for s in ("auto", "cpu", "cuda", "cuda:1", " CUDA:0 ")] == [
        "cuda:0", "cpu", "cuda:0", "cuda:1", "cuda:0"
    ]  # fmt: skip
    assert device_name("auto", gpus=0) == "cpu"
    with pytest.raises(UserError, match="'cuda:2' does not exist: this machine has 2 CUDA GPU"):
        device_name("cuda:2", gpus=2)
    assert default_dtype("cpu") == torch.float32
    assert default_dtype("cuda:0") == torch.bfloat16
    with pytest.raises(UserError, match="'gpu' is not one of"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        for spec in ("cuda", "cuda:1"):
            with pytest.raises(UserError, match=f"'{spec}' asks for CUDA"):
                resolve_device(spec)


# --- text ------------------------------------------------------------------------------------------------------------


def test_encode_prompts_equals_the_pipeline(pipe, components):
    expected, negative = pipe.encode_prompt(list(PROMPTS), device="cpu", do_classifier_free_guidance=False)
    assert negative == []
    ours = encode_prompts(components.tokenizer, components.text_encoder, list(PROMPTS), batch_size=3)
    assert len(ours) == len(PROMPTS)
    lengths = {e.shape[0] for e in ours}
    assert len(lengths) == len(PROMPTS)  # all different, so padding really happened
    for mine, theirs in zip(ours, expected, strict=True):
        assert mine.shape == theirs.shape and mine.shape[1] == 32
        assert mine.dtype == components.text_encoder.dtype
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=0)


def test_encode_prompts_truncates_like_the_pipeline(pipe, components):
    long_prompt = ["word " * 40]
    # (the pipeline overwrites the list it is given with the templated prompts, hence the copies)
    (expected,), _ = pipe.encode_prompt(
        list(long_prompt), device="cpu", do_classifier_free_guidance=False, max_sequence_length=64
    )
    (ours,) = encode_prompts(components.tokenizer, components.text_encoder, list(long_prompt), max_length=64)
    assert ours.shape[0] == 64
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


# --- vae -------------------------------------------------------------------------------------------------------------


def test_vae_shift_scale_convention(components):
    vae = components.vae
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (0.3611, 0.1159)
    pixels = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = encode_latents(vae, pixels)
    assert latents.shape == (2, 16, 8, 6)
    with torch.no_grad():
        mode = vae.encode(pixels).latent_dist.mode()
        decoded_manual = vae.decode(latents / 0.3611 + 0.1159).sample
    torch.testing.assert_close(latents, (mode - 0.1159) * 0.3611)
    decoded = decode_latents(vae, latents)
    assert decoded.shape == (2, 3, 64, 48)
    torch.testing.assert_close(decoded, decoded_manual.clamp(-1, 1))


def test_decoded_png_equals_the_pipeline_image(pipe):
    kwargs = dict(height=64, width=64, num_inference_steps=2, guidance_scale=0.0)
    latents = pipe("a cat", output_type="latent", generator=torch.Generator().manual_seed(3), **kwargs).images
    image = pipe("a cat", generator=torch.Generator().manual_seed(3), **kwargs).images[0]
    decoded = decode_latents(pipe.vae, latents)
    ours = tensor_to_pil(decoded[0])
    assert np.array_equal(np.asarray(ours), np.asarray(image))
    (batch_item,) = tensor_to_pil(decoded)  # a batch gives a list
    assert np.array_equal(np.asarray(batch_item), np.asarray(image))


def test_pil_tensor_round_trip():
    array = np.random.default_rng(0).integers(0, 256, size=(16, 24, 3), dtype=np.uint8)
    tensor = pil_to_tensor(Image.fromarray(array))
    assert tensor.shape == (3, 16, 24) and tensor.dtype == torch.float32
    assert tensor.min() >= -1 and tensor.max() <= 1
    assert tensor[:, 0, 0].tolist() == pytest.approx([v / 127.5 - 1 for v in array[0, 0]], abs=1e-6)
    assert np.array_equal(np.asarray(tensor_to_pil(tensor)), array)
    assert pil_to_tensor(Image.fromarray(array).convert("RGBA")).shape == (3, 16, 24)


# --- hub -------------------------------------------------------------------------------------------------------------


def test_parse_ref():
    assert parse_ref("Tongyi-MAI/Z-Image-Turbo") == ("Tongyi-MAI/Z-Image-Turbo", None)
    assert parse_ref("Tongyi-MAI/Z-Image-Turbo@main") == ("Tongyi-MAI/Z-Image-Turbo", "main")
    assert parse_ref("ostris/Z-Image-De-Turbo@refs/pr/3") == ("ostris/Z-Image-De-Turbo", "refs/pr/3")
    with pytest.raises(UserError, match="revision"):
        parse_ref("org/name@")


def test_resolve_model_dir_local(tiny_model_dir, tmp_path):
    assert resolve_model_dir(str(tiny_model_dir)) == tiny_model_dir
    empty = tmp_path / "empty-model"
    empty.mkdir()
    with pytest.raises(UserError, match=r"empty-model is not a diffusers-layout .* no model_index\.json"):
        resolve_model_dir(str(empty))
    with pytest.raises(UserError, match=r"/no/such/model does not exist") as err:
        resolve_model_dir("/no/such/model")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="not a folder and not a hub id"):
        resolve_model_dir("just-a-name")


def test_resolve_model_dir_offline_is_one_clear_sentence(offline):
    with pytest.raises(UserError) as err:
        resolve_model_dir("Tongyi-MAI/Z-Image-Turbo@main")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("could not download Tongyi-MAI/Z-Image-Turbo@main from the Hugging Face hub")
    assert "hf download Tongyi-MAI/Z-Image-Turbo --revision main" in message and "HF_HUB_OFFLINE" in message
    with pytest.raises(UserError, match=r"could not download ostris/Z-Image-De-Turbo@refs/pr/3 from"):
        resolve_model_dir("ostris/Z-Image-De-Turbo@refs/pr/3")


def test_unreachable_hub_is_one_clear_sentence(monkeypatch, tmp_path):
    # A closed local port: the connection is refused at once, without touching the network.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    # (hf_hub_download retries refused connections with back-off for ~20 s, so resolve_file is tested offline only.)
    with pytest.raises(UserError, match=r"could not download org/model from the Hugging Face hub \(offline\?\)"):
        resolve_model_dir("org/model")


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ("gated", "is a gated repo"),
        ("missing", "was not found on the Hugging Face hub"),
        ("revision", "that revision does not exist"),
    ],
)
def test_hub_http_errors_become_user_errors(monkeypatch, error, expected):
    import httpx2

    response = httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co/api/models/org/name"))
    exc = {
        "gated": huggingface_hub.errors.GatedRepoError,
        "missing": huggingface_hub.errors.RepositoryNotFoundError,
        "revision": huggingface_hub.errors.RevisionNotFoundError,
    }[error]("boom\nmore lines", response=response)

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(hub.huggingface_hub, "snapshot_download", fail)
    with pytest.raises(UserError, match=expected) as err:
        resolve_model_dir("org/name@v1")
    assert "\n" not in str(err.value) and "org/name@v1" in str(err.value)


def test_resolve_file(tmp_path, offline, monkeypatch):
    local = tmp_path / "adapter.safetensors"
    local.write_bytes(b"x")
    assert resolve_file(str(local)) == local
    with pytest.raises(UserError, match="is a folder, not a file"):
        resolve_file(str(tmp_path))
    with pytest.raises(UserError, match="not an existing file and not a hub path"):
        resolve_file(str(tmp_path / "missing.safetensors"))
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set"):
        resolve_file("ostris/zimage_turbo_training_adapter/zimage_turbo_training_adapter_v2.safetensors")

    calls = []
    monkeypatch.setattr(hub.huggingface_hub, "hf_hub_download", lambda *a, **k: calls.append((a, k)) or str(local))
    resolve_file("org/repo@v2/sub/file.safetensors")
    resolve_file("org/repo/file.safetensors@abc123")
    resolve_file("org/repo/file.safetensors")
    assert [(a, k["revision"]) for a, k in calls] == [
        (("org/repo", "sub/file.safetensors"), "v2"),
        (("org/repo", "file.safetensors"), "abc123"),
        (("org/repo", "file.safetensors"), None),
    ]
