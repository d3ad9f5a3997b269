"""Every numeric config value is range-checked at load time, with the value to change named."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from spinegrade.cli import main
from spinegrade.config import PACKAGE_CONFIG_DIR, Config, ConfigError, load_config
from spinegrade.config_checks import RULES, config_problems


def _numeric_fields(cls: type = Config, prefix: str = "") -> list[str]:
    """``section.key`` of every int/float field, or tuple of them, in the config tree."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _numeric_fields(tp, f"{f.name}.")
            continue
        leaves = {tp}
        while any(typing.get_origin(t) is tuple for t in leaves):
            leaves = {a for t in leaves for a in (typing.get_args(t) or (t,)) if a is not Ellipsis}
        if leaves & {int, float} and bool not in leaves:
            out.append(prefix + f.name)
    return out


def test_every_numeric_field_has_a_rule_and_every_rule_a_field():
    fields = _numeric_fields()
    assert "train.batch_size" in fields and "data.percentile_windows" in fields
    assert sorted(set(fields) - set(RULES)) == []  # a new numeric field needs a rule
    assert sorted(set(RULES) - set(fields)) == []


@pytest.mark.parametrize("name", sorted(p.stem for p in PACKAGE_CONFIG_DIR.glob("*.yaml")))
def test_packaged_configs_and_defaults_pass(name):
    assert config_problems(load_config(name)) == []
    assert config_problems(Config()) == []


@pytest.mark.parametrize("override, key", [
    ("train.batch_size=0", "train.batch_size"),
    ("data.img_size=0", "data.img_size"),
    ("train.epochs=-1", "train.epochs"),
    ("eval.min_recall=1.5", "eval.min_recall"),
    ("train.aug_scale=[1.2,0.8]", "train.aug_scale"),
    ("loss.class_weights=[1,0,4]", "loss.class_weights"),
    ("data.fold=5", "data.fold"),               # relation: fold < folds (5)
    ("train.freeze_epochs=30", "train.freeze_epochs"),
])
def test_out_of_range_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
        load_config("v8", [override])
    assert "--set" in str(e.value) or "--fold" in str(e.value)  # says what to do


def test_swa_start_after_the_last_epoch_says_which_value_to_change():
    with pytest.raises(ConfigError) as e:
        load_config("v8", ["train.epochs=10"])
    msg = str(e.value)
    assert "train.swa_start_epoch=20" in msg and "train.epochs=10" in msg
    assert "--set train.swa_start_epoch=9" in msg and "train.swa=false" in msg
    # Either fix resolves (SWA off needs no start epoch inside the run).
    load_config("v8", ["train.epochs=10", "train.swa_start_epoch=9"])
    load_config("v8", ["train.epochs=10", "train.swa=false"])


@pytest.mark.parametrize("argv", [
    ["train", "--cache", "{data}", "--out", "{out}", "--set", "train.batch_size=0"],
    ["prepare", "{data}", "--out", "{out}", "--set", "data.img_size=0"],
])
def test_cli_refuses_before_writing_anything(tmp_path, capsys, argv):
    (tmp_path / "data").mkdir()
    args = [a.format(data=tmp_path / "data", out=tmp_path / "out") for a in argv]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "out of range" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
