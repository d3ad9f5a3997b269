"""The typed configuration tree: YAML files plus ``section.key=value`` overrides.

One frozen dataclass per section. A YAML file may name a parent with ``base: other.yaml``
(resolved relative to the file); its keys then override the parent's. Unknown keys and
values of the wrong type raise :class:`ConfigError` naming the key and what was expected;
so do numbers out of range and values that contradict each other (``config_checks``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from spinegrade.config_checks import CHOICES, coerce, config_problems
from spinegrade.constants import (
    AXIAL_T2,
    CLASS_WEIGHTS,
    CONDITIONS,
    CORAL_PRIOR_LOGITS,
    PRIOR_LOGITS,
    SAGITTAL_T1,
    SAGITTAL_T2,
)
from spinegrade.errors import ConfigError
from spinegrade.io.atomic import atomic_write_text

PACKAGE_CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class DataConfig:
    """Which labels to use and how DICOM slices become crops (the cache key)."""

    condition: str = CONDITIONS[0]  # spinal canal stenosis
    img_size: int = 224
    n_slices: int = 7
    # Crop half-width in native pixels = crop_radius_scale * img_size ...
    crop_radius_scale: float = 0.75
    # ... unless crop_radius_mm > 0, then the half-width is this many mm (via PixelSpacing).
    crop_radius_mm: float = 0.0
    # "fixed": the seed's CT-style windows; "percentile": per-slice intensity percentiles.
    window_preset: str = "fixed"
    soft_window: tuple[float, float] = (50.0, 350.0)  # (center, width)
    # "three": the preset's three windows as RGB (v8); "single": its first window repeated
    # on all three channels (v4-v7, which the plan says used one intensity window).
    window_channels: str = "three"
    bone_window: tuple[float, float] = (400.0, 2000.0)
    # Percentile windows (low, high) for the "percentile" preset's first two channels.
    percentile_windows: tuple[tuple[float, float], ...] = ((1.0, 99.0), (5.0, 99.8))
    # Used for the third channel when a file carries no WindowCenter/WindowWidth.
    file_window_fallback: tuple[float, float] = (0.5, 99.5)
    clahe_clip_limit: float = 2.0
    clahe_tile_grid: int = 8
    # cv2 interpolation for crop -> img_size: "area" (INTER_AREA, anti-aliased when shrinking,
    # the usual case: 336 native px -> 224) or "linear" (INTER_LINEAR).
    resize_interpolation: str = "area"
    # Train on the crops prediction sees (data/jitter.py, docs/preprocessing.md): crops on
    # the "labels" or on "predicted" points (coordinates_csv: train_label_coordinates
    # format or predict's locations.csv), plus a placement error while preparing: per axis
    # jitter_mm (via PixelSpacing) + jitter_px, normal (std) or uniform (half-width); the
    # centre slice moved by -k..k with probabilities jitter_slices (odd length).
    coordinates: str = "labels"
    coordinates_csv: str = ""
    jitter_mm: float = 0.0
    jitter_px: float = 0.0
    jitter_distribution: str = "normal"
    jitter_slices: tuple[float, ...] = ()
    jitter_seed: int = 0
    folds: int = 5
    fold: int = 0
    # Seed of the fold split, apart from train.seed: seeds of one fold share its studies.
    # 42 = the train.seed default, which made the split before, so old runs keep theirs.
    split_seed: int = 42
    num_workers: int = 2


@dataclass(frozen=True)
class ModelConfig:
    """Network architecture; the model factory turns this into explicit arguments."""

    backbone: str = "tf_efficientnetv2_s"
    pretrained: bool = True
    pretrained_path: str = ""
    # "slices": shared 2D backbone over each slice (v4-v6, v8); "channels": 2.5D stem (v7).
    input_mode: str = "slices"
    # softmax_weights (v8) | bilstm_attn_mean (v4) | bigru_attn (v5/v6) | attention_mil
    # | bilstm_attention (1st place RSNA 2024) | none (v7: slices are channels)
    aggregator: str = "softmax_weights"
    aggregator_hidden: int = 256
    # Self-attention heads of the v4 aggregator (bilstm_attn_mean).
    aggregator_heads: int = 4
    centre_weight_init: float = 1.0
    # input_mode=channels: each slice's channel is its "first" window or the "mean" of the 3.
    slice_channel: str = "mean"
    # embedding (v8, concatenated) | film (v5/v6) | none
    level_conditioning: str = "embedding"
    level_embed_dim: int = 256
    # softmax (3 logits) | coral (2 ordinal logits)
    head: str = "softmax"
    head_hidden: int = 0
    dropout: float = 0.3
    drop_path_rate: float = 0.0
    # fixed: prior_logits / coral_prior_logits; log_prior: from the training labels; zero.
    bias_init: str = "fixed"
    prior_logits: tuple[float, ...] = PRIOR_LOGITS
    coral_prior_logits: tuple[float, ...] = CORAL_PRIOR_LOGITS
    # prior: final layer weights std 1e-3, bias = bias_init (v8); random: nn.Linear's default
    # initialisation of weights and bias (v4, v5, v7); bias_init is still the dead-class reset.
    head_init: str = "prior"
    # input_mode=channels with pretrained weights: adapt (RGB filters repeated over the 7
    # channels) | rgb_plus_random (v7: channels 3-6 lose their pretrained filters).
    stem_init: str = "adapt"
    # v4: auxiliary heads (level and centre-slice-offset prediction).
    aux_heads: bool = False
    grad_checkpointing: bool = False


@dataclass(frozen=True)
class LossConfig:
    """Training objective."""

    # weighted_ce | coral_ce (v6) | focal_ordinal (v7)
    name: str = "weighted_ce"
    class_weights: tuple[float, ...] = CLASS_WEIGHTS
    use_class_weights: bool = True
    # 0 disables focal modulation; the plan's optional value is 1.5.
    focal_gamma: float = 0.0
    # textbook: (1 - p_y)^gamma on the class-weighted CE; plan: the plan's snippet,
    # pt = exp(-weighted CE) = p_y^w, so (1 - p_y^w)^gamma (docs/models.md).
    focal_form: str = "textbook"
    aux_weight: float = 0.0
    ordinal_weight: float = 0.0
    label_smoothing: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation schedule, sampling, augmentation and run-time settings."""

    epochs: int = 25
    batch_size: int = 16
    freeze_epochs: int = 2
    frozen_head_lr: float = 3e-4
    backbone_lr: float = 1e-5
    head_lr: float = 1e-4
    min_lr: float = 1e-6
    # cosine: one decay over fine-tuning (v8); cosine_restarts: SGDR warm restarts, the first
    # cycle lr_restart_epochs long, each next one lr_restart_mult times longer (v4-v7).
    lr_schedule: str = "cosine"
    lr_restart_epochs: int = 5
    lr_restart_mult: int = 1
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    swa: bool = True
    swa_start_epoch: int = 20  # 1-based; SWA averages epochs swa_start_epoch..epochs
    # shuffle (v8) | weighted (WeightedRandomSampler, v4-v6)
    sampler: str = "shuffle"
    mixup_alpha: float = 0.0
    augment: bool = True
    aug_rotate_deg: float = 10.0
    aug_shift: float = 0.05
    aug_scale: tuple[float, float] = (0.9, 1.1)
    aug_brightness: float = 0.1
    aug_gamma: float = 0.1
    # Shift the centre slice by up to this many slices, to match stage-1 localizer error.
    slice_jitter: int = 0
    amp: bool = True
    channels_last: bool = True
    seed: int = 42
    deterministic: bool = False
    device: str = "auto"
    select_metric: str = "balanced_accuracy"
    # After dead_class_patience consecutive epochs with no prediction of some class:
    # reset_bias_boost (head bias -> prior, head LR x dead_class_lr_boost for one epoch)
    # | reset_bias | warn | stop. See docs/models.md "Dead-class action".
    dead_class_action: str = "reset_bias_boost"
    dead_class_patience: int = 2
    dead_class_lr_boost: float = 10.0
    log_every: int = 20


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation, TTA and the health table's thresholds."""

    batch_size: int = 32
    tta: bool = True
    tta_brightness: tuple[float, ...] = (0.9, 1.1)
    tta_scales: tuple[float, ...] = (0.9, 1.1)
    # The plan's "Metrics to watch" (engine/monitor.py): healthy range, then alarm.
    min_recall: float = 0.30  # min class recall > 30% by epoch 3 ...
    min_recall_by_epoch: int = 3
    min_recall_alarm: float = 0.0  # ... alarm: 0% recall for any class at any epoch
    ba_spread_max: float = 0.03  # BA stable within 3% over the last 5 epochs ...
    ba_spread_alarm: float = 0.05  # ... alarm: swings > 5% (unstable)
    ba_spread_window: int = 5
    normal_recall_range: tuple[float, float] = (0.75, 0.85)
    normal_recall_alarm: float = 0.90  # collapsing to the majority class
    loss_gap_max: float = 0.05
    loss_gap_alarm: float = 0.10  # overfitting
    minority_recall_target: float = 0.50  # Moderate and Severe, each
    minority_recall_alarm: float = 0.30
    # Fitted on oof.csv after training into calibration.json (engine/calibrate.py): none |
    # temperature | temperature_bias; with calibration_prior_mix also the prior's weight.
    calibration: str = "temperature"
    calibration_prior_mix: bool = True
    calibration_bins: int = 10
    # Each calibration stage is kept only if it lowers the out-of-fold loss cross-fitted over
    # this many folds of the studies (fit on the others, score the held-out one) by more than
    # one standard error of the per-sample differences; 0 judges it
    # on the samples it was fitted on (the in-sample fit, optimistic on small sets).
    calibration_folds: int = 5


