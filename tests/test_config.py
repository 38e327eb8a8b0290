"""The configuration has one source: the schema in apex_ray/config.py, spelled out key for key in
configs/default.yaml; presets state only what differs from their base; every check is in the
schema, so load_config is the one gate every CLI passes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from apex_ray.config import Config, ConfigError, _flatten, load_config, read_config_tree

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PRESETS = sorted(p for p in CONFIGS.glob("*.yaml") if p.name != "default.yaml")


def flat(tree: dict) -> dict:
    return dict(_flatten(tree))


def test_default_yaml_is_the_schema_key_for_key():
    schema = flat(Config().model_dump(mode="json"))
    spelled = flat(read_config_tree(CONFIGS / "default.yaml"))
    assert sorted(set(schema) - set(spelled)) == [], "keys of Config() missing from configs/default.yaml"
    assert sorted(set(spelled) - set(schema)) == [], "keys in configs/default.yaml the schema lacks"
    assert {k: v for k, v in spelled.items() if schema[k] != v} == {}
    assert load_config(CONFIGS / "default.yaml") == Config()


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_preset_validates_and_states_only_what_differs_from_its_base(preset):
    load_config(preset, check_files=False)  # data paths in the presets are cluster placeholders
    own = yaml.safe_load(preset.read_text())
    base_name = own.pop("base", None)
    base = read_config_tree(preset.parent / base_name) if base_name else {}
    base_values = flat(Config.from_run(base).model_dump(mode="json"))
    repeated = {key: value for key, value in flat(own).items() if base_values.get(key) == value}
    assert repeated == {}, f"{preset.name} repeats what {base_name or 'the defaults'} already say"


def test_rank_64_preset_is_rank_32_with_one_change():
    r32 = flat(load_config(CONFIGS / "qwen_image_lora_r32.yaml", check_files=False).model_dump(mode="json"))
    r64 = flat(load_config(CONFIGS / "qwen_image_lora_r64.yaml", check_files=False).model_dump(mode="json"))
    assert {k for k in r32 if r32[k] != r64[k]} == {"model.lora.rank", "output_dir"}


def test_base_merges_sections_and_overrides_win(tmp_path):
    (tmp_path / "base.yaml").write_text("optim: {lr: 0.01, warmup_steps: 5}\ntrain: {steps: 7}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\noptim: {lr: 0.02}\n")
    config = load_config(tmp_path / "child.yaml", ["train.steps=9"])
    assert (config.optim.lr, config.optim.warmup_steps, config.train.steps) == (0.02, 5, 9)


def test_base_cycles_and_missing_bases_are_named(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="its own base"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml.*the base of"):
        load_config(tmp_path / "c.yaml")


@pytest.mark.parametrize("override, message", [
    ("model.backbone=sana-huge", "model.backbone: unknown preset 'sana-huge'"),
    ("model.text_encoder=t5", "model.text_encoder: unknown preset 't5'"),
    ("model.pretrained=bundled:nope", "unknown bundled model"),
    ("model.pretrained=/nonexistent/teacher", "model.pretrained: path '/nonexistent/teacher' does not exist"),
    ("objective.seed_buffer=/nonexistent/buffer", "objective.seed_buffer"),
    ("eval.score_nfe=[1,0]", "eval.score_nfe: every NFE must be >= 1"),
])
def test_every_check_is_in_the_schema(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(None, [override])


def test_uris_and_hub_ids_are_not_checked_as_paths_and_run_copies_skip_file_checks():
    config = load_config(None, ["data.source=prepared", "data.path=s3://bucket/prepared",
                                "objective.seed_buffer=s3://bucket/buffer",
                                "model.backbone=sana-600m", "model.text_encoder=gemma",
                                "model.pretrained=Efficient-Large-Model/Sana_600M_512px_diffusers"])
    assert config.data.path == "s3://bucket/prepared"
    with pytest.raises(ConfigError, match="data.path: prepared dataset '/nonexistent'"):
        load_config(None, ["data.source=prepared", "data.path=/nonexistent"])


def test_a_folder_that_is_not_a_prepared_set_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="is not a complete prepared set"):
        load_config(None, ["data.source=prepared", f"data.path={tmp_path}"])
    (tmp_path / "manifest.json").write_text("{}")
    assert load_config(None, ["data.source=prepared", f"data.path={tmp_path}"]).data.path == str(tmp_path)
    # A worker or an export re-reads the launched config where its files may not exist.
    tree = Config().model_dump(mode="json")
    tree["data"].update(source="prepared", path="/nonexistent")
    assert Config.from_run(tree).data.path == "/nonexistent"


def test_plan_cli_with_a_bad_backbone_is_an_error_not_a_traceback():
    proc = subprocess.run([sys.executable, "-m", "apex_ray.plan", "--gpus", "8", "model.backbone=sana-huge"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "model.backbone: unknown preset 'sana-huge'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_yaml_syntax_errors_are_config_errors_with_the_place(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim:\n  lr: [1e-4\ntrain: {steps: 3}\n")
    with pytest.raises(ConfigError, match=r"broken.yaml' is not valid YAML: .* at line \d+"):
        load_config(broken)
    with pytest.raises(ConfigError, match="optim.lr=\\[1e-4.*not valid YAML"):
        load_config(None, ["optim.lr=[1e-4"])
