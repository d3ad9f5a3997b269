"""Training throughput: the loader alone vs the training step alone, in samples per second.

For the demo config on the CPU, and for the v8 config (EfficientNet-V2-S, 224 px, 7 slices,
bf16 autocast, channels-last, pretrained=False) when a GPU is present. The loader should
deliver at least 3x what the step consumes, or the accelerator waits on data.

    python benchmarks/train_throughput.py [--cache CACHE] [--steps 20] [--workers N]

Without ``--cache`` a cache of random uint8 crops is made with ``CropCache.create``.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from spinegrade.config import Config, load_config
from spinegrade.constants import LEVELS
from spinegrade.data.augment import BatchAugment
from spinegrade.engine.loop import Settings, build_loaders, make_run_model, seed_everything
from spinegrade.engine.schedule import PhaseSchedule, build_optimizer
from spinegrade.engine.train import train_one_epoch


def random_cache(root: Path, cfg: Config, n: int):
    """A cache of ``n`` random crops shaped as ``cfg.data`` asks."""
    from spinegrade.data.cache import CropCache

    rng = np.random.default_rng(0)
    size, slices = cfg.data.img_size, cfg.data.n_slices
    crops = rng.integers(0, 256, (n, slices, 3, size, size), dtype=np.uint8)
    index = pd.DataFrame({"study_id": np.arange(n) // 5, "level": [LEVELS[i % 5] for i in range(n)],
                          "level_idx": np.arange(n) % 5, "label": rng.integers(0, 3, n)})
    return CropCache.create(root / f"{cfg.name}-{size}", crops, index,
                            {"img_size": size, "n_slices": slices})


def loader_rate(loader, batches: int) -> float:
    """Samples/s of iterating the training loader, after one warm-up pass.

    The warm-up pass pages the memmap in and starts the workers and thread pools, which
    otherwise dominate a short measurement.
    """
    for _ in loader:
        pass
    n, start = 0, time.perf_counter()
    while True:
        for batch in loader:
            n += len(batch["label"])
            batches -= 1
            if batches <= 0:
                return n / (time.perf_counter() - start)


def step_rate(cfg: Config, cache, s: Settings, steps: int) -> float:
    """Samples/s of augmentation + forward + backward + optimizer step on one resident batch."""
    model, loss_fn = make_run_model(cfg, cache, s)
    model.set_backbone_trainable(True)
    opt = build_optimizer(model, cfg.train)
    sched = PhaseSchedule.from_config(cfg.train, steps_per_epoch=steps)
    bs = cfg.train.batch_size
    batch = {"image": torch.from_numpy(np.array(cache.crops[:bs])),
             "label": torch.from_numpy(cache.index["label"].to_numpy()[:bs].copy()),
             "level": torch.from_numpy(cache.index["level_idx"].to_numpy()[:bs].copy())}
    batch = {k: v.to(s.device) for k, v in batch.items()}  # resident: time the step only
    aug, gen = BatchAugment(), torch.Generator().manual_seed(0)
    epoch = cfg.train.freeze_epochs + 1  # fine-tuning: the whole network trains
    train_one_epoch(model, [batch] * 2, opt, loss_fn, sched, epoch, s, aug, gen)  # warm-up
    if s.device.type == "cuda":
        torch.cuda.synchronize()
    stats = train_one_epoch(model, [batch] * steps, opt, loss_fn, sched, epoch, s, aug, gen)
    if s.device.type == "cuda":
        torch.cuda.synchronize()
    return stats["n"] / stats["seconds"]


def bench(name: str, cfg: Config, cache_arg: str | None, root: Path, steps: int) -> None:
    from spinegrade.data.cache import CropCache

    s = Settings.from_config(cfg)
    seed_everything(0, s.deterministic)
    n = max(8 * cfg.train.batch_size, 64)
    cache = CropCache.open(cache_arg) if cache_arg else None
    if cache is None or cache.crops.shape[1:] != (cfg.data.n_slices, 3, cfg.data.img_size,
                                                  cfg.data.img_size):
        cache = random_cache(root, cfg, n)  # none given, or made for another crop size
    rows = cache.index["row"].to_numpy()
    loaders = build_loaders(cfg, cache, rows, rows[:1], s)
    load = loader_rate(loaders.train, steps)
    step = step_rate(cfg, cache, s, steps)
    print(f"{name:<6} {cfg.model.backbone} {cfg.data.n_slices}x{cfg.data.img_size}px "
          f"batch {cfg.train.batch_size} on {s.device} (amp={s.amp}, channels_last="
          f"{s.channels_last}, loader workers {cfg.data.num_workers}): loader {load:8.1f} "
          f"samples/s | train step {step:7.1f} samples/s | loader/step {load / step:5.1f}x "
          f"(target >= 3x)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=None, help="a real crop cache (default: random crops)")
    ap.add_argument("--steps", type=int, default=20, help="batches timed per figure")
    ap.add_argument("--workers", type=int, default=None, help="loader workers (default: config)")
    args = ap.parse_args()
    extra = [f"data.num_workers={args.workers}"] if args.workers is not None else []
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        bench("demo", load_config("demo", extra), args.cache, Path(tmp), args.steps)
        if torch.cuda.is_available():
            v8 = load_config("v8", ["model.pretrained=false", *extra])
            bench("v8", v8, args.cache, Path(tmp), args.steps)
        else:
            print("v8     skipped: no GPU (EfficientNet-V2-S at 224 px is a GPU workload)")


if __name__ == "__main__":
    main()