@dataclass(frozen=True)
class LocalizerConfig:
    """Stage-1 localizer: which slice and which (x, y) for each level."""

    backbone: str = "resnet18"
    pretrained: bool = True
    pretrained_path: str = ""
    # Series types to localise (SERIES_DESCRIPTIONS); each gets its own heatmap network with
    # one channel per (condition, level) that CONDITION_SERIES assigns to it.
    series: tuple[str, ...] = (SAGITTAL_T2, SAGITTAL_T1, AXIAL_T2)
    img_size: int = 256
    n_context_slices: int = 3
    # Per-series intensity percentiles mapped to [0, 1] before the network.
    intensity_percentiles: tuple[float, float] = (0.5, 99.5)
    heatmap_stride: int = 4
    heatmap_sigma: float = 2.0  # in heatmap cells
    max_stride: int = 32
    decoder_channels: int = 64
    # Training slices per series: labelled slices +- neighbour_radius (hard negatives) plus
    # random_negatives other slices drawn afresh each epoch.
    neighbour_radius: int = 2
    random_negatives: int = 2
    # At most this many of those (series, slice) samples per epoch and task, a fresh random
    # subset each epoch (0: all): bounds an epoch's cost whatever the dataset size (CPU).
    samples_per_epoch: int = 0
    augment: bool = True
    aug_rotate_deg: float = 8.0
    aug_scale: tuple[float, float] = (0.9, 1.1)
    # Shifts up to 15% of the side: how much spine is in view above L1/L2 and below L5/S1
    # varies between scanners and studies, and the level channels must count discs rather
    # than learn where in the frame L5/S1 usually sits (0.05 left 12% of held-out
    # synthetic Sagittal T2 points on a neighbouring disc when the sacrum was half cut off).
    aug_shift: float = 0.15
    epochs: int = 20
    batch_size: int = 8
    lr: float = 3e-4
    min_lr: float = 1e-6
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    # Held-out evaluation (and best-checkpoint choice) from this epoch on, and always at the
    # last: the early, high-learning-rate epochs are rarely the best, and on CPU judging the
    # held-out series costs about a sixth of an epoch.
    val_from_epoch: int = 1
    seed: int = 42
    device: str = "auto"
    # Soft-argmax window half-width (heatmap cells) around the peak.
    refine_radius: int = 2
    # Sagittal series: assign each condition's 5 levels to 5 consecutive discs along the
    # spine (best summed score) instead of taking each level's own maximum.
    ordered_levels: bool = True
    # A keypoint whose best peak (sigmoid) is below this is reported as not located.
    min_score: float = 0.01


