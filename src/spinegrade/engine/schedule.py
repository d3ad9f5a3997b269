"""The v8 training schedule: phases, parameter groups, cosine learning rates, SWA window.

Phases (epochs are 1-based, as in the plan):

- ``frozen``   epochs 1..freeze_epochs: backbone frozen, head at ``frozen_head_lr``.
- ``finetune`` epochs freeze_epochs+1..epochs: backbone at ``backbone_lr``, head at
  ``head_lr``, both decayed by one cosine (no restarts) **per optimizer step** to ``min_lr``:
  the first step of the first fine-tune epoch uses the base rates, the last step of the last
  epoch uses exactly ``min_lr``.
- ``swa``      epochs swa_start_epoch..epochs (a sub-range of fine-tuning, same cosine): the
  weights at the end of each of these epochs are averaged.

``train.lr_schedule=cosine_restarts`` (v4-v7, "cosine with warm restarts" in the plan) replaces
the single cosine by SGDR (Loshchilov & Hutter 2017, as ``CosineAnnealingWarmRestarts``):
cycles of ``lr_restart_epochs`` fine-tune epochs (times ``lr_restart_mult`` each cycle),
each decaying from the base rates towards ``min_lr`` and restarting at the base rates on the
first step of the next cycle.

The schedule is a pure function of (epoch, step), so resuming needs only the epoch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from spinegrade.config import TrainConfig
from spinegrade.errors import UserError

FROZEN, FINETUNE, SWA = "frozen", "finetune", "swa"
GROUPS = ("backbone", "head")


def cosine_lr(base_lr: float, min_lr: float, frac: float) -> float:
    """One cosine from ``base_lr`` (``frac`` 0) down to ``min_lr`` (``frac`` 1)."""
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))


def epoch_cosine_lr(base_lr: float, min_lr: float, epoch: int, epochs: int) -> float:
    """Per-epoch cosine (the localizer): ``base_lr`` at epoch 1, ``min_lr`` at ``epochs``."""
    return cosine_lr(base_lr, min_lr, (epoch - 1) / max(epochs - 1, 1))


@dataclass(frozen=True)
class PhaseSchedule:
    """Learning rates and trainability for every (epoch, step) of a run."""

    epochs: int
    freeze_epochs: int
    frozen_head_lr: float
    backbone_lr: float
    head_lr: float
    min_lr: float
    swa: bool
    swa_start_epoch: int
    steps_per_epoch: int
    lr_schedule: str = "cosine"
    restart_epochs: int = 5
    restart_mult: int = 1

    @classmethod
    def from_config(cls, tcfg: TrainConfig, steps_per_epoch: int) -> PhaseSchedule:
        """Build from the ``train`` config section and the loader length."""
        if tcfg.swa and not 1 <= tcfg.swa_start_epoch <= tcfg.epochs:
            raise UserError(f"train.swa_start_epoch={tcfg.swa_start_epoch} must lie in "
                            f"1..train.epochs={tcfg.epochs}")
        if tcfg.lr_schedule == "cosine_restarts" and (tcfg.lr_restart_epochs < 1
                                                      or tcfg.lr_restart_mult < 1):
            raise UserError(f"train.lr_restart_epochs={tcfg.lr_restart_epochs} and "
                            f"train.lr_restart_mult={tcfg.lr_restart_mult} must be at least 1")
        return cls(epochs=tcfg.epochs, freeze_epochs=tcfg.freeze_epochs,
                   frozen_head_lr=tcfg.frozen_head_lr, backbone_lr=tcfg.backbone_lr,
                   head_lr=tcfg.head_lr, min_lr=tcfg.min_lr, swa=tcfg.swa,
                   swa_start_epoch=tcfg.swa_start_epoch, steps_per_epoch=max(1, steps_per_epoch),
                   lr_schedule=tcfg.lr_schedule, restart_epochs=tcfg.lr_restart_epochs,
                   restart_mult=tcfg.lr_restart_mult)

    def phase(self, epoch: int) -> str:
        """Name of the phase of 1-based ``epoch``."""
        if epoch <= self.freeze_epochs:
            return FROZEN
        return SWA if self.in_swa(epoch) else FINETUNE

    def backbone_trainable(self, epoch: int) -> bool:
        """Whether the backbone receives gradients during ``epoch``."""
        return epoch > self.freeze_epochs

    def in_swa(self, epoch: int) -> bool:
        """Whether the weights at the end of ``epoch`` enter the SWA average."""
        return self.swa and self.swa_start_epoch <= epoch <= self.epochs

    def lrs(self, epoch: int, step: int) -> dict[str, float]:
        """Learning rate of each parameter group at 0-based ``step`` of 1-based ``epoch``."""
        if epoch <= self.freeze_epochs:
            return {"backbone": 0.0, "head": self.frozen_head_lr}
        total = (self.epochs - self.freeze_epochs) * self.steps_per_epoch
        t = (epoch - self.freeze_epochs - 1) * self.steps_per_epoch + min(step, self.steps_per_epoch - 1)
        if self.lr_schedule == "cosine_restarts":
            frac = restart_fraction(t, self.restart_epochs * self.steps_per_epoch, self.restart_mult)
        else:
            frac = min(1.0, t / max(total - 1, 1))
        return {"backbone": cosine_lr(self.backbone_lr, self.min_lr, frac),
                "head": cosine_lr(self.head_lr, self.min_lr, frac)}

    def state_dict(self) -> dict:
        """Plain-dict form stored in checkpoints (everything needed to rebuild the schedule)."""
        return asdict(self)


def restart_fraction(t: int, cycle: int, mult: int = 1) -> float:
    """Position in [0, 1) of step ``t`` within its SGDR cycle (first cycle ``cycle`` steps,
    each next one ``mult`` times longer); 0 on the first step of every cycle."""
    while t >= cycle:
        t -= cycle
        cycle *= mult
    return t / cycle


def build_optimizer(model: nn.Module, tcfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with two named groups, ``backbone`` and ``head``, covering every parameter once.

    Frozen parameters stay in the optimizer: AdamW skips parameters without a gradient, so
    phase 1 leaves the backbone untouched and phase 2 needs no new optimizer.
    """
    backbone = list(model.backbone_parameters())
    head = list(model.head_parameters())
    seen = {id(p) for p in backbone} | {id(p) for p in head}
    missing = [n for n, p in model.named_parameters() if id(p) not in seen]
    if missing or len(seen) != len(backbone) + len(head):
        raise RuntimeError(f"backbone/head parameter groups overlap or miss parameters: {missing[:5]}")
    return torch.optim.AdamW(
        [{"params": backbone, "name": "backbone", "lr": 0.0},
         {"params": head, "name": "head", "lr": tcfg.frozen_head_lr}],
        weight_decay=tcfg.weight_decay,
    )


def apply_lrs(optimizer: torch.optim.Optimizer, lrs: dict[str, float]) -> None:
    """Set each named parameter group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lrs[group["name"]]


def scale_head_lr(lrs: dict[str, float], factor: float) -> dict[str, float]:
    """``lrs`` with the head's rate times ``factor`` (the dead-class action's boost)."""
    return lrs if factor == 1.0 else {**lrs, "head": lrs["head"] * factor}
