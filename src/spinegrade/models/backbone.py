"""Backbone factory: any timm model as a pooled feature extractor, plus its normalisation.

Weights come from one of three places, and exactly one log line says which:
a local file (``pretrained_path``), timm's hub (``pretrained=True``), or nowhere (random
initialisation, either requested or because the hub could not be reached).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from timm.models import adapt_input_conv
from torch import nn

from spinegrade.errors import UserError

_log = logging.getLogger(__name__)

# Containers that training scripts (timm, torchvision, Lightning, ours) wrap a state dict in.
_STATE_DICT_KEYS = ("state_dict", "model", "model_state", "state_dict_ema", "model_ema")


@dataclass(frozen=True)
class BackboneWeights:
    """Where a backbone's weights came from, for run.json, the report and the log.

    ``source`` is ``file`` (``detail`` = the path, ``sha256`` its digest), ``hub`` (``detail``
    = the timm hub tag, e.g. ``timm/tf_efficientnetv2_s.in21k_ft_in1k``, with
    ``timm_version``) or ``random`` (``detail`` = why: not requested, or the hub error).
    """

    source: str  # "file" | "hub" | "random"
    detail: str  # path, hub tag, or why the backbone is random
    missing_keys: tuple[str, ...] = ()
    unexpected_keys: tuple[str, ...] = ()
    backbone: str = ""
    sha256: str = ""
    timm_version: str = timm.__version__
    # Stem channels whose pretrained filters were replaced by random ones (v7's stem).
    random_stem_channels: int = 0

    def as_dict(self) -> dict:
        """The plain record written to run.json (key lists shortened to counts)."""
        return {"source": self.source, "detail": self.detail, "backbone": self.backbone,
                "sha256": self.sha256 or None, "timm_version": self.timm_version,
                "missing_keys": len(self.missing_keys),
                "unexpected_keys": len(self.unexpected_keys),
                "random_stem_channels": self.random_stem_channels}

    def describe(self) -> str:
        """One line for the report."""
        if self.source == "file":
            text = f"local file {self.detail} (sha256 {self.sha256})"
        elif self.source == "hub":
            text = f"timm hub {self.detail} (timm {self.timm_version})"
        else:
            text = f"random initialisation: {self.detail}"
        if self.random_stem_channels:
            text += f"; {self.random_stem_channels} stem channels randomly initialised"
        return f"{self.backbone}: {text}" if self.backbone else text


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Normalize(nn.Module):
    """Maps float images in [0, 1] to the backbone's expected mean/std, held as buffers.

    Args:
        mean: Per-channel mean, as in the pretrained config.
        std: Per-channel standard deviation.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