@dataclass(frozen=True)
class PredictConfig:
    """Inference on new studies."""

    batch_size: int = 32
    tta: bool = True
    # Levels that cannot be located, and conditions without a classifier, get the priors.
    fallback: str = "prior"
    # Classifier checkpoint to use from each run folder: final (the one final.json names:
    # SWA when it ran, the model the out-of-fold scores describe) | best | last | swa;
    # falls back to the others when absent.
    checkpoint: str = "final"
    # Priors times CLASS_WEIGHTS [1, 2, 4], renormalised: the constant that minimises the
    # competition's weighted log loss (and what a class-weighted classifier outputs).
    prior_reweight: bool = True
    # Peak score under which a level counts as not located; < 0: the localizer run's
    # localizer.min_score.
    min_location_score: float = -1.0
    # Weight of the prior mixed into every model prediction: bounds the log loss of a
    # confident miss (e.g. a crop on the wrong disc); 0 keeps the model's output; < 0: the
    # weight each classifier run chose on its out-of-fold data (calibration.json), else 0.
    prior_mix: float = -1.0
    # Apply each run's calibration.json (temperature, bias) to its probabilities.
    calibrate: bool = True
    # Refuse what is not a lumbar spine: a series whose header names other anatomy is not
    # used, and a condition whose located discs are no lumbar disc chain (or disagree across
    # series) is not graded: its rows get the prior, with the reason in problems.csv.
    check_anatomy: bool = True
    # Framings the localizer's heatmaps are averaged over: row shifts of its input as
    # fractions of the image side (moved back by whole heatmap cells); (0,) is one view.
    # Which disc is which can hinge on what sits at the image edge (docs/localizer.md).
    localizer_shifts: tuple[float, ...] = (0.0, 0.125, -0.125)
    device: str = "auto"
    figures: bool = True


