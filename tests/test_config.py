"""The job config: schema defaults, one-line errors, overrides, paths, YAML round trip, presets."""

import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import get_args

import pytest
import yaml
from PIL import Image
from pydantic import BaseModel

from zimage_lora import config as c
from zimage_lora.errors import ConfigError, UserError

ADAPTER = "ostris/zimage_turbo_training_adapter/zimage_turbo_training_adapter_v2.safetensors"


def make_dataset(folder: Path, name: str = "a.png", size: int = 512) -> Path:
    """One image that trains at 512 (the default resolutions 512/768/1024 take it at 512)."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (200, 30, 30)).save(folder / name)
    return folder


def minimal(**sections) -> dict:
    """The smallest job that passes every check, with sections replaced or added."""
    data = {"job": {"name": "demo"}, "model": {"training_adapter": ADAPTER}, "datasets": [{"path": "data"}]}
    data.update(sections)
    return data


def write_job(folder: Path, data: dict | str, dataset: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if dataset:
        make_dataset(folder / "data")
    path = folder / "job.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------------------------------------------------------
# Schema and defaults
# ---------------------------------------------------------------------------------------------------------------


def test_defaults_are_filled_and_resolved(tmp_path):
    cfg = c.load_job(write_job(tmp_path, minimal()))
    assert cfg.version == 1
    assert (cfg.job.trigger_word, cfg.job.device, cfg.job.seed) == (None, "auto", 42)
    assert cfg.job.output_dir == str(tmp_path / "output")
    assert c.run_dir(cfg) == tmp_path / "output" / "demo"
    assert cfg.model.arch == "zimage_turbo_adapter"
    assert cfg.model.name_or_path == "Tongyi-MAI/Z-Image-Turbo"
    assert cfg.model.training_adapter == ADAPTER  # a hub file, not turned into a path
    assert (cfg.model.low_vram, cfg.model.layer_offload) == (False, 0.0)
    assert (cfg.quantization.transformer, cfg.quantization.text_encoder) == ("none", "none")
    assert (cfg.target.type, cfg.target.rank, cfg.target.alpha, cfg.target.resolved_alpha) == ("lora", 16, 16.0, 16.0)
    assert cfg.target.modules is None
    assert (cfg.save.dtype, cfg.save.every, cfg.save.keep) == ("bf16", 250, 4)
    t = cfg.train
    assert (t.batch_size, t.grad_accum, t.steps, t.optimizer, t.lr, t.weight_decay) == (
        1,
        1,
        3000,
        "adamw8bit",
        1e-4,
        1e-4,
    )
    assert (t.lr_scheduler, t.warmup_steps, t.max_grad_norm, t.loss) == ("constant", 0, 1.0, "mse")
    assert (t.timestep_type, t.timestep_bias, t.mixed_precision) == ("weighted", "balanced", "auto")
    assert (t.gradient_checkpointing, t.compile, t.cache_text_embeddings, t.unload_text_encoder) == (
        True,
        False,
        False,
        False,
    )
    assert (t.ema.enabled, t.ema.decay) == (False, 0.999)
    assert (t.dop.enabled, t.dop.multiplier, t.dop.class_word) == (False, 1.0, None)
    assert (t.validation.enabled, t.validation.every, t.validation.sigmas, t.validation.images) == (
        False,
        250,
        [0.25, 0.5, 0.75],
        [],
    )
    d = cfg.datasets[0]
    assert d.path == str(tmp_path / "data")
    assert (d.default_caption, d.caption_ext, d.caption_dropout, d.cache_latents) == ("", "txt", 0.05, True)
    assert d.cache_dir == str(tmp_path / "data" / ".zimage_cache")
    assert (d.resolutions, d.repeats) == ([512, 768, 1024], 1)
    s = cfg.sample
    assert (s.every, s.width, s.height, s.steps, s.guidance, s.seed) == (250, 1024, 1024, 8, 1.0, 42)
    assert (s.prompts, s.negative_prompt) == ([], "")
    assert (cfg.advanced.differential_guidance.enabled, cfg.advanced.differential_guidance.scale) == (False, 3.0)


@pytest.mark.parametrize(
    ("arch", "weights", "steps", "guidance"),
    [
        ("zimage_turbo_adapter", "Tongyi-MAI/Z-Image-Turbo", 8, 1.0),
        ("zimage_turbo", "Tongyi-MAI/Z-Image-Turbo", 8, 1.0),
        ("zimage_deturbo", "ostris/Z-Image-De-Turbo", 25, 3.0),
        ("zimage_base", "Tongyi-MAI/Z-Image", 30, 4.0),
    ],
)
def test_arch_sets_weights_and_sample_defaults(arch, weights, steps, guidance):
    cfg = c.JobConfig.model_validate({"job": {"name": "a"}, "model": {"arch": arch}, "datasets": [{"path": "d"}]})
    assert cfg.model.name_or_path == weights
    assert (cfg.sample.steps, cfg.sample.guidance) == (steps, guidance)
    assert (cfg.sample.resolved_steps(arch), cfg.sample.resolved_guidance(arch)) == (steps, guidance)
    assert (c.SampleSection().resolved_steps(arch), c.SampleSection().resolved_guidance(arch)) == (steps, guidance)


def test_explicit_values_beat_arch_defaults():
    cfg = c.JobConfig.model_validate(
        {
            "job": {"name": "a"},
            "model": {"arch": "zimage_base", "name_or_path": "me/zimage@v2"},
            "target": {"rank": 8, "alpha": 4},
            "datasets": [{"path": "d", "cache_dir": "/c"}],
            "sample": {"steps": 12, "guidance": 2.5},
        }
    )
    assert cfg.model.name_or_path == "me/zimage@v2"
    assert (cfg.target.alpha, cfg.target.resolved_alpha) == (4.0, 4.0)
    assert cfg.datasets[0].cache_dir == "/c"
    assert (cfg.sample.steps, cfg.sample.guidance) == (12, 2.5)


def test_arch_choices_are_the_registry():
    from zimage_lora.models.arch import ARCHS

    assert get_args(c.ArchName) == tuple(ARCHS)


def test_prompts_take_strings_or_mappings_and_inherit_the_section():
    cfg = c.JobConfig.model_validate(
        {
            "job": {"name": "a"},
            "model": {"arch": "zimage_deturbo"},
            "datasets": [{"path": "d"}],
            "sample": {"seed": 5, "width": 768, "prompts": ["plain", {"prompt": "own", "seed": 9, "lora_scale": 0.5}]},
        }
    )
    plain, own = cfg.sample.resolved_prompts("zimage_deturbo")
    assert (plain.prompt, plain.seed, plain.width, plain.height, plain.steps, plain.guidance) == (
        "plain",
        5,
        768,
        1024,
        25,
        3.0,
    )
    assert (plain.lora_scale, own.seed, own.lora_scale, own.width) == (1.0, 9, 0.5, 768)
    assert cfg.sample.prompts[0].seed is None  # the stored prompt keeps "same as the section"


def test_every_field_has_a_description_for_the_ui():
    def models(model: type[BaseModel], seen: set) -> None:
        seen.add(model)
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            for arg in [field.annotation, *get_args(field.annotation)]:
                if isinstance(arg, type) and issubclass(arg, BaseModel) and arg not in seen:
                    models(arg, seen)

    seen: set = set()
    models(c.JobConfig, seen)
    assert len(seen) >= 14  # every section was walked, including list items
    assert all(m.model_config.get("extra") == "forbid" for m in seen)
    assert "properties" in c.JobConfig.model_json_schema()


# ---------------------------------------------------------------------------------------------------------------
# Default target modules
# ---------------------------------------------------------------------------------------------------------------

TARGETED = [
    "layers.0.attention.to_q",
    "layers.0.attention.to_k",
    "layers.12.attention.to_v",
    "layers.29.attention.to_out.0",
    "layers.3.feed_forward.w1",
    "layers.3.feed_forward.w2",
    "layers.3.feed_forward.w3",
    "layers.7.adaLN_modulation.0",
]
NOT_TARGETED = [
    "noise_refiner.0.attention.to_q",
    "context_refiner.1.feed_forward.w1",
    "layers.0.attention.to_out.1",
    "layers.0.attention.norm_q",
    "layers.0.attention",
    "layers.0.adaLN_modulation.1",
    "layers.0.feed_forward.w1.lora_A",
    "xlayers.0.attention.to_q",
    "all_final_layer.2-1.linear",
    "t_embedder.mlp.0",
]


@pytest.mark.parametrize("name", TARGETED)
def test_default_targets_cover_main_block_linears(name):
    assert re.search(c.DEFAULT_TARGET_REGEX, name)


@pytest.mark.parametrize("name", NOT_TARGETED)
def test_default_targets_skip_everything_else(name):
    assert not re.search(c.DEFAULT_TARGET_REGEX, name)


# ---------------------------------------------------------------------------------------------------------------
# Schema errors: one line, starting with the key path
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"train": {"optimizer": "adam"}},
            "train.optimizer: 'adam' is not one of adamw8bit, adamw, adafactor, prodigy",
        ),
        ({"train": {"lr": "fast"}}, "train.lr: expected a number, got 'fast'"),
        ({"train": {"lr": 0}}, "train.lr: must be > 0"),
        ({"train": {"steps": 1.5}}, "train.steps: expected a whole number, got 1.5"),
        ({"train": {"compile": "maybe"}}, "train.compile: expected true or false, got 'maybe'"),
        ({"train": {"ema": {"decay": 1}}}, "train.ema.decay: must be < 1"),
        ({"train": {"ema": 3}}, "train.ema: expected a mapping"),
        ({"target": {"rank": 0}}, "target.rank: must be >= 1, got 0"),
        ({"target": {"modules": "(to_q"}}, "target.modules: not a valid Python regex"),
        ({"job": {"name": "my lora"}}, "job.name: 'my lora' is not allowed"),
        ({"job": {"name": "demo", "device": "gpu"}}, "job.device: 'gpu' is not allowed"),
        ({"job": {}}, "job.name: required but missing"),
        ({"model": {"layer_offload": 1.5, "training_adapter": ADAPTER}}, "model.layer_offload: must be <= 1"),
        ({"quantization": {"transformer": "fp4"}}, "quantization.transformer: 'fp4' is not one of none, float8"),
        ({"datasets": []}, "datasets: needs at least 1 item, got 0"),
        ({"datasets": [{"caption_ext": "txt"}]}, "datasets[0].path: required but missing"),
        ({"datasets": [{"path": "data", "resolutions": [512, 500]}]}, "datasets[0].resolutions[1]: must be a multiple"),
        ({"datasets": [{"path": "data", "resolutions": [32]}]}, "datasets[0].resolutions[0]: must be >= 64"),
        ({"datasets": [{"path": "data", "caption_dropout": 2}]}, "datasets[0].caption_dropout: must be <= 1"),
        ({"sample": {"width": 1000}}, "sample.width: must be a multiple of 16, got 1000"),
        ({"sample": {"prompts": ["ok", 5]}}, "sample.prompts[1]: expected a prompt (text) or a mapping"),
        ({"sample": {"prompts": [{"seed": 1}]}}, "sample.prompts[0].prompt: required but missing"),
        ({"version": 2}, "version: 2 is not one of 1"),
        ({"train": {"lr": float("inf")}}, "train.lr: expected a finite number"),
    ],
)
def test_schema_errors_name_the_key(tmp_path, change, expected):
    message = error_of(c.load_job, write_job(tmp_path, minimal(**change)))
    assert message.startswith(expected), message


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"train": {"lrr": 1}}, "train.lrr: unknown key (did you mean 'lr'?)"),
        ({"trian": {}}, "trian: unknown key (did you mean 'train'?)"),
        ({"datasets": [{"pth": "data"}]}, "datasets[0].pth: unknown key (did you mean 'path'?)"),
        (
            {"sample": {"prompts": [{"prompt": "x", "sed": 1}]}},
            "sample.prompts[0].sed: unknown key (did you mean 'seed'?)",
        ),
        ({"train": {"zzz": 1}}, "train.zzz: unknown key (allowed: batch_size, grad_accum"),
    ],
)
def test_unknown_keys_suggest_the_closest(tmp_path, change, expected):
    data = minimal()
    for section, value in change.items():
        data[section] = value if section == "datasets" or section not in data else {**data[section], **value}
    message = error_of(c.load_job, write_job(tmp_path, data))
    assert message.startswith(expected), message


def test_several_errors_report_the_first_and_count_the_rest(tmp_path):
    message = error_of(c.load_job, write_job(tmp_path, minimal(train={"lr": "fast", "steps": 0, "lrr": 1})))
    # Unknown keys come first (a typo is the usual cause of the other errors), then the schema order.
    assert message == "train.lrr: unknown key (did you mean 'lr'?) (+2 more)"
    # every problem, one line each, for the web UI's form
    with pytest.raises(ConfigError) as err:
        c.load_job(write_job(tmp_path, minimal(train={"lr": "fast", "steps": 0, "lrr": 1})))
    assert [p.split(":")[0] for p in err.value.problems] == ["train.lrr", "train.steps", "train.lr"]
    assert all("\n" not in p and "more)" not in p for p in err.value.problems)


def test_config_error_is_a_user_error():
    assert issubclass(ConfigError, UserError)


def test_parse_job_from_a_dict_gives_the_same_errors(tmp_path):
    make_dataset(tmp_path / "data")
    assert c.parse_job(minimal(), tmp_path).datasets[0].path == str(tmp_path / "data")
    assert error_of(c.parse_job, minimal(train={"lrr": 1}), tmp_path).startswith("train.lrr: unknown key")
    assert "top level must be a mapping" in error_of(c.parse_job, ["a"], tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# File errors
# ---------------------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    assert error_of(c.load_job, tmp_path / "nope.yaml") == f"job file not found: {tmp_path / 'nope.yaml'}"


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write_job(tmp_path, "job:\n  name: demo\ntrain:\n  lr: [1e-4\n  steps: 3\n")
    message = error_of(c.load_job, path)
    assert message.startswith(f"{path}: YAML syntax error at line "), message


def test_duplicate_keys_are_errors(tmp_path):
    path = write_job(tmp_path, "job:\n  name: demo\ntrain:\n  lr: 1.0e-4\n  lr: 1.0e-3\n")
    assert error_of(c.load_job, path) == f"{path}: YAML syntax error at line 5, column 3: duplicate key 'lr'"


def test_top_level_must_be_a_mapping(tmp_path):
    message = error_of(c.load_job, write_job(tmp_path, "- job\n- model\n"))
    assert "top level must be a mapping" in message and "got a list" in message


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_empty_file(tmp_path, text):
    assert "job file is empty" in error_of(c.load_job, write_job(tmp_path, text))


def test_empty_sections_count_as_defaults(tmp_path):
    text = yaml.safe_dump(minimal()) + "train:\nsample:\n"
    cfg = c.load_job(write_job(tmp_path, text))
    assert cfg.train.steps == 3000 and cfg.sample.steps == 8


def test_yaml_no_is_read_as_mixed_precision_no(tmp_path):
    cfg = c.load_job(write_job(tmp_path, yaml.safe_dump(minimal()) + "train:\n  mixed_precision: no\n"))
    assert cfg.train.mixed_precision == "no"


# ---------------------------------------------------------------------------------------------------------------
# Semantic checks
# ---------------------------------------------------------------------------------------------------------------


def test_dataset_folder_missing(tmp_path):
    path = write_job(tmp_path, minimal(datasets=[{"path": "data"}, {"path": "missing"}]))
    assert error_of(c.load_job, path) == f"datasets[1].path: folder not found: {tmp_path / 'missing'}"


def test_dataset_without_images(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("caption")
    path = write_job(tmp_path, minimal(datasets=[{"path": "empty"}]))
    assert error_of(c.load_job, path) == f"datasets[0].path: no images (png, jpg, webp, bmp) in {tmp_path / 'empty'}"


def test_dataset_with_images_only_in_sub_folders(tmp_path):
    make_dataset(tmp_path / "top" / "sub", "a.png")
    path = write_job(tmp_path, minimal(datasets=[{"path": "top"}]))
    assert "set recursive: true" in error_of(c.load_job, path)
    path = write_job(tmp_path, minimal(datasets=[{"path": "top", "recursive": True}]))
    assert c.load_job(path).datasets[0].recursive


@pytest.mark.parametrize("name", ["a.PNG", "b.jpeg", "c.Jpg", "d.webp", "e.BMP"])
def test_image_suffixes_in_any_case(tmp_path, name):
    make_dataset(tmp_path / "imgs", name)
    assert c.load_job(write_job(tmp_path, minimal(datasets=[{"path": "imgs"}]))).datasets[0].path.endswith("imgs")


def test_turbo_adapter_needs_the_training_adapter(tmp_path):
    message = error_of(c.load_job, write_job(tmp_path, minimal(model={})))
    assert message == (
        f"model.training_adapter: required for arch zimage_turbo_adapter; set it to {ADAPTER} or a local file"
    )


@pytest.mark.parametrize("arch", ["zimage_deturbo", "zimage_base", "zimage_turbo"])
def test_training_adapter_rejected_for_other_archs(tmp_path, arch):
    message = error_of(c.load_job, write_job(tmp_path, minimal(model={"arch": arch, "training_adapter": ADAPTER})))
    assert message.startswith("model.training_adapter: only used with arch zimage_turbo_adapter") and arch in message


def test_cache_text_embeddings_and_unload_text_encoder_conflict(tmp_path):
    data = minimal(train={"cache_text_embeddings": True, "unload_text_encoder": True})
    assert error_of(c.load_job, write_job(tmp_path, data)).startswith("train.unload_text_encoder: cannot be combined")


def test_dop_needs_a_trigger_word_and_a_class_word():
    cfg = c.JobConfig.model_validate(minimal(train={"dop": {"enabled": True}}))
    assert error_of(c.check_job, cfg, check_paths=False).startswith("train.dop.enabled: needs job.trigger_word")
    cfg.job.trigger_word = "sks"
    assert error_of(c.check_job, cfg, check_paths=False).startswith("train.dop.class_word: needed with DOP")
    cfg.train.dop.class_word = "fox"
    assert c.check_job(cfg, check_paths=False) == []


def test_raw_turbo_is_allowed_with_a_drift_warning(tmp_path, caplog):
    steps = {"steps": 2000}  # the guide's length for a dataset this small: no warning about steps
    with caplog.at_level(logging.WARNING, logger="zimage_lora.config"):
        cfg = c.load_job(write_job(tmp_path, minimal(model={"arch": "zimage_turbo"}, train=steps)))
    [warning] = c.check_job(cfg)
    assert "zimage_turbo_adapter" in warning and "distillation" in warning
    assert warning in caplog.text


def test_local_model_paths_must_exist(tmp_path):
    data = minimal(model={"arch": "zimage_base", "name_or_path": "./weights"})
    assert (
        error_of(c.load_job, write_job(tmp_path, data)) == f"model.name_or_path: folder not found: {tmp_path}/weights"
    )


def test_semantic_errors_report_the_first_and_count_the_rest(tmp_path):
    data = minimal(model={}, train={"cache_text_embeddings": True, "unload_text_encoder": True})
    message = error_of(c.load_job, write_job(tmp_path, data))
    assert message.startswith("model.training_adapter: required") and message.endswith("(+1 more)")
    with pytest.raises(ConfigError) as err:
        c.load_job(write_job(tmp_path, data))
    assert [p.split(":")[0] for p in err.value.problems] == ["model.training_adapter", "train.unload_text_encoder"]


# ---------------------------------------------------------------------------------------------------------------
# Not supported yet
# ---------------------------------------------------------------------------------------------------------------

TURNED_ON = {
    "quantization.transformer": "float8",
    "quantization.text_encoder": "nf4",
    "model.layer_offload": "0.5",
    "model.low_vram": "true",
    "train.compile": "true",
}


@pytest.mark.parametrize(("key", "value"), TURNED_ON.items())
def test_the_memory_and_speed_switches_are_accepted(tmp_path, key, value):
    path = write_job(tmp_path, minimal(job={"name": "demo", "trigger_word": "sks"}))
    cfg = c.load_job(path, [f"{key}={value}"])
    section, name = key.split(".")
    assert str(getattr(getattr(cfg, section), name)).lower() == value


# ---------------------------------------------------------------------------------------------------------------
# --set overrides
# ---------------------------------------------------------------------------------------------------------------


def test_overrides_are_typed(tmp_path):
    make_dataset(tmp_path / "other")
    cfg = c.load_job(
        write_job(tmp_path, minimal(sample={"prompts": ["x", "y"]})),
        [
            "train.lr=5e-5",
            "train.steps=10",
            "train.gradient_checkpointing=false",
            "train.mixed_precision=no",
            "train.ema.decay=0.99",
            "job.trigger_word=on",
            'sample.prompts=["a", "b"]',
            "sample.prompts.1.seed=7",
            "datasets.0.path=other",
            "datasets[0].resolutions=[256, 512]",
            "datasets.0.resolutions.1=1024",
            "target.alpha=null",
        ],
    )
    assert cfg.train.lr == 5e-5 and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 10 and cfg.train.gradient_checkpointing is False
    assert cfg.train.mixed_precision == "no" and cfg.train.ema.decay == 0.99
    assert cfg.job.trigger_word == "on"
    assert [p.prompt for p in cfg.sample.prompts] == ["a", "b"] and cfg.sample.prompts[1].seed == 7
    assert cfg.datasets[0].path == str(tmp_path / "other")
    assert cfg.datasets[0].resolutions == [256, 1024]
    assert cfg.target.alpha == 16.0


def test_override_of_optional_text_to_null(tmp_path):
    cfg = c.load_job(
        write_job(tmp_path, minimal(job={"name": "demo", "trigger_word": "sks"})), ["job.trigger_word=null"]
    )
    assert cfg.job.trigger_word is None


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lrr=1", "train.lrr: unknown key (did you mean 'lr'?) in --set train.lrr=1"),
        ("trian.lr=1", "trian: unknown key (did you mean 'train'?)"),
        ("datasets.3.path=/x", "datasets[3]: index out of range (the list has 1 item)"),
        ("datasets.path=/x", "datasets.path: expected a list index"),
        ("train.lr.x=1", "train.lr.x: unknown key"),
        ("train.lr", "--set 'train.lr': expected KEY=VALUE"),
        ("train.lr=fast", "train.lr: expected a number, got 'fast'"),
        ("sample.prompts=[a", "sample.prompts: cannot read --set value '[a'"),
    ],
)
def test_bad_overrides(tmp_path, override, expected):
    message = error_of(c.load_job, write_job(tmp_path, minimal()), [override])
    assert message.startswith(expected), message


def test_a_single_override_string_is_one_override():
    assert c.apply_overrides(minimal(), "train.steps=5")["train"] == {"steps": 5}


def test_overrides_do_not_change_the_input():
    data = minimal()
    c.apply_overrides(data, ["train.lr=1e-3", "datasets.0.path=x"])
    assert data == minimal()


# ---------------------------------------------------------------------------------------------------------------
# Paths are relative to the job file
# ---------------------------------------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_job_folder(tmp_path, monkeypatch):
    jobs = tmp_path / "jobs"
    make_dataset(jobs / "data")
    (jobs / "weights").mkdir()
    (jobs / "te").mkdir()
    (jobs / "adapter.safetensors").write_bytes(b"")
    data = minimal(
        job={"name": "demo", "output_dir": "../runs"},
        model={
            "name_or_path": "weights",
            "training_adapter": "./adapter.safetensors",
            "text_encoder_path": "te",
            "vae_path": "someone/vae@main",
        },
        train={"validation": {"images": ["held/out.png"]}},
        datasets=[{"path": "data"}, {"path": "./data", "cache_dir": "cache"}],
    )
    path = write_job(jobs, data, dataset=False)
    monkeypatch.chdir(tmp_path)  # anywhere but the job folder
    cfg = c.load_job(Path("jobs") / "job.yaml")
    assert cfg.job.output_dir == str(tmp_path / "runs")
    assert c.run_dir(cfg) == tmp_path / "runs" / "demo"
    assert cfg.model.name_or_path == str(jobs / "weights")
    assert cfg.model.training_adapter == str(jobs / "adapter.safetensors")
    assert cfg.model.text_encoder_path == str(jobs / "te")
    assert cfg.model.vae_path == "someone/vae@main"  # a hub id stays a hub id
    assert cfg.train.validation.images == [str(jobs / "held" / "out.png")]
    assert [d.path for d in cfg.datasets] == [str(jobs / "data")] * 2
    assert [d.cache_dir for d in cfg.datasets] == [str(jobs / "data" / ".zimage_cache"), str(jobs / "cache")]
    assert path.parent == jobs


def test_hub_ids_are_left_alone(tmp_path):
    data = minimal(model={"arch": "zimage_base", "name_or_path": "Tongyi-MAI/Z-Image-Turbo@abc"})
    assert c.load_job(write_job(tmp_path, data)).model.name_or_path == "Tongyi-MAI/Z-Image-Turbo@abc"


def test_absolute_paths_are_kept(tmp_path):
    make_dataset(tmp_path / "abs")
    cfg = c.load_job(write_job(tmp_path / "job", minimal(datasets=[{"path": str(tmp_path / "abs")}])))
    assert cfg.datasets[0].path == str(tmp_path / "abs")


# ---------------------------------------------------------------------------------------------------------------
# Writing YAML
# ---------------------------------------------------------------------------------------------------------------


def test_dump_then_load_gives_an_equal_config(tmp_path):
    data = minimal(
        job={"name": "demo", "trigger_word": "sks", "seed": 7},
        target={"rank": 8, "modules": r"^layers\.\d+\.attention\.to_q$"},
        train={"lr": 3e-5, "steps": 100, "optimizer": "prodigy", "lr_scheduler": "cosine"},
        datasets=[{"path": "data", "resolutions": [512], "repeats": 3, "caption_ext": ".caption"}],
        sample={"prompts": ["a [trigger]", {"prompt": "b", "seed": 3, "lora_scale": 0.7}], "negative_prompt": "blur"},
    )
    cfg = c.load_job(write_job(tmp_path / "one", data))
    text = c.dump_yaml(cfg)
    loaded = yaml.safe_load(text)
    assert list(loaded) == [
        "version",
        "job",
        "model",
        "quantization",
        "target",
        "save",
        "train",
        "datasets",
        "sample",
        "advanced",
    ]
    assert loaded["target"]["alpha"] == 8.0
    assert (loaded["sample"]["steps"], loaded["sample"]["guidance"]) == (8, 1.0)
    assert loaded["datasets"][0]["cache_dir"] == str(tmp_path / "one" / "data" / ".zimage_cache")
    assert loaded["datasets"][0]["caption_ext"] == "caption"
    assert loaded["sample"]["prompts"] == ["a [trigger]", {"prompt": "b", "seed": 3, "lora_scale": 0.7}]
    again = tmp_path / "two" / "job.yaml"
    again.parent.mkdir()
    again.write_text(text, encoding="utf-8")
    assert c.load_job(again) == cfg
    assert c.dump_yaml(c.load_job(again)) == text


def test_job_to_dict_validates_back():
    cfg = c.JobConfig.model_validate(minimal())
    assert c.JobConfig.model_validate(c.job_to_dict(cfg)) == cfg


# ---------------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------------


def test_shipped_presets_are_listed():
    assert {"turbo-adapter-v2", "turbo-adapter-v1", "deturbo"} <= set(c.preset_names())


@pytest.mark.parametrize("name", ["turbo-adapter-v2", "turbo-adapter-v1", "deturbo"])
def test_presets_validate(tmp_path, name):
    text = c.preset_yaml(name)
    cfg = c.load_job(write_job(tmp_path / "nodata", text, dataset=False), check_paths=False)
    assert (cfg.target.rank, cfg.train.lr, cfg.train.steps, cfg.train.optimizer) == (16, 1e-4, 3000, "adamw8bit")
    assert cfg.datasets[0].resolutions == [512, 768, 1024] and cfg.datasets[0].cache_latents
    assert (cfg.sample.width, cfg.sample.height, cfg.sample.every, cfg.save.every, cfg.save.keep) == (
        1024,
        1024,
        250,
        250,
        4,
    )
    prompts = [p.prompt for p in cfg.sample.prompts]
    assert sum("[trigger]" in p for p in prompts) == 4 and sum("[trigger]" not in p for p in prompts) == 2
    assert "leakage" in text
    assert cfg.job.trigger_word == "my_trigger"
    # Next to a real dataset the preset passes every check.
    make_dataset(tmp_path / "withdata" / "dataset")
    assert c.load_job(write_job(tmp_path / "withdata", text, dataset=False)).datasets[0].path.endswith("dataset")


@pytest.mark.parametrize(
    ("name", "adapter", "steps", "guidance"),
    [
        ("turbo-adapter-v2", ADAPTER, 8, 1.0),
        ("turbo-adapter-v1", ADAPTER.replace("_v2", "_v1"), 8, 1.0),
        ("deturbo", None, 25, 3.0),
    ],
)
def test_preset_models(tmp_path, name, adapter, steps, guidance):
    cfg = c.load_job_text(c.preset_yaml(name), tmp_path, check_paths=False)
    assert cfg.model.training_adapter == adapter
    assert (cfg.sample.steps, cfg.sample.guidance) == (steps, guidance)


@pytest.mark.parametrize("name", c.preset_names())
def test_every_preset_file_is_a_valid_job(tmp_path, name):
    # Any YAML file dropped into presets/ (the demo one too) is served and must pass the schema.
    cfg = c.load_job_text(c.preset_yaml(name), tmp_path, check_paths=False, source=name)
    assert c.load_job_text(c.dump_yaml(cfg), tmp_path, check_paths=False) == cfg


def test_unknown_preset():
    assert error_of(c.preset_yaml, "turbo-adapter-v3").startswith("unknown preset 'turbo-adapter-v3' (did you mean")


# ---------------------------------------------------------------------------------------------------------------
# Validating a job must not import torch
# ---------------------------------------------------------------------------------------------------------------


def test_validating_a_job_does_not_import_torch(tmp_path):
    path = write_job(tmp_path, minimal())
    code = textwrap.dedent(
        f"""
        import sys
        import zimage_lora.config as c
        c.load_job({str(path)!r}, ["train.lr=1e-5"])
        c.dump_yaml(c.load_job({str(path)!r}))
        assert "torch" not in sys.modules, "torch was imported"
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------------------------
# What validation catches before any model loads (the Design issue's defects)
# ---------------------------------------------------------------------------------------------------------------


