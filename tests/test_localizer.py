"""Stage-1 localizer: geometry, targets, decoding, the network, and one CPU training run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from spinegrade.config import LocalizerConfig
from spinegrade.constants import CONDITION_SERIES, CONDITIONS, LEVELS
from spinegrade.data import localizer as D
from spinegrade.engine import localizer as L
from spinegrade.engine.split import holdout_split
from spinegrade.losses import focal_heatmap_loss
from spinegrade.metrics import keypoint_errors, summarize_errors
from spinegrade.models import localizer_decode as dec
from spinegrade.models.localizer import HeatmapLocalizer


def _series(n: int = 5, size: int = 32, shape: tuple[int, int] = (64, 48)) -> D.PreparedSeries:
    """A tiny sagittal-like prepared series: rows along +y, columns along -z, 4 mm apart in x."""
    orientation = np.array([0.0, 1.0, 0.0, 0.0, 0.0, -1.0])
    positions = np.array([[4.0 * j, -10.0, 50.0] for j in range(n)])
    return D.PreparedSeries(
        study_id=1, series_id=2, images=np.zeros((n, size, size), dtype=np.uint8),
        depth=np.zeros(n, dtype=np.float32), instance_numbers=np.arange(n) + 10,
        shapes=np.tile(np.array(shape), (n, 1)), positions=positions,
        pixel_spacing=np.tile([0.5, 0.8], (n, 1)), orientation=orientation)


def test_tasks_follow_condition_series():
    for desc in set(CONDITION_SERIES.values()):
        task = D.make_task(desc)
        conds = [c for c in CONDITIONS if CONDITION_SERIES[c] == desc]
        assert task.keypoints == tuple((c, i) for c in conds for i in range(len(LEVELS)))
    assert len(D.make_task("Sagittal T2/STIR").keypoints) == 5
    assert D.make_task("Sagittal T2/STIR").name == "sagittal_t2_stir"


def test_grid_round_trip_and_patient_point():
    s = _series()
    gx, gy = s.to_grid(1, 10.0, 20.0)
    # 48 columns -> 32: pixel centres scale by 32/48 about -0.5: 10.5 * 2/3 - 0.5 = 6.5;
    # 64 rows -> 32: 20.5 * 1/2 - 0.5 = 9.75.
    assert gx == pytest.approx(6.5)
    assert gy == pytest.approx(9.75)
    assert s.to_native(1, gx, gy) == pytest.approx((10.0, 20.0))
    # x runs along row_dir (+y) with column spacing 0.8; y along col_dir (-z) with 0.5.
    np.testing.assert_allclose(s.patient_point(2, 10.0, 20.0), [8.0, -10.0 + 8.0, 50.0 - 10.0])


def test_target_peak_and_soft_argmax_recover_the_point():
    xy = np.array([[13.3, 21.7], [0.0, 0.0]], dtype=np.float32)
    t = D.heatmap_target(xy, np.array([True, False]), size=64, stride=2, sigma=1.5)
    assert t.shape == (2, 32, 32) and t[1].max() == 0.0
    assert t[0].max() == 1.0
    hx, hy, peak = dec.soft_argmax(t[0], radius=3)
    # Back to the 64-pixel grid: within a fraction of a heatmap cell.
    assert hx * 2 + 0.5 == pytest.approx(13.3, abs=0.6)
    assert hy * 2 + 0.5 == pytest.approx(21.7, abs=0.6)
    assert peak == 1.0


def test_focal_loss_ignores_masked_channels():
    target = torch.zeros(1, 2, 8, 8)
    target[0, 0, 3, 3] = 1.0
    logits = torch.zeros(1, 2, 8, 8, requires_grad=True)
    loss = focal_heatmap_loss(logits, target, torch.tensor([[1.0, 0.0]]))
    loss.backward()
    assert torch.isfinite(loss) and logits.grad[0, 1].abs().sum() == 0
    assert logits.grad[0, 0].abs().sum() > 0


def test_heatmap_localizer_shapes_and_gradients():
    model = HeatmapLocalizer("resnet10t", in_chans=4, num_keypoints=5, heatmap_stride=4,
                             max_stride=16, decoder_channels=8)
    out = model(torch.rand(2, 4, 64, 64))
    assert out.shape == (2, 5, 16, 16)
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_locate_series_maps_the_peak_back_to_native_pixels():
    s = _series(n=4, size=32, shape=(64, 64))

    class Peak(torch.nn.Module):
        """Fake network: a peak at heatmap cell (5, 9) on slice 2 only."""

        def forward(self, x):
            out = torch.full((x.shape[0], 1, 16, 16), -10.0)
            for b in range(x.shape[0]):
                if float(x[b, -1, 0, 0]) == 2.0:  # the position plane carries the slice id
                    out[b, 0, 9, 5] = 10.0
            return out

    s.depth = np.arange(4, dtype=np.float32)
    lcfg = LocalizerConfig(img_size=32, heatmap_stride=2, refine_radius=1, n_context_slices=1)
    (loc,) = L.locate_series(Peak(), s, lcfg, torch.device("cpu"))
    assert loc.slice_index == 2 and loc.instance_number == 12
    # Cell 5 -> grid pixel 5*2+0.5 = 10.5 -> native (10.5+0.5)*2-0.5 = 21.5.
    assert (loc.x, loc.y) == pytest.approx((21.5, 37.5))


def test_ordered_levels_take_consecutive_discs():
    s = _series(n=3, size=64, shape=(64, 64))
    s.pixel_spacing[:] = 1.0
    hm = np.zeros((3, 5, 32, 32), dtype=np.float32)
    rows = [3, 8, 13, 18, 23, 28]  # six discs, superior (small row) to inferior
    for k in range(5):
        hm[1, k, rows[k + 1], 10] = 0.6  # level k is disc k + 1 ...
    hm[1, 0, rows[0], 10] = 0.7  # ... but level 0 also fires, higher, one disc too high
    cells = dec.ordered_level_cells(hm, list(range(5)), s, stride=2, min_sep_mm=6.0)
    assert cells == {k: (rows[k + 1], 10) for k in range(5)}
    # Its own maximum would have put level 0 on the wrong disc.
    assert np.unravel_index(np.argmax(hm[1, 0]), (32, 32)) == (rows[0], 10)


def test_split_is_by_study_and_disjoint():
    split = holdout_split([5, 1, 3, 3, 9, 7], val_fraction=0.4, seed=0)
    assert sorted(split["study_id"]) == [1, 3, 5, 7, 9]
    assert (split["split"] == "val").sum() == 2


def test_errors_use_millimetres_and_slice_positions():
    s = _series(n=5, shape=(64, 48))
    task = D.LocalizerTask("t", "Sagittal T2/STIR", (("spinal_canal_stenosis", 0),))
    lab = D.SeriesLabels(s, np.array([2]), np.array([s.to_grid(2, 10.0, 20.0)], dtype=np.float32),
                         np.array([True]))
    # Predicted one slice off (4 mm out of plane) and 3 px / 4 px off in plane.
    pred = [[dec.Located(3, 13, 13.0, 24.0, 0.9)]]
    err = keypoint_errors([lab], pred, task)
    assert err.loc[0, "slice_error"] == 1
    assert err.loc[0, "error_mm"] == pytest.approx(np.hypot(3 * 0.8, 4 * 0.5))
    assert err.loc[0, "error_3d_mm"] == pytest.approx(np.sqrt((3 * 0.8) ** 2 + 2.0**2 + 16.0))
    table = summarize_errors(err)
    assert table.iloc[-1]["slice_within1"] == 1.0 and table.iloc[-1]["slice_exact"] == 0.0


TINY = ["localizer.series=[Sagittal T2/STIR]", "localizer.img_size=64",
        "localizer.heatmap_stride=2", "localizer.decoder_channels=16", "localizer.epochs=4",
        "localizer.batch_size=8", "localizer.val_fraction=0.25", "localizer.lr=3e-3"]


@pytest.mark.slow
def test_train_localizer_cli_end_to_end(synth_dir, tmp_path, capsys):
    from spinegrade.cli import main

    out = tmp_path / "loc"
    args = ["train-localizer", "--data", str(synth_dir), "--out", str(out), "--no-progress"]
    for o in TINY:
        args += ["--set", o]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "slice_within1" in printed
    task = out / "sagittal_t2_stir"
    for f in ("checkpoints/best.pt", "checkpoints/last.pt", "metrics.csv",
              "val_predictions.csv", "overlay.png"):
        assert (task / f).is_file(), f
    table = pd.read_csv(out / "localizer_metrics.csv")
    overall = table[table["level"] == "all"].iloc[0]
    # Four epochs on nine studies: a loose bound; the full-size check is in docs/predict.md.
    assert overall["slice_within1"] >= 0.5
    assert np.isfinite(overall["median_mm"])
    # Running again resumes from last.pt (weights_only=True; nothing left to train).
    assert main(args) == 0
    assert len(pd.read_csv(task / "metrics.csv")) == 4
    run = L.LocalizerRun.load(out)
    assert run.series_descriptions == ("Sagittal T2/STIR",)
    assert Path(out / "config.yaml").is_file()
