"""Run-time plumbing shared by training and evaluation: settings, seeding, loaders, model.

Turns the config into explicit objects once, so ``train_one_epoch`` and ``evaluate`` take
plain arguments.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from spinegrade.config import Config
from spinegrade.constants import NUM_CLASSES
from spinegrade.data.augment import to_model_input
from spinegrade.data.cache import check_cache_matches
from spinegrade.data.dataset import CropDataset
from spinegrade.engine import distributed as dist_util
from spinegrade.errors import UserError
from spinegrade.losses import build_loss
from spinegrade.models import build_model


@dataclass(frozen=True)
class Settings:
    """Device and step settings of one process."""

    device: torch.device
    amp: bool = False
    channels_last: bool = False
    grad_clip: float = 0.0
    mixup_alpha: float = 0.0
    log_every: int = 0
    deterministic: bool = True
    dist: dist_util.DistInfo = dist_util.DistInfo()
    fold: int = 0

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and prints."""
        return self.dist.is_main

    @classmethod
    def from_config(cls, cfg: Config, fold: int | None = None) -> Settings:
        """Pick the device, join the process group (under torchrun), read the step settings."""
        device = resolve_device(cfg.train.device)
        info = dist_util.init_distributed(device.type)
        if device.type == "cuda":
            device = torch.device("cuda", info.local_rank)
        on_cuda = device.type == "cuda"
        return cls(device=device, amp=cfg.train.amp and on_cuda,
                   channels_last=cfg.train.channels_last and on_cuda,
                   grad_clip=cfg.train.grad_clip, mixup_alpha=cfg.train.mixup_alpha,
                   log_every=cfg.train.log_every,
                   # CPU kernels are deterministic at no cost; on CUDA it is opt-in.
                   deterministic=cfg.train.deterministic or not on_cuda,
                   dist=info,
                   fold=cfg.data.fold if fold is None else fold)


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise the named device.

    Args:
        name: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ...
        key: the config key it came from, named in the error message.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{key}={name} but CUDA is not available; use {key}=cpu")
    return device


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                   grad_clip: float, where: str = "") -> None:
    """Backward, clip the gradient norm (``grad_clip`` > 0) and step; refuses a non-finite loss.

    Args:
        where: appended to the error message, e.g. `` at epoch 3 step 7``.

    Raises:
        FloatingPointError: the loss is NaN or infinite.
    """
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()}{where}; lower the learning rate or "
                                 "check the inputs")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], grad_clip)
    optimizer.step()


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed python, numpy and torch; request deterministic kernels where asked."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


class EpochSampler(Sampler[int]):
    """Shuffle (or weighted draw with replacement) of the training set, sharded by rank.

    Every process draws the same order from the shared generator, then takes every
    ``world_size``-th index (the list is padded by wrapping so all shards have equal length,
    as DDP needs). With one process this is ``RandomSampler`` / ``WeightedRandomSampler``.
    """

    def __init__(self, n: int, generator: torch.Generator, weights: np.ndarray | None = None,
                 rank: int = 0, world_size: int = 1) -> None:
        self.n, self.generator, self.rank, self.world_size = n, generator, rank, world_size
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)

    def __len__(self) -> int:
        return math.ceil(self.n / self.world_size)

    def __iter__(self) -> Iterator[int]:
        if self.weights is None:
            order = torch.randperm(self.n, generator=self.generator)
        else:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=self.generator)
        order = order.tolist()
        total = len(self) * self.world_size
        order += order[: total - len(order)]
        return iter(order[self.rank:total:self.world_size])


@dataclass
class Loaders:
    """The loaders of one run and what they were built from."""

    train: DataLoader
    val: DataLoader
    bn: DataLoader          # every training sample, fixed order, no augmentation (SWA BN)
    generator: torch.Generator
    index: pd.DataFrame


def _loader(dataset: Any, batch_size: int, cfg: Config, s: Settings, **kw: Any) -> DataLoader:
    workers = cfg.data.num_workers
    # Each loader draws its workers' base seed from a generator of its own: drawing it from
    # the sampler's generator or the global RNG (which happens again after a resume, as
    # persistent workers restart) would shift the shuffle order and dropout of a resumed run.
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                      pin_memory=s.device.type == "cuda", persistent_workers=workers > 0,
                      generator=torch.Generator().manual_seed(cfg.train.seed + 7919), **kw)