def normalization_stats(model: nn.Module, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std for ``in_chans`` input channels from the model's pretrained config.

    For ``in_chans != 3`` channel ``i`` uses the statistics of RGB channel ``i % 3``, which
    matches how :func:`timm.models.adapt_input_conv` repeats the RGB stem filters.
    """
    cfg = timm.data.resolve_data_config({}, model=model)
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    if len(mean) != in_chans:
        mean = tuple(mean[i % len(mean)] for i in range(in_chans))
        std = tuple(std[i % len(std)] for i in range(in_chans))
    return mean, std


def backbone_feature_dim(model: nn.Module) -> int:
    """Size of the pooled features a ``num_classes=0`` timm model returns.

    Models with a pre-logits head (MobileNetV3, LCNet) return ``head_hidden_size`` features,
    not ``num_features`` (the last stage's channels).
    """
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def _check_name(name: str) -> None:
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UserError(f"model.backbone: '{name}' is not a timm model.{hint}")


def create_backbone(
    name: str,
    *,
    pretrained: bool,
    pretrained_path: str = "",
    in_chans: int = 3,
    drop_path_rate: float = 0.0,
    stem_init: str = "adapt",
) -> tuple[nn.Module, BackboneWeights]:
    """Create a timm model without classifier (``num_classes=0``) that returns pooled features.

    Args:
        name: Any ``timm.list_models()`` name.
        pretrained: Fetch timm's pretrained weights from the hub; if that fails (no network),
            log a warning and keep the random initialisation instead of crashing.
        pretrained_path: Local state dict (.pth/.pt/.bin/.safetensors); takes precedence over
            the hub. The stem is adapted when the file has another number of input channels.
        in_chans: Input channels (3 for RGB slices, n_slices for the 2.5D stem of v7).
        drop_path_rate: Stochastic depth rate, where the architecture supports it.
        stem_init: With ``in_chans > 3`` and pretrained weights: ``adapt`` repeats the RGB
            filters over all channels (timm's ``adapt_input_conv``); ``rgb_plus_random`` keeps
            them on channels 0-2 only and gives the others a fresh random initialisation
            (v7 as the plan describes it: the pretrained weights of 4 of 7 channels discarded).

    Returns:
        The model and a record of where its weights came from.
    """
    _check_name(name)
    kwargs: dict = {"num_classes": 0, "in_chans": in_chans}
    if drop_path_rate > 0:
        kwargs["drop_path_rate"] = drop_path_rate
    model, info = _load_weights(name, pretrained, pretrained_path, kwargs)
    info = dataclasses.replace(info, backbone=name)
    if stem_init == "rgb_plus_random" and in_chans > 3 and info.source != "random":
        _discard_stem_channels(model, name, kwargs)
        info = dataclasses.replace(info, random_stem_channels=in_chans - 3)
        _log.info("backbone %s: stem channels 3-%d randomly initialised (model.stem_init="
                  "rgb_plus_random)", name, in_chans - 1)
    return model, info


def _load_weights(name: str, pretrained: bool, pretrained_path: str, kwargs: dict
                  ) -> tuple[nn.Module, BackboneWeights]:
    """The model with weights from the file, the hub or nowhere, and exactly one log line."""
    if pretrained_path:
        model = timm.create_model(name, pretrained=False, **kwargs)
        info = load_backbone_weights(model, pretrained_path)
        extra = ""
        if info.missing_keys or info.unexpected_keys:
            extra = (f"; missing keys {list(info.missing_keys)[:5]} ({len(info.missing_keys)}), "
                     f"unexpected keys {list(info.unexpected_keys)[:5]} ({len(info.unexpected_keys)})")
        _log.info("backbone %s: loaded weights from file %s (sha256 %s)%s", name,
                  pretrained_path, info.sha256, extra)
        return model, info
    if pretrained:
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except (OSError, RuntimeError) as e:  # no network / hub unreachable / missing file
            why = f"hub unreachable ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
            _log.warning("backbone %s: RANDOMLY INITIALISED, pretrained weights could not be "
                         "fetched: %s. Set model.pretrained_path to a local weights file.", name, why)
            return timm.create_model(name, pretrained=False, **kwargs), BackboneWeights("random", why)
        cfg = model.pretrained_cfg
        tag = cfg.get("hf_hub_id") or cfg.get("tag") or name
        if cfg.get("tag") and cfg.get("hf_hub_id") and "." not in str(cfg["hf_hub_id"]):
            tag = f"{tag}.{cfg['tag']}"
        _log.info("backbone %s: loaded pretrained weights from the timm hub (%s)", name, tag)
        return model, BackboneWeights("hub", str(tag))
    _log.info("backbone %s: randomly initialised (model.pretrained=false)", name)
    return timm.create_model(name, pretrained=False, **kwargs), BackboneWeights(
        "random", "model.pretrained=false")


@torch.no_grad()
def _discard_stem_channels(model: nn.Module, name: str, kwargs: dict) -> None:
    """Keep the pretrained RGB filters on stem channels 0-2; fresh random ones elsewhere."""
    fresh = timm.create_model(name, pretrained=False, **kwargs).state_dict()
    own = model.state_dict()
    n = int(kwargs["in_chans"])
    for conv in _first_convs(model):
        key = f"{conv}.weight"
        if key not in own:
            continue
        weight = own[key]
        # adapt_input_conv repeated the RGB filters over n channels and scaled them by 3 / n.
        weight[:, :3] = weight[:, :3] * (n / 3)
        weight[:, 3:] = fresh[key][:, 3:]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or a torch file (``weights_only=True``), unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model.pretrained_path: file not found: {path}")
    if path.suffix == ".safetensors":
        obj: object = load_file(str(path), device="cpu")
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickled objects other than tensors, or not a torch file
            raise UserError(f"model.pretrained_path: cannot read {path} as weights: {e}") from None
    for key in _STATE_DICT_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise UserError(f"model.pretrained_path: {path} does not hold a state dict")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    # DDP wraps keys in "module."; our own checkpoints prefix the backbone with "backbone.".
    for prefix in ("module.", "backbone."):
        if state and sum(k.startswith(prefix) for k in state) >= len(state) // 2:
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def _first_convs(model: nn.Module) -> list[str]:
    first = model.pretrained_cfg.get("first_conv") or []
    return [first] if isinstance(first, str) else list(first)


def load_backbone_weights(model: nn.Module, path: str | Path) -> BackboneWeights:
    """Load a local state dict into a timm backbone, tolerating a classifier mismatch.

    Classifier weights (named by ``pretrained_cfg['classifier']``) are dropped because the
    backbone has ``num_classes=0``. A stem with another number of input channels is adapted
    with :func:`timm.models.adapt_input_conv`, as ``timm.create_model(in_chans=...)`` does for
    hub weights. Tensors whose shape still differs are skipped and reported as missing.

    Raises:
        UserError: The file does not exist, cannot be read, or matches no key of the model.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    classifier = model.pretrained_cfg.get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    state = {k: v for k, v in state.items() if not any(k.startswith(c + ".") for c in classifier)}
    for conv in _first_convs(model):
        key = f"{conv}.weight"
        if key in state and key in own and state[key].shape[1] != own[key].shape[1]:
            state[key] = adapt_input_conv(own[key].shape[1], state[key].float()).to(state[key].dtype)
    shape_mismatch = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    state = {k: v for k, v in state.items() if k not in shape_mismatch}
    if not any(k in own for k in state):
        raise UserError(f"model.pretrained_path: no key of {path} matches the backbone; "
                        f"is it a checkpoint of another architecture?")
    result = model.load_state_dict(state, strict=False)
    return BackboneWeights(
        "file", str(Path(path).resolve()), sha256=file_sha256(path),
        missing_keys=tuple(result.missing_keys),
        unexpected_keys=tuple(result.unexpected_keys) + tuple(f"{k} (shape)" for k in shape_mismatch),
    )
