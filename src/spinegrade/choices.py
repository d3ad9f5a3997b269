"""The names each registry serves, written once: the registries dispatch on them and
``config_checks.CHOICES`` validates against them.

A leaf of plain tuples, so validating a config imports no torch (the registries themselves
live in torch modules, and ``losses`` imports ``config``, so ``config`` cannot import them).
"""

from __future__ import annotations

# --- models (registries in models/) ---------------------------------------------------------
# models/aggregators.py: create_aggregator; "none" = slices are channels (v7).
AGGREGATORS: tuple[str, ...] = (
    "softmax_weights", "bilstm_attn_mean", "bigru_attn", "attention_mil",
    "bilstm_attention", "none",
)
# models/net.py: SpineGrader.
HEADS: tuple[str, ...] = ("softmax", "coral")
LEVEL_CONDITIONINGS: tuple[str, ...] = ("embedding", "film", "none")
INPUT_MODES: tuple[str, ...] = ("slices", "channels")
SLICE_CHANNELS: tuple[str, ...] = ("first", "mean")
# models/factory.py: head_prior_bias.
BIAS_INITS: tuple[str, ...] = ("fixed", "log_prior", "zero")
# models/factory.py: the head's final layer (prior: tiny weights + prior bias; random).
HEAD_INITS: tuple[str, ...] = ("prior", "random")
# models/backbone.py: a >3-channel stem from RGB weights.
STEM_INITS: tuple[str, ...] = ("adapt", "rgb_plus_random")

# --- training -------------------------------------------------------------------------------
# losses.py: build_loss.
LOSSES: tuple[str, ...] = ("weighted_ce", "coral_ce", "focal_ordinal")
# losses.py: CompetitionWeightedCE's focal modulation.
FOCAL_FORMS: tuple[str, ...] = ("textbook", "plan")
# engine/schedule.py: the fine-tuning learning-rate curve.
LR_SCHEDULES: tuple[str, ...] = ("cosine", "cosine_restarts")
# engine/loop.py: the training sampler.
SAMPLERS: tuple[str, ...] = ("shuffle", "weighted")
# engine/train.py: SELECT_METRICS (which also says whether larger is better).
SELECT_METRICS: tuple[str, ...] = ("balanced_accuracy", "weighted_logloss", "val_loss")
# engine/train.py: what a run of dead-class epochs triggers. reset_bias_boost (v8 default):
# head bias back to the prior and head LR x train.dead_class_lr_boost for the next epoch.
DEAD_CLASS_ACTIONS: tuple[str, ...] = ("reset_bias_boost", "reset_bias", "warn", "stop")
# engine/calibrate.py: what is fitted on the out-of-fold predictions after training.
CALIBRATION_METHODS: tuple[str, ...] = ("none", "temperature", "temperature_bias")
# engine/run_folder.py: the checkpoint files of a run folder.
CHECKPOINT_NAMES: tuple[str, ...] = ("best", "last", "swa")

# --- data (registries in data/preprocess.py) -------------------------------------------------
WINDOW_PRESETS: tuple[str, ...] = ("fixed", "percentile")
WINDOW_CHANNELS: tuple[str, ...] = ("three", "single")
RESIZE_INTERPOLATIONS: tuple[str, ...] = ("area", "linear")
# data/jitter.py: where training crops are centred, and the placement error's distribution.
COORDINATE_SOURCES: tuple[str, ...] = ("labels", "predicted")
JITTER_DISTRIBUTIONS: tuple[str, ...] = ("normal", "uniform")

# --- synthetic data (data/synthetic/labels.py: DIFFICULTIES) ----------------------------------
SYNTH_DIFFICULTIES: tuple[str, ...] = ("easy", "realistic", "hard")

# --- prediction (engine/predict.py) -----------------------------------------------------------
PREDICT_FALLBACKS: tuple[str, ...] = ("prior",)
# "final": the checkpoint final.json names, then the files of CHECKPOINT_NAMES.
PREDICT_CHECKPOINTS: tuple[str, ...] = ("final", *CHECKPOINT_NAMES)