def build_loaders(cfg: Config, cache: Any, train_rows: np.ndarray, val_rows: np.ndarray,
                  s: Settings) -> Loaders:
    """Training loader (shuffle or weighted sampler), this process's validation shard, BN loader."""

    if len(train_rows) == 0 or len(val_rows) == 0:
        raise UserError(f"fold {s.fold} leaves {len(train_rows)} training and {len(val_rows)} "
                        "validation samples; use a larger cache or fewer folds")
    generator = torch.Generator().manual_seed(cfg.train.seed)
    train_set = CropDataset(cache, train_rows)
    weights = None
    if cfg.train.sampler == "weighted":
        counts = np.bincount(train_set.labels, minlength=NUM_CLASSES).astype(np.float64)
        weights = 1.0 / np.maximum(counts, 1.0)[train_set.labels]
    sampler = EpochSampler(len(train_set), generator, weights, s.rank, s.world_size)
    # drop_last avoids a 1-sample batch (BatchNorm fails on it) when there is more than one.
    drop_last = len(sampler) > cfg.train.batch_size and len(sampler) % cfg.train.batch_size == 1
    train = _loader(train_set, cfg.train.batch_size, cfg, s, sampler=sampler, drop_last=drop_last)
    val = _loader(CropDataset(cache, dist_util.shard(np.asarray(val_rows), s.dist)),
                  cfg.eval.batch_size, cfg, s, shuffle=False)
    bn = _loader(CropDataset(cache, train_rows), cfg.eval.batch_size, cfg, s, shuffle=False)
    return Loaders(train=train, val=val, bn=bn, generator=generator, index=cache.index)


def make_run_model(cfg: Config, cache: Any, s: Settings, class_counts: list[int] | None = None,
                   for_inference: bool = False) -> tuple[nn.Module, nn.Module]:
    """The model and the loss of ``cfg`` on ``s.device`` (channels-last where asked).

    ``for_inference`` skips pretrained weights (a checkpoint will be loaded over them).
    """

    _check_cache(cfg, cache)
    mcfg = cfg.model
    if for_inference:
        mcfg = dataclasses.replace(mcfg, pretrained=False, pretrained_path="")
    model = build_model(mcfg, n_slices=int(cache.crops.shape[1]), num_classes=NUM_CLASSES,
                        class_counts=class_counts).to(s.device)
    if s.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, build_loss(cfg.loss, head=cfg.model.head).to(s.device)


def _check_cache(cfg: Config, cache: Any) -> None:
    """Refuse a cache whose crops were made with other pixel settings than ``cfg.data``."""

    # meta.json's pixel_config also holds the preprocessing code version.
    check_cache_matches(dataclasses.asdict(cfg.data),
                        cache.meta.get("pixel_config", cache.data_cfg))
    n, slices, _, h, w = cache.crops.shape
    if slices != cfg.data.n_slices or h != cfg.data.img_size:
        raise UserError(f"{cache.path}: crops are {slices} slices x {h}x{w} px but the config "
                        f"asks for {cfg.data.n_slices} x {cfg.data.img_size}; prepare a cache "
                        "with this config or pass the matching one")


@torch.no_grad()
def recompute_bn(model: nn.Module, loader: DataLoader, s: Settings) -> None:
    """Recompute every BatchNorm's running statistics over ``loader`` (for the SWA model).

    Like ``torch.optim.swa_utils.update_bn``, but feeds the model's ``(x, level)`` inputs
    from dict batches. Each process passes over all the training samples, so every process
    ends with identical statistics.
    """

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = {}
    for m in bns:
        m.reset_running_stats()
        momenta[m] = m.momentum
        m.momentum = None  # cumulative average over all batches
    was_training = model.training
    model.train()
    if hasattr(model, "set_backbone_trainable"):
        model.set_backbone_trainable(True)  # a frozen backbone would keep its BN in eval mode
    for batch in loader:
        with torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=s.amp):
            model(to_model_input(batch["image"], s.device), batch["level"].to(s.device))
    for m in bns:
        m.momentum = momenta[m]
    model.train(was_training)
