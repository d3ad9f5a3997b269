"""Config loading, inheritance, overrides and errors."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from spinegrade import choices
from spinegrade.cli import main
from spinegrade.config import (
    PACKAGE_CONFIG_DIR,
    Config,
    ConfigError,
    config_from_dict,
    config_to_yaml,
    load_config,
    save_config,
)
from spinegrade.data.preprocess import INTERPOLATIONS
from spinegrade.engine.train import SELECT_METRICS


def test_v8_resolves_to_the_seed_plan():
    cfg = load_config("configs/v8.yaml")
    # The plan's numbers, written here independently of configs/v8.yaml.
    assert cfg.data.n_slices == 7
    assert cfg.data.crop_radius_scale == 0.75
    assert cfg.data.soft_window == (50.0, 350.0)
    assert cfg.data.bone_window == (400.0, 2000.0)
    assert cfg.data.window_preset == "fixed"
    assert cfg.model.backbone == "tf_efficientnetv2_s"
    assert cfg.model.pretrained is True
    assert cfg.model.input_mode == "slices"
    assert cfg.model.aggregator == "softmax_weights"
    assert cfg.model.centre_weight_init == 1.0
    assert cfg.model.level_conditioning == "embedding"
    assert cfg.model.level_embed_dim == 256
    assert cfg.model.prior_logits == (2.0, -2.5, -3.0)
    assert cfg.loss.name == "weighted_ce"
    assert cfg.loss.class_weights == (1.0, 2.0, 4.0)
    assert cfg.train.sampler == "shuffle"
    assert cfg.train.mixup_alpha == 0.0
    assert cfg.train.freeze_epochs == 2
    assert cfg.train.frozen_head_lr == 3e-4
    assert cfg.train.backbone_lr == 1e-5
    assert cfg.train.head_lr == 1e-4
    assert cfg.train.min_lr == 1e-6
    assert cfg.train.grad_clip == 1.0
    assert cfg.train.swa is True
    assert (cfg.train.swa_start_epoch, cfg.train.epochs) == (20, 25)
    assert cfg.eval.tta is True


def test_v8_file_matches_dataclass_defaults():
    """v8.yaml spells out the defaults: nothing in it silently disagrees with config.py."""
    assert load_config("configs/v8.yaml") == dataclasses.replace(Config(), description=load_config(
        "configs/v8.yaml").description)


def test_packaged_config_by_name_and_inheritance():
    demo = load_config("demo")
    v8 = load_config("v8")
    assert demo.name == "demo"
    assert demo.model.backbone != v8.model.backbone
    # Keys demo.yaml does not touch come from v8.yaml.
    assert demo.data.soft_window == v8.data.soft_window
    assert demo.train.grad_clip == v8.train.grad_clip


def test_overrides_parse_types():
    cfg = load_config("v8", ["train.epochs=3", "train.swa_start_epoch=3", "train.head_lr=1e-3", "model.pretrained=false",
                             "eval.tta_scales=[0.8, 1.2]", "data.condition=left_subarticular_stenosis"])
    assert cfg.train.epochs == 3
    assert cfg.train.head_lr == pytest.approx(1e-3)
    assert cfg.model.pretrained is False
    assert cfg.eval.tta_scales == (0.8, 1.2)
    assert cfg.data.condition == "left_subarticular_stenosis"


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert load_config("v8", ["train.grad_clip=2"]).train.grad_clip == 2.0
    with pytest.raises(ConfigError, match=r"train\.epochs: expected an integer"):
        load_config("v8", ["train.epochs=2.5"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epoch=3", r"unknown key 'train\.epoch'.*Did you mean 'epochs'"),
        ("trian.epochs=3", r"unknown key 'trian'"),
        ("train.epochs=abc", r"train\.epochs: expected an integer, got 'abc'"),
        ("model.pretrained=maybe", r"model\.pretrained: expected true/false"),
        ("model.aggregator=lstm", r"'lstm' is not one of"),
        ("data.soft_window=[1, 2, 3]", r"expected 2 values"),
        ("train.epochs", r"must look like section\.key=value"),
        ("train.epochs.x=1", r"'epochs' is not a section|train\.epochs: expected an integer"),
    ],
)
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("v8", [override])


def test_bad_yaml_files(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="inheritance loop"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "unknown.yaml").write_text("training:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'training'"):
        load_config(tmp_path / "unknown.yaml")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_user_config_inherits_from_packaged_by_relative_path(tmp_path):
    (tmp_path / "mine.yaml").write_text(
        f"base: {PACKAGE_CONFIG_DIR / 'v8.yaml'}\nname: mine\ntrain:\n  epochs: 7\n  swa_start_epoch: 6\n")
    cfg = load_config(tmp_path / "mine.yaml", ["train.batch_size=4"])
    assert (cfg.name, cfg.train.epochs, cfg.train.batch_size) == ("mine", 7, 4)
    assert cfg.train.head_lr == 1e-4


def test_round_trip_through_saved_yaml(tmp_path):
    cfg = load_config("demo", ["train.epochs=5", "train.swa_start_epoch=4"])
    path = save_config(cfg, tmp_path)
    assert config_from_dict(yaml.safe_load(path.read_text())) == cfg
    assert config_to_yaml(cfg) == path.read_text()


def test_config_is_frozen():
    cfg = load_config("v8")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 1  # type: ignore[misc]


def test_cli_prints_resolved_config(capsys):
    assert main(["config", "--config", "demo", "--set", "train.epochs=4", "--set",
                 "train.swa_start_epoch=4"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["epochs"] == 4
    assert printed["name"] == "demo"


def test_cli_reports_config_errors_without_traceback(capsys):
    assert main(["config", "--set", "train.epoch=4"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'train.epoch'" in err
    assert "Traceback" not in err


def test_other_registries_serve_the_names_config_validates():
    assert tuple(INTERPOLATIONS) == choices.RESIZE_INTERPOLATIONS
    assert tuple(SELECT_METRICS) == choices.SELECT_METRICS


@pytest.mark.parametrize("version, freeze", [("v4", 0), ("v5", 1), ("v6", 2), ("v7", 3)])
def test_config_diff_shows_each_plan_difference_with_the_plans_words(version, freeze, capsys):
    assert main(["config", "--config", f"configs/{version}.yaml", "--diff"]) == 0
    lines = {ln.split(":")[0]: ln for ln in capsys.readouterr().out.splitlines()[1:]}
    expected = {  # the plan's account of v4-v7, written here independently of the YAML
        "data.crop_radius_scale": ("0.75 -> 0.5", "radius img_size // 2"),
        "data.window_channels": ("'three' -> 'single'", "a single intensity window"),
        "train.batch_size": ("16 -> 8", "at batch size 8"),
        "train.sampler": ("'shuffle' -> 'weighted'", "WeightedRandomSampler (replacement)"),
        "train.mixup_alpha": ("0.0 -> 0.4", '"mixup"'),
        "train.lr_schedule": ("'cosine' -> 'cosine_restarts'", "cosine with warm restarts"),
        "model.head_init" if version != "v6" else "model.head":
            ("'prior' -> 'random'", "random or ordinal head initialisation") if version != "v6"
            else ("'softmax' -> 'coral'", ""),
    }
    if freeze != 2:
        expected["train.freeze_epochs"] = (f"2 -> {freeze}", "0-3 frozen epochs")
    if version == "v7":
        expected["model.stem_init"] = ("'adapt' -> 'rgb_plus_random'",
                                       "threw away the pretrained weights of 4 channels")
    for key, (change, words) in expected.items():
        assert change in lines[key], (key, lines.get(key))
        assert words in lines[key], (key, lines[key])
        if words:
            assert "# plan: " in lines[key] or "(plan: " in lines[key]
    # The v8-only emergency action is off for the old versions.
    assert "'reset_bias_boost' -> 'warn'" in lines["train.dead_class_action"]