@dataclass(frozen=True)
class Config:
    """The whole tree; saved as ``config.yaml`` in every output folder."""

    name: str = "v8"
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    localizer: LocalizerConfig = field(default_factory=LocalizerConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)



# --- loading ---------------------------------------------------------------------------------


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    """Instantiate dataclass ``cls`` from a plain dict, validating every key."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown key '{path}'.{hint} Valid keys: {', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, path)
        else:
            kwargs[key] = coerce(value, tp, path)
            if path in CHOICES and kwargs[key] not in CHOICES[path]:
                raise ConfigError(
                    f"{path}: '{kwargs[key]}' is not one of: {', '.join(CHOICES[path])}"
                )
    return cls(**kwargs)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_config_path(path: str | Path) -> Path:
    """Find a config by path, or by bare name (``v8``) among the packaged configs."""
    p = Path(path)
    if p.is_file():
        return p
    for cand in (PACKAGE_CONFIG_DIR / p.name, PACKAGE_CONFIG_DIR / f"{p.name}.yaml"):
        if cand.is_file():
            return cand
    known = ", ".join(sorted(q.stem for q in PACKAGE_CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config file not found: {path}. Packaged configs: {known}")


def _read_yaml_tree(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config inheritance loop: {' -> '.join(map(str, seen + (path,)))}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    base = raw.pop("base", None)
    if base is None:
        return raw
    parent = resolve_config_path(path.parent / base if not Path(base).is_absolute() else base)
    return _deep_merge(_read_yaml_tree(parent, seen + (path,)), raw)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``section.key=value``; the value is parsed as YAML (``1e-4``, ``[1, 2]``, ``true``)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads 1e-4 as a string (no dot); numbers are what the user meant.
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value) if any(c in value for c in ".eE") else int(value)
    return key.strip().split("."), value


def config_from_dict(tree: dict, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a :class:`Config` from a nested dict plus ``section.key=value`` overrides."""
    tree = dict(tree)
    for text in overrides:
        keys, value = parse_override(text)
        node = tree
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{k}' is not a section")
        node[keys[-1]] = value
    cfg = _build(Config, tree, "")
    problems = config_problems(cfg)
    if problems:
        raise ConfigError("invalid config value(s):\n  " + "\n  ".join(problems))
    return cfg


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    preset: str | Path | None = None,
) -> Config:
    """Load a YAML config (default: the packaged v8) and apply overrides.

    Args:
        path: config file or packaged config name.
        overrides: ``section.key=value`` strings, applied last.
        preset: optional YAML file whose keys are laid over the config before the
            overrides (e.g. ``ablate-demo.yaml`` shrinks every version to CPU size);
            its ``name`` and ``description`` are ignored.
    """
    tree = _read_yaml_tree(resolve_config_path(path or "v8"))
    if preset is not None:
        extra = _read_yaml_tree(resolve_config_path(preset))
        extra.pop("name", None)
        extra.pop("description", None)
        tree = _deep_merge(tree, extra)
    return config_from_dict(tree, overrides)


def config_to_dict(cfg: Config) -> dict:
    """Plain nested dict (tuples as lists) suitable for YAML or JSON."""

    def conv(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(dataclasses.asdict(cfg))


def config_to_yaml(cfg: Config) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)


# The resolved config beside every output (run folders, caches, submissions).
CONFIG_FILE = "config.yaml"


def save_config(cfg: Config, out_dir: str | Path) -> Path:
    """Write ``config.yaml`` into ``out_dir`` atomically and return its path."""
    path = Path(out_dir) / CONFIG_FILE
    atomic_write_text(path, config_to_yaml(cfg))
    return path
