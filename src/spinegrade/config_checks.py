"""Range and relation checks of every numeric config value, run when a config is loaded.

:data:`RULES` gives each numeric field of the config tree (``section.key``) one check;
:data:`RELATIONS` checks values against each other (``swa_start_epoch <= epochs``). A
bad value fails at load time, before any work, with a message naming the value to change
and an example ``--set``, instead of a ZeroDivisionError an hour later. A new numeric field
needs a line here (tests/test_config_checks.py fails until it has one).

A leaf: the checks read attributes of whatever config object they are given, so
``config.py`` can call :func:`config_problems` without an import cycle. Also the allowed
values of the string options (:data:`CHOICES`, each the list its registry serves) and the
type check of a YAML value against its annotation (:func:`coerce`).
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from spinegrade import choices
from spinegrade.constants import CONDITIONS
from spinegrade.errors import ConfigError


@dataclass(frozen=True)
class Rule:
    """A check of one value: ``ok(value)`` and what a good value is (for the message)."""

    ok: Callable[[Any], bool]
    wanted: str
    example: str  # a good value as --set takes it (no spaces)


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def at_least(lo: float, example: str) -> Rule:
    return Rule(lambda v: _num(v) and v >= lo, f"a number >= {lo:g}", example)


def above(lo: float, example: str) -> Rule:
    return Rule(lambda v: _num(v) and v > lo, f"a number > {lo:g}", example)


def between(lo: float, hi: float, example: str, *, open_hi: bool = False) -> Rule:
    close = ")" if open_hi else "]"
    return Rule(lambda v: _num(v) and lo <= v and (v < hi if open_hi else v <= hi),
                f"a number in [{lo:g}, {hi:g}{close}", example)


FINITE = Rule(_num, "a finite number", "0.5")


def each(rule: Rule, n: int | None = None) -> Rule:
    """Every item of a tuple passes ``rule`` (and there are ``n`` of them)."""
    def ok(v: Any) -> bool:
        return (isinstance(v, tuple | list) and (n is None or len(v) == n) and len(v) > 0
                and all(rule.ok(x) for x in v))
    count = f"{n} values" if n else "values"
    return Rule(ok, f"{count}, each {rule.wanted}", rule.example)


def ordered_pair(lo: float, hi: float, example: str, *, strict: bool = True) -> Rule:
    """``(a, b)`` with ``lo <= a < b <= hi`` (``a <= b`` when not strict)."""
    def ok(v: Any) -> bool:
        return (isinstance(v, tuple | list) and len(v) == 2 and all(_num(x) for x in v)
                and lo <= v[0] and v[1] <= hi and (v[0] < v[1] if strict else v[0] <= v[1]))
    sign = "<" if strict else "<="
    return Rule(ok, f"two numbers lo {sign} hi within [{lo:g}, {hi:g}]", example)


def window() -> Rule:
    """``(center, width)`` with a positive width."""
    return Rule(lambda v: isinstance(v, tuple | list) and len(v) == 2 and all(_num(x) for x in v)
                and v[1] > 0, "(center, width) with width > 0", "[50,350]")


PERCENT_PAIR = ordered_pair(0, 100, "[1,99]")
FRACTION = between(0, 1, "0.5")
SCALE_RANGE = ordered_pair(1e-3, 100, "[0.9,1.1]", strict=False)

# One check per numeric field, by "section.key".
RULES: dict[str, Rule] = {
    "data.img_size": at_least(8, "224"),
    "data.n_slices": at_least(1, "7"),
    "data.crop_radius_scale": above(0, "0.75"),
    "data.crop_radius_mm": at_least(0, "30"),
    "data.soft_window": window(),
    "data.bone_window": window(),
    "data.percentile_windows": Rule(lambda v: isinstance(v, tuple | list) and len(v) > 0
                                    and all(PERCENT_PAIR.ok(p) for p in v),
                                    "pairs lo < hi within [0, 100]", "[[1,99],[5,99.8]]"),
    "data.file_window_fallback": PERCENT_PAIR,
    "data.clahe_clip_limit": at_least(0, "2.0"),
    "data.clahe_tile_grid": at_least(1, "8"),
    "data.folds": at_least(2, "5"),
    "data.fold": at_least(0, "0"),
    "data.split_seed": at_least(0, "42"),
    "data.num_workers": at_least(0, "2"),
    "data.jitter_mm": at_least(0, "2.0"),
    "data.jitter_px": at_least(0, "1.0"),
    "data.jitter_seed": at_least(0, "0"),
    "data.jitter_slices": Rule(lambda v: isinstance(v, tuple | list)
                               and (len(v) == 0 or (len(v) % 2 == 1 and all(_num(x) and x >= 0
                                                                           for x in v)
                                                    and sum(v) > 0)),
                               "an odd number of probabilities >= 0 (may be empty)",
                               "[0.1,0.8,0.1]"),
    "model.aggregator_hidden": at_least(1, "256"),
    "model.aggregator_heads": at_least(1, "4"),
    "model.centre_weight_init": FINITE,
    "model.level_embed_dim": at_least(1, "256"),
    "model.head_hidden": at_least(0, "0"),
    "model.dropout": between(0, 1, "0.3", open_hi=True),
    "model.drop_path_rate": between(0, 1, "0.1", open_hi=True),
    "model.prior_logits": each(FINITE, 3),
    "model.coral_prior_logits": each(FINITE, 2),
    "loss.class_weights": each(above(0, "[1,2,4]"), 3),
    "loss.focal_gamma": at_least(0, "1.5"),
    "loss.aux_weight": at_least(0, "0.2"),
    "loss.ordinal_weight": at_least(0, "0.1"),
    "loss.label_smoothing": between(0, 1, "0.05", open_hi=True),
    "train.epochs": at_least(1, "25"),
    "train.batch_size": at_least(1, "16"),
    "train.freeze_epochs": at_least(0, "2"),
    "train.frozen_head_lr": at_least(0, "3e-4"),
    "train.backbone_lr": at_least(0, "1e-5"),
    "train.head_lr": at_least(0, "1e-4"),
    "train.min_lr": at_least(0, "1e-6"),
    "train.weight_decay": at_least(0, "1e-2"),
    "train.grad_clip": at_least(0, "1.0"),
    "train.swa_start_epoch": at_least(1, "20"),
    "train.mixup_alpha": at_least(0, "0.2"),
    "train.aug_rotate_deg": between(0, 180, "10"),
    "train.aug_shift": between(0, 1, "0.05", open_hi=True),
    "train.aug_scale": SCALE_RANGE,
    "train.aug_brightness": between(0, 1, "0.1", open_hi=True),
    "train.aug_gamma": between(0, 1, "0.1", open_hi=True),
    "train.slice_jitter": at_least(0, "1"),
    "train.seed": at_least(0, "42"),
    "train.dead_class_patience": at_least(1, "2"),
    "train.dead_class_lr_boost": above(0, "10"),
    "train.lr_restart_epochs": at_least(1, "5"),
    "train.lr_restart_mult": at_least(1, "1"),
    "train.log_every": at_least(0, "20"),
    "eval.batch_size": at_least(1, "32"),
    "eval.tta_brightness": Rule(lambda v: isinstance(v, tuple | list)
                                and all(_num(x) and x > 0 for x in v),
                                "positive factors (may be empty)", "[0.9,1.1]"),
    "eval.tta_scales": Rule(lambda v: isinstance(v, tuple | list)
                            and all(_num(x) and x > 0 for x in v),
                            "positive factors (may be empty)", "[0.9,1.1]"),
    "eval.min_recall": FRACTION,
    "eval.calibration_bins": at_least(2, "10"),
    "eval.calibration_folds": Rule(lambda v: isinstance(v, int) and not isinstance(v, bool)
                                   and (v == 0 or v >= 2),
                                   "0 (judge in sample) or a whole number >= 2", "5"),
    "eval.min_recall_alarm": FRACTION,
    "eval.ba_spread_alarm": at_least(0, "0.05"),
    "eval.min_recall_by_epoch": at_least(1, "3"),
    "eval.ba_spread_max": at_least(0, "0.03"),
    "eval.ba_spread_window": at_least(1, "5"),
    "eval.normal_recall_range": ordered_pair(0, 1, "[0.75,0.85]", strict=False),
    "eval.normal_recall_alarm": FRACTION,
    "eval.loss_gap_max": at_least(0, "0.05"),
    "eval.loss_gap_alarm": at_least(0, "0.10"),
    "eval.minority_recall_target": FRACTION,
    "eval.minority_recall_alarm": FRACTION,
    "localizer.img_size": at_least(16, "256"),
    "localizer.n_context_slices": at_least(1, "3"),
    "localizer.intensity_percentiles": PERCENT_PAIR,
    "localizer.heatmap_stride": at_least(1, "4"),
    "localizer.heatmap_sigma": above(0, "2.0"),
    "localizer.max_stride": at_least(1, "32"),
    "localizer.decoder_channels": at_least(1, "64"),
    "localizer.neighbour_radius": at_least(0, "2"),
    "localizer.random_negatives": at_least(0, "2"),
    "localizer.aug_rotate_deg": between(0, 180, "8"),
    "localizer.aug_scale": SCALE_RANGE,
    "localizer.aug_shift": between(0, 1, "0.06", open_hi=True),
    "localizer.epochs": at_least(1, "20"),
    "localizer.samples_per_epoch": at_least(0, "0"),
    "localizer.batch_size": at_least(1, "8"),
    "localizer.lr": above(0, "3e-4"),
    "localizer.min_lr": at_least(0, "1e-6"),
    "localizer.weight_decay": at_least(0, "1e-4"),
    "localizer.val_fraction": between(0, 1, "0.2", open_hi=True),
    "localizer.val_from_epoch": at_least(1, "1"),
    "localizer.seed": at_least(0, "42"),
    "localizer.refine_radius": at_least(0, "2"),
    "localizer.min_score": FRACTION,
    "predict.batch_size": at_least(1, "32"),
    "predict.min_location_score": Rule(lambda v: _num(v) and v <= 1,
                                       "a number <= 1 (< 0: the localizer run's min_score)",
                                       "0.05"),
    "predict.localizer_shifts": Rule(lambda v: isinstance(v, tuple | list) and len(v) > 0
                                     and all(_num(x) and abs(x) < 0.5 for x in v),
                                     "fractions of the image side in (-0.5, 0.5), at least one",
                                     "[0,0.125,-0.125]"),
    "predict.prior_mix": Rule(lambda v: _num(v) and v <= 1,
                              "a number <= 1 (< 0: the weight each run chose out of fold)",
                              "0.1"),
}


def _get(cfg: Any, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


# (check, message) over the whole config; the message says which value to change.
RELATIONS: tuple[tuple[Callable[[Any], bool], Callable[[Any], str]], ...] = (
    (lambda c: not c.train.swa or c.train.swa_start_epoch <= c.train.epochs,
     lambda c: f"train.swa_start_epoch={c.train.swa_start_epoch} is after the last epoch "
               f"(train.epochs={c.train.epochs}): SWA averages epochs swa_start_epoch..epochs. "
               f"Lower it too, e.g. --set train.swa_start_epoch={max(1, c.train.epochs - 1)}, "
               "or turn SWA off with --set train.swa=false"),
    (lambda c: c.train.freeze_epochs <= c.train.epochs,
     lambda c: f"train.freeze_epochs={c.train.freeze_epochs} exceeds train.epochs="
               f"{c.train.epochs}; lower it, e.g. --set train.freeze_epochs="
               f"{min(2, c.train.epochs)}"),
    (lambda c: c.data.fold < c.data.folds,
     lambda c: f"data.fold={c.data.fold} must be below data.folds={c.data.folds} (folds are "
               f"0-based); use --fold 0..{c.data.folds - 1}"),
    (lambda c: c.localizer.max_stride >= c.localizer.heatmap_stride,
     lambda c: f"localizer.max_stride={c.localizer.max_stride} is below "
               f"localizer.heatmap_stride={c.localizer.heatmap_stride}; raise max_stride"),
)


def config_problems(cfg: Any) -> list[str]:
    """Every rule and relation ``cfg`` breaks, one message each (empty when all is well)."""
    out = []
    for key, rule in RULES.items():
        value = _get(cfg, key)
        if not rule.ok(value):
            shown = list(value) if isinstance(value, tuple) else value
            out.append(f"{key}={shown!r} is out of range: expected {rule.wanted}, e.g. "
                       f"--set {key}={rule.example}")
    if out:  # relations between broken values would only repeat them
        return out
    return [message(cfg) for check, message in RELATIONS if not check(cfg)]


# Allowed values of the string options; checked when a config is built. Each list is the
# one its registry serves (spinegrade.choices).
CHOICES: dict[str, tuple[str, ...]] = {
    "data.condition": CONDITIONS,
    "data.window_preset": choices.WINDOW_PRESETS,
    "data.window_channels": choices.WINDOW_CHANNELS,
    "data.resize_interpolation": choices.RESIZE_INTERPOLATIONS,
    "data.coordinates": choices.COORDINATE_SOURCES,
    "data.jitter_distribution": choices.JITTER_DISTRIBUTIONS,
    "model.input_mode": choices.INPUT_MODES,
    "model.aggregator": choices.AGGREGATORS,
    "model.level_conditioning": choices.LEVEL_CONDITIONINGS,
    "model.slice_channel": choices.SLICE_CHANNELS,
    "model.head": choices.HEADS,
    "model.bias_init": choices.BIAS_INITS,
    "model.head_init": choices.HEAD_INITS,
    "model.stem_init": choices.STEM_INITS,
    "loss.name": choices.LOSSES,
    "loss.focal_form": choices.FOCAL_FORMS,
    "train.sampler": choices.SAMPLERS,
    "train.lr_schedule": choices.LR_SCHEDULES,
    "train.select_metric": choices.SELECT_METRICS,
    "train.dead_class_action": choices.DEAD_CLASS_ACTIONS,
    "eval.calibration": choices.CALIBRATION_METHODS,
    "predict.fallback": choices.PREDICT_FALLBACKS,
    "predict.checkpoint": choices.PREDICT_CHECKPOINTS,
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert lists to tuples, ints to floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return coerce(value, arg, where)
            except ConfigError:
                continue  # the next member of the union may fit
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list ({_type_name(tp)}), got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}: {value!r}")
        return tuple(coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {tp}")