def test_a_job_whose_images_fill_no_resolution_is_refused_at_its_resolutions(tmp_path):
    """The presets' 512/768/1024 with images of 200 px: `dataset check` says it cannot train, and now so does the
    job's validation (the web UI marks datasets[0].resolutions), with the largest resolution that would work."""
    from zimage_lora.data.check import check_dataset

    make_dataset(tmp_path / "data", size=200)
    path = write_job(tmp_path, minimal(), dataset=False)
    message = error_of(c.load_job, path)
    assert message == (
        "datasets[0].resolutions: no image is large enough for 512, 768, 1024 (the largest is 200x200); lower them "
        "to 208 or less, or add larger images"
    )
    assert check_dataset(tmp_path / "data", [512, 768, 1024]).trainable == 0  # the same verdict
    assert c.load_job(path, ["datasets[0].resolutions=[192]"]).datasets[0].resolutions == [192]
    (tmp_path / "data" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")  # only an unreadable file left
    assert error_of(c.load_job, path) == "datasets[0].resolutions: no readable image"


def test_high_learning_rates_and_long_runs_on_few_images_warn_with_the_guides_advice(tmp_path):
    path = write_job(tmp_path, minimal(train={"steps": 2000}))

    def warnings_of(*overrides):
        found: list[str] = []
        c.load_job(path, overrides, warnings=found)
        return found

    assert warnings_of() == []
    [lr] = warnings_of("train.lr=2e-4")
    assert lr.startswith("train.lr: 0.0002 is high for Z-Image") and "start at 1e-4" in lr
    assert warnings_of("train.optimizer=prodigy", "train.lr=1.0") == []  # prodigy's lr is a multiplier
    toy = tmp_path / "toy"  # a toy-world model folder (docs/toyworld.md) learns at larger rates: no warning
    toy.mkdir()
    (toy / "toy_world.json").write_text("{}")
    assert warnings_of("train.lr=2e-3", f"model.name_or_path={toy}") == []
    [steps] = warnings_of("train.steps=3000")
    assert steps.startswith("train.steps: 3000 steps on 1 image will likely overfit") and "1500-2200" in steps
    for index in range(10):
        make_dataset(tmp_path / "data", name=f"more_{index}.png")
    assert warnings_of("train.steps=3000") == []  # 11 images: the usual 3000 steps
    validated = subprocess.run(
        [sys.executable, "-m", "zimage_lora.cli", "validate", str(path), "--set", "train.lr=3e-4"],
        capture_output=True,
        text=True,
    )
    assert validated.returncode == 0 and "warning: train.lr: 0.0003 is high" in validated.stderr  # never refused


def test_the_adapter_presets_are_the_registrys_adapters():
    from zimage_lora.models.arch import ARCHS, TRAINING_ADAPTERS

    for adapter in TRAINING_ADAPTERS:
        preset = yaml.safe_load(c.preset_yaml(f"turbo-adapter-{adapter.version}"))
        assert preset["model"]["training_adapter"] == adapter.ref
        arch = ARCHS[preset["model"]["arch"]]
        assert adapter in arch.adapters and (preset["sample"]["steps"], preset["sample"]["guidance"]) == (
            arch.sample_steps,
            arch.sample_guidance,
        )
    v1 = c.preset_yaml("turbo-adapter-v1")
    assert "safe baseline" in v1 and "unstable" in v1  # the guide: go back to v1 when v2 training is unstable
    description = c.ModelSection.model_fields["training_adapter"].description
    assert "separate frozen branch" in description and "merged" not in description.replace("never merged", "")


def test_intervals_longer_than_the_run_warn_and_never_refuse(tmp_path):
    """A warmup, save.every or sample.every longer than the run: the job is valid, each says why it is unwise."""
    path = write_job(tmp_path, minimal(train={"steps": 100}, sample={"prompts": ["a fox"], "every": 50}))

    def warnings_of(*overrides):
        found: list[str] = []
        c.load_job(path, list(overrides), warnings=found)
        return found

    assert warnings_of("save.every=100", "train.warmup_steps=100") == []  # exactly the run: fine
    warmup, save, sample = warnings_of("train.warmup_steps=150", "save.every=500", "sample.every=101")
    assert warmup.startswith("train.warmup_steps: 150 is longer than the run (100 steps)") and "never reaches" in warmup
    assert save.startswith("save.every: 500 is longer than the run (100 steps)") and "only the final LoRA" in save
    assert sample.startswith("sample.every: 101 is longer than the run (100 steps)")
    assert warnings_of("save.every=50", "sample.every=500", "sample.enabled=false") == []  # no previews: no word
