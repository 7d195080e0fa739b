"""``zimage-lora import-job``: AI Toolkit job files, written from the keys its UI writes, become our jobs.

Every key of the file must end in a finding (mapped, converted, not mapped); every value must land where it should;
the imported job validates and trains on the tiny model once its model and data paths are pointed at ours.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import yaml
from conftest import demo_dataset, run_cli

from zimage_lora.aitoolkit import import_job_text
from zimage_lora.config import DEFAULT_TARGET_REGEX, load_job, parse_job
from zimage_lora.data.dataset import discover
from zimage_lora.errors import UserError

ADAPTER_V2 = "ostris/zimage_turbo_training_adapter/zimage_turbo_training_adapter_v2.safetensors"

# The guide's baseline, as AI Toolkit's UI writes it for Z-Image Turbo with the training adapter v2.
BASELINE = {
    "job": "extension",
    "config": {
        "name": "my_first_lora_v1",
        "process": [
            {
                "type": "ui_trainer",
                "training_folder": "/data/output",
                "sqlite_db_path": "./aitk_db.db",
                "device": "cuda:0",
                "trigger_word": "zfox",
                "performance_log_every": 10,
                "network": {
                    "type": "lora",
                    "linear": 16,
                    "linear_alpha": 16,
                    "conv": 16,
                    "conv_alpha": 16,
                    "lokr_full_rank": True,
                    "lokr_factor": -1,
                    "network_kwargs": {"ignore_if_contains": []},
                },
                "save": {
                    "dtype": "bf16",
                    "save_every": 250,
                    "max_step_saves_to_keep": 4,
                    "save_format": "safetensors",
                    "push_to_hub": False,
                },
                "datasets": [
                    {
                        "folder_path": "/data/datasets/zfox",
                        "control_path": None,
                        "mask_path": None,
                        "mask_min_value": 0.1,
                        "default_caption": "",
                        "caption_ext": "txt",
                        "caption_dropout_rate": 0.05,
                        "cache_latents_to_disk": True,
                        "is_reg": False,
                        "network_weight": 1,
                        "resolution": [512, 768, 1024],
                        "controls": [],
                        "shrink_video_to_frames": True,
                        "num_frames": 1,
                        "do_i2v": True,
                        "flip_x": False,
                        "flip_y": False,
                    }
                ],
                "train": {
                    "batch_size": 1,
                    "bypass_guidance_embedding": False,
                    "steps": 3000,
                    "gradient_accumulation": 1,
                    "train_unet": True,
                    "train_text_encoder": False,
                    "gradient_checkpointing": True,
                    "noise_scheduler": "flowmatch",
                    "optimizer": "adamw8bit",
                    "timestep_type": "weighted",
                    "content_or_style": "balanced",
                    "optimizer_params": {"weight_decay": 0.0001},
                    "unload_text_encoder": False,
                    "cache_text_embeddings": False,
                    "lr": 0.0001,
                    "ema_config": {"use_ema": False, "ema_decay": 0.99},
                    "skip_first_sample": False,
                    "force_first_sample": False,
                    "disable_sampling": False,
                    "dtype": "bf16",
                    "diff_output_preservation": False,
                    "diff_output_preservation_multiplier": 1,
                    "diff_output_preservation_class": "person",
                    "switch_boundary_every": 1,
                    "loss_type": "mse",
                },
                "model": {
                    "name_or_path": "Tongyi-MAI/Z-Image-Turbo",
                    "quantize": True,
                    "qtype": "qfloat8",
                    "quantize_te": True,
                    "qtype_te": "qfloat8",
                    "arch": "zimage:turbo",
                    "low_vram": False,
                    "model_kwargs": {},
                    "layer_offloading": False,
                    "layer_offloading_text_encoder_percent": 1,
                    "layer_offloading_transformer_percent": 1,
                    "assistant_lora_path": ADAPTER_V2,
                },
                "sample": {
                    "sampler": "flowmatch",
                    "sample_every": 250,
                    "width": 1024,
                    "height": 1024,
                    "samples": [
                        {"prompt": "[trigger] in a forest, a photo"},
                        {"prompt": "a bowl of fruit", "seed": 7, "sample_steps": 9, "network_multiplier": 0.8},
                    ],
                    "neg": "",
                    "seed": 42,
                    "walk_seed": True,
                    "guidance_scale": 1,
                    "sample_steps": 9,
                    "num_frames": 1,
                    "fps": 1,
                },
            }
        ],
    },
    "meta": {"name": "[name]", "version": "1.0"},
}


def process(job: dict) -> dict:
    return job["config"]["process"][0]


def leaves(node, path: str = ""):
    """Every key path of a parsed file down to its values (a list of plain values, an empty mapping: one leaf)."""
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from leaves(value, f"{path}.{key}" if path else key)
    elif isinstance(node, list) and any(isinstance(v, (dict, list)) for v in node):
        for i, value in enumerate(node):
            yield from leaves(value, f"{path}[{i}]")
    else:
        yield path


def assert_every_key_reported(job: dict, imported) -> None:
    """Each leaf has a finding at its own path, or under a key whose finding speaks for all of it (meta)."""
    found = {f.path for f in imported.findings}
    whole = {f.path for f in imported.findings if f.kind == "not mapped"}
    for leaf in leaves(job):
        covered = leaf in found or any(leaf.startswith((w + ".", w + "[")) for w in whole)
        covered = covered or re.sub(r"\.config\.process\[0\]", "", leaf) in found
        assert covered, f"{leaf} is in no finding"


def findings(imported, kind: str) -> dict[str, str]:
    return {f.path: f.detail for f in imported.findings if f.kind == kind}


P = "config.process[0]"


def test_the_guides_baseline_lands_where_it_should():
    imported = import_job_text(yaml.safe_dump(BASELINE), "baseline.yaml")
    cfg = parse_job(imported.data, "/", check_paths=False)
    assert (cfg.job.name, cfg.job.trigger_word, cfg.job.device) == ("my_first_lora_v1", "zfox", "cuda:0")
    assert cfg.job.output_dir == "/data/output"
    assert (cfg.model.arch, cfg.model.name_or_path) == ("zimage_turbo_adapter", "Tongyi-MAI/Z-Image-Turbo")
    assert cfg.model.training_adapter == ADAPTER_V2
    assert (cfg.quantization.transformer, cfg.quantization.text_encoder) == ("float8", "float8")
    assert (cfg.target.type, cfg.target.rank, cfg.target.alpha) == ("lora", 16, 16.0)
    assert (cfg.save.dtype, cfg.save.every, cfg.save.keep) == ("bf16", 250, 4)
    t = cfg.train
    assert (t.optimizer, t.lr, t.weight_decay, t.steps, t.batch_size, t.grad_accum) == (
        "adamw8bit",
        1e-4,
        1e-4,
        3000,
        1,
        1,
    )
    assert (t.timestep_type, t.timestep_bias, t.loss, t.mixed_precision) == ("weighted", "balanced", "mse", "bf16")
    assert not t.ema.enabled and t.ema.decay == 0.99 and not t.dop.enabled and t.dop.class_word == "person"
    (ds,) = cfg.datasets
    assert (ds.path, ds.caption_ext, ds.caption_dropout, ds.resolutions) == (
        "/data/datasets/zfox",
        "txt",
        0.05,
        [512, 768, 1024],
    )
    assert ds.cache_latents and ds.add_trigger and not ds.is_reg and ds.mask_min_value == 0.1
    s = cfg.sample
    assert (s.every, s.width, s.height, s.seed, s.walk_seed, s.first, s.enabled) == (
        250,
        1024,
        1024,
        42,
        True,
        True,
        True,
    )
    assert (s.steps, s.guidance) == (8, 1.0)  # Turbo's 9 is 8 forwards here
    assert [p.prompt for p in s.prompts] == ["[trigger] in a forest, a photo", "a bowl of fruit"]
    assert (s.prompts[1].seed, s.prompts[1].steps, s.prompts[1].lora_scale) == (7, 8, 0.8)
    assert_every_key_reported(BASELINE, imported)

    converted = findings(imported, "converted")
    assert "8 transformer forwards" in converted[f"{P}.sample.sample_steps"]
    assert (
        "2026-07-08" in converted[f"{P}.sample.guidance_scale"]
        and "classic CFG" in converted[f"{P}.sample.guidance_scale"]
    )
    assert "alpha = rank" in converted[f"{P}.network.linear_alpha"]
    assert "curve differs" in converted[f"{P}.train.timestep_type"]
    assert "in front of every caption" in converted[f"{P}.trigger_word"]
    unmapped = findings(imported, "not mapped")
    assert set(unmapped) == {
        "meta",
        f"{P}.sqlite_db_path",
        f"{P}.performance_log_every",
        f"{P}.network.conv",
        f"{P}.network.conv_alpha",
        f"{P}.network.lokr_full_rank",
        f"{P}.save.push_to_hub",
        f"{P}.train.bypass_guidance_embedding",
        f"{P}.train.switch_boundary_every",
        f"{P}.model.layer_offloading_text_encoder_percent",
        f"{P}.model.layer_offloading_transformer_percent",
        f"{P}.datasets[0].shrink_video_to_frames",
        f"{P}.datasets[0].do_i2v",
    }
    assert "no convolutions" in unmapped[f"{P}.network.conv"] and "video" in unmapped[f"{P}.datasets[0].do_i2v"]
    before = import_job_text(yaml.safe_dump(BASELINE), "baseline.yaml", guidance_rule="before-2026-07-08")
    assert before.data["sample"]["guidance"] == 2.0  # then a value g acted as classic g + 1


def test_a_deturbo_job():
    job = copy.deepcopy(BASELINE)
    proc = process(job)
    proc["model"] = {"name_or_path": "ostris/Z-Image-De-Turbo", "arch": "zimage:deturbo", "quantize": False}
    proc["sample"].update(sample_steps=25, guidance_scale=3, neg="blurry, low quality")
    proc["sample"]["samples"] = [{"prompt": "zfox", "guidance_scale": 2.5, "neg": "text"}]
    imported = import_job_text(json.dumps(job), "deturbo.json")  # JSON, as AI Toolkit also writes
    cfg = parse_job(imported.data, "/", check_paths=False)
    assert (cfg.model.arch, cfg.model.training_adapter, cfg.quantization.transformer) == (
        "zimage_deturbo",
        None,
        "none",
    )
    assert (cfg.sample.steps, cfg.sample.guidance, cfg.sample.negative_prompt) == (25, 3.0, "blurry, low quality")
    assert cfg.sample.prompts[0].guidance == 2.5
    assert "kept" in findings(imported, "converted")[f"{P}.sample.sample_steps"]  # not Turbo: 25 stays 25
    assert "sample.negative_prompt" in findings(imported, "not mapped")[f"{P}.sample.samples[0].neg"]
    assert_every_key_reported(job, imported)
    proc["model"] = {"name_or_path": "Tongyi-MAI/Z-Image-Turbo", "arch": "zimage:turbo"}  # no adapter named
    turbo = import_job_text(yaml.safe_dump(job), "turbo.yaml")
    assert turbo.data["model"]["training_adapter"] == ADAPTER_V2
    assert "our default adapter" in findings(turbo, "converted")[f"{P}.model.arch"]
    proc["model"] = {"name_or_path": "ostris/Z-Image-De-Turbo@abc123", "arch": "zimage"}  # the family name
    family = import_job_text(yaml.safe_dump(job), "deturbo.yaml")
    assert family.data["model"]["arch"] == "zimage_deturbo"
    assert "without an adapter" in findings(family, "converted")[f"{P}.model.arch"]


def test_keys_we_do_not_support_are_listed_with_their_reasons():
    job = copy.deepcopy(BASELINE)
    proc = process(job)
    proc["network"].update(type="locon", network_kwargs={"ignore_if_contains": ["adaLN_modulation"]})
    proc["train"].update(
        optimizer="lion8bit",
        loss_type="wavelet",
        timestep_type="next_sample",
        do_differential_guidance=True,
        differential_guidance_scale=2.0,
        noise_offset=0.1,
        frobnicate=3,
    )
    proc["model"].update(qtype="uint3|ostris/accuracy_recovery_adapters/zimage_3bit.safetensors", low_vram=True)
    proc["model"].update(layer_offloading=True, layer_offloading_transformer_percent=50)
    proc["model"].pop("layer_offloading_text_encoder_percent")  # all of it: but low_vram keeps it off the GPU anyway
    proc["datasets"][0].update(resolution=[500, 768], random_crop=True)
    imported = import_job_text(yaml.safe_dump(job), "odd.yaml")
    cfg = parse_job(imported.data, "/", check_paths=False)
    unmapped = findings(imported, "not mapped")
    assert "'lion8bit' is not one of ours" in unmapped[f"{P}.train.optimizer"] and cfg.train.optimizer == "adamw8bit"
    assert "not a loss" in unmapped[f"{P}.train.loss_type"] and cfg.train.loss == "mse"
    assert "next_sample" in unmapped[f"{P}.train.timestep_type"] and cfg.train.timestep_type == "weighted"
    assert "flow matching" in unmapped[f"{P}.train.noise_offset"]
    assert "knows" in unmapped[f"{P}.train.frobnicate"]
    assert "centre-crops" in unmapped[f"{P}.datasets[0].random_crop"]
    # a value our schema refuses goes back to our default, with the schema's sentence
    assert "multiple of 16" in unmapped[f"{P}.datasets[0].resolution"] and cfg.datasets[0].resolutions == [
        512,
        768,
        1024,
    ]
    assert "low_vram" in unmapped[f"{P}.model.layer_offloading"] and cfg.model.text_encoder_offload == 0
    converted = findings(imported, "converted")
    assert "nf4" in converted[f"{P}.model.qtype"] and cfg.quantization.transformer == "nf4"
    assert cfg.target.type == "lora" and "convolutions" in converted[f"{P}.network.type"]
    assert cfg.model.layer_offload == 0.5 and "percent" in converted[f"{P}.model.layer_offloading_transformer_percent"]
    assert "did nothing in AI Toolkit" in converted[f"{P}.train.do_differential_guidance"]
    assert cfg.advanced.differential_guidance.enabled and cfg.advanced.differential_guidance.scale == 2.0
    regex = re.compile(cfg.target.modules)
    assert regex.match("layers.3.attention.to_q") and not regex.match("layers.3.adaLN_modulation.0")
    assert re.match(DEFAULT_TARGET_REGEX, "layers.3.adaLN_modulation.0")
    assert_every_key_reported(job, imported)


def test_bad_files_are_one_sentence(tmp_path):
    for name, text, expected in [
        ("broken.yaml", "config: [unclosed", "not a YAML or JSON file"),
        ("other.yaml", "some: thing\n", "not an AI Toolkit job file"),
        ("flux.yaml", yaml.safe_dump(_with_arch("flux")), "arch 'flux', not a Z-Image model"),
        ("ours.yaml", "version: 1\njob: {name: x}\ndatasets: [{path: .}]\n", "is a zimage-lora job already"),
    ]:
        (tmp_path / name).write_text(text)
        proc = run_cli("import-job", str(tmp_path / name))
        assert proc.returncode == 2, proc.stderr
        assert expected in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.yaml", "flux.yaml", "other.yaml", "ours.yaml"]
    with pytest.raises(UserError, match="config.process must be a list"):
        import_job_text("job: extension\nconfig: {name: x}\n")


def _with_arch(arch: str) -> dict:
    job = copy.deepcopy(BASELINE)
    process(job)["model"]["arch"] = arch
    return job


def test_the_imported_job_trains_on_the_tiny_model(tmp_path, tiny_model_dir, tiny_adapter):
    source = tmp_path / "aitk.yaml"
    job = copy.deepcopy(BASELINE)
    process(job)["training_folder"] = str(tmp_path / "output")
    dataset = demo_dataset(tmp_path / "dataset", 2)
    (dataset / "fox_02.txt").write_text("a cartoon fox head")  # no trigger: AI Toolkit would add it, and so do we
    process(job)["datasets"][0]["folder_path"] = str(dataset)
    source.write_text(yaml.safe_dump(job))
    out = tmp_path / "ours.yaml"
    proc = run_cli("import-job", str(source), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "converted (" in proc.stdout and "not mapped (" in proc.stdout and f"wrote {out}" in proc.stdout
    assert out.read_text().startswith("# Imported from the AI Toolkit job")
    assert run_cli("import-job", str(source), "-o", str(out)).returncode == 2  # never replaced without --force
    small = [
        f"model.name_or_path={tiny_model_dir}",
        f"model.training_adapter={tiny_adapter}",
        "quantization.transformer=none",
        "quantization.text_encoder=none",
        "job.device=cpu",
        "train.steps=2",
        "train.mixed_precision=no",
        "train.optimizer=adamw",
        "datasets[0].resolutions=[64]",
        "sample.width=64",
        "sample.height=64",
        "sample.every=2",
        "save.every=2",
    ]
    cfg = load_job(out, small)
    assert cfg.datasets[0].add_trigger
    captions = sorted(item.caption for item in discover(cfg.datasets, cfg.job.trigger_word))
    assert captions == ["zfox, a cartoon fox head", "zfox, a cartoon fox head on a blue sky"]
    trained = run_cli("train", str(out), *[a for s in small for a in ("--set", s)], "--no-progress")
    assert trained.returncode == 0, trained.stderr
    run = tmp_path / "output" / "my_first_lora_v1"
    assert (run / "my_first_lora_v1.safetensors").is_file() and (run / "samples").is_dir()


def test_ai_toolkits_arch_names_are_accepted_in_our_jobs():
    def arch(name: str, **model) -> str:
        data = {"job": {"name": "x"}, "model": {"arch": name, **model}, "datasets": [{"path": "/data"}]}
        return parse_job(data, "/", check_paths=False).model.arch

    assert arch("zimage:turbo", training_adapter=ADAPTER_V2) == "zimage_turbo_adapter"
    assert arch("zimage:deturbo") == "zimage_deturbo"
    assert arch("zimage", training_adapter=ADAPTER_V2) == "zimage_turbo_adapter"
    assert arch("zimage", name_or_path="Tongyi-MAI/Z-Image-Turbo@main") == "zimage_turbo"
    assert arch("zimage") == "zimage_base"
    with pytest.raises(UserError, match="model.arch"):
        arch("zimage:base2")
