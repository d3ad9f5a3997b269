"""Stage-1 localizer: geometry, targets, decoding, the network, and one CPU training run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from spinegrade.config import LocalizerConfig
from spinegrade.constants import CONDITION_SERIES, CONDITIONS, LEVELS
from spinegrade.data import localizer as D
from spinegrade.engine import localize as L
from spinegrade.engine.run_folder import LOCALIZER, read_checkpoint
from spinegrade.engine.split import holdout_split
from spinegrade.losses import focal_heatmap_loss
from spinegrade.metrics import keypoint_errors, selection_score, summarize_errors
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
    for o in [*TINY, "localizer.val_from_epoch=3"]:
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
    # val_from_epoch=3: epochs 1 and 2 are not judged (infinite score), 3 and 4 are, and the
    # best checkpoint is one of those.
    history = pd.read_csv(task / "metrics.csv")
    assert np.isinf(history["val_score_mm"][:2]).all()
    assert np.isfinite(history["val_score_mm"][2:]).all()
    assert read_checkpoint(task / "checkpoints/best.pt", kind=LOCALIZER).epoch >= 3
    # The held-out errors written are the best epoch's (the lowest selection score logged).
    best_score = history["val_score_mm"].min()
    errors = pd.read_csv(task / "val_predictions.csv")
    assert selection_score(errors) == pytest.approx(best_score, rel=1e-9)
    # Running again resumes from last.pt (weights_only=True; nothing left to train) and
    # measures the best checkpoint again: the same errors.
    assert main(args) == 0
    assert len(pd.read_csv(task / "metrics.csv")) == 4
    again = pd.read_csv(task / "val_predictions.csv")
    np.testing.assert_allclose(again["error_3d_mm"], errors["error_3d_mm"], rtol=1e-6)
    run = L.LocalizerRun.load(out)
    assert run.series_descriptions == ("Sagittal T2/STIR",)
    assert Path(out / "config.yaml").is_file()


# --- wrong-disc rate, level labelling on the whole spine, axial slices from the sagittal -----------


def _wd_rows(study: int, z_true: list[float], z_pred: list[float]) -> list[dict]:
    """Error rows of one study's spinal points on the S-I axis (x = y = 0)."""
    return [{"study_id": study, "series_id": 7, "series_description": "Sagittal T2/STIR",
             "condition": "spinal_canal_stenosis", "level": LEVELS[k], "slice_error": 0,
             "error_mm": abs(p - t), "true_x": 0.0, "true_y": -t, "pred_x": 0.0, "pred_y": -p,
             "true_px": 0.0, "true_py": 0.0, "true_pz": t, "pred_px": 0.0, "pred_py": 0.0,
             "pred_pz": p} for k, (t, p) in enumerate(zip(z_true, z_pred, strict=True))]


def test_wrong_disc_rate_on_constructed_predictions():
    from spinegrade.metrics import wrong_disc, wrong_disc_rate

    z_true = [0.0, -40.0, -80.0, -120.0, -160.0]
    # L1/L2 2 mm off (own disc); L2/L3 at -65: 25 mm from its disc, 15 mm from L3/L4's -> wrong;
    # L3/L4 1 mm off; L4/L5 at -100: 20 mm from both its own and L3/L4's -> not wrong (a tie);
    # L5/S1 exact. A second study with one labelled level can never be wrong.
    rows = _wd_rows(1, z_true, [-2.0, -65.0, -79.0, -100.0, -160.0]) + _wd_rows(2, [0.0], [-39.0])
    errors = pd.DataFrame(rows)
    assert wrong_disc(errors).tolist() == [False, True, False, False, False, False]
    assert wrong_disc_rate(errors) == pytest.approx(1 / 6)
    table = summarize_errors(errors)
    per_level = table.set_index("level")["wrong_disc_rate"]
    assert per_level["l2_l3"] == 1.0 and per_level["l1_l2"] == 0.0
    assert per_level["all"] == pytest.approx(1 / 6)
    # Without geometry the native pixels of the series are compared instead (same verdicts).
    no_geo = errors.assign(true_pz=np.nan, pred_pz=np.nan)
    assert wrong_disc(no_geo).tolist() == [False, True, False, False, False, False]


def _cand(z: float, levels: list[float]) -> dec.DiscCandidate:
    return dec.DiscCandidate((0, 0), 0, np.array([0.0, 0.0, z]), z,
                             dec.disc_probability(np.array(levels)), np.array(levels))


def test_disc_probability_adds_the_disjoint_level_scores():
    assert dec.disc_probability(np.array([0.3, 0.3, 0.0, 0.0, 0.0])) == pytest.approx(0.6)
    assert dec.disc_probability(np.array([0.9, 0.5, 0.2, 0.0, 0.0])) == 1.0


def test_level_labelling_counts_from_the_lumbosacral_junction():
    from spinegrade.data.plausibility import disc_chain_problem

    # Nine candidates head to feet, 38 mm apart: T11/T12 and T12/L1 look lumbar (L1/L2's
    # channel fires on them, on T12/L1 more than on L1/L2 itself), then the five lumbar
    # discs, then two fused sacral lines the L5/S1 channel sees faintly.
    lv = np.eye(5)
    cands = [_cand(150.0, [0.7, 0.1, 0, 0, 0]), _cand(112.0, [0.8, 0.3, 0, 0, 0])]
    cands += [_cand(74.0 - 38.0 * k, list(0.6 * lv[k] + 0.05)) for k in range(5)]
    cands += [_cand(-116.0, [0, 0, 0, 0.05, 0.2]), _cand(-154.0, [0, 0, 0, 0, 0.15])]
    chain, reason = dec.label_chain(cands, 5)
    assert reason is None and chain == (2, 3, 4, 5, 6)
    # By hand: a lumbar candidate's disc probability is 0.65 + 4 x 0.05 = 0.85, the sacral
    # lines' 0.25 and 0.15; below L5/S1 they cost log 0.75 + log 0.85 = -0.450. The true chain
    # scores 5 log 0.65 - 0.450 = -2.604. Shifting every level one disc up (L1/L2 on T12/L1)
    # gives log 0.8 + 4 log 0.05, and leaves the real L5/S1 below: + log 0.15 - 0.450 =
    # -14.55; taking T12/L1 for L1/L2 and leaving the real L1/L2 out gives log 0.8 +
    # 4 log 0.65 + log(1 - 0.85) - 0.450 = -4.344.
    sacral = np.log(0.75) + np.log(0.85)
    assert dec.chain_log_score(cands, chain) == pytest.approx(5 * np.log(0.65) + sacral)
    assert dec.chain_log_score(cands, (1, 2, 3, 4, 5)) == pytest.approx(
        np.log(0.8) + 4 * np.log(0.05) + np.log(0.15) + sacral)
    assert dec.chain_log_score(cands, (1, 3, 4, 5, 6)) == pytest.approx(
        np.log(0.8) + 4 * np.log(0.65) + np.log(1 - 0.85) + sacral)

    # A chain check (disc_chain_problem) refuses chains that are no lumbar spine: with
    # L3/L4's candidate 10 mm below L2/L3's (under the 15 mm minimum spacing) the only
    # five-candidate chain is refused, and the reason says so.
    squeezed = [_cand(z, list(0.6 * lv[k] + 0.05))
                for k, z in enumerate([74.0, 36.0, 26.0, -12.0, -50.0])]

    def check(p, s):
        return disc_chain_problem(p, s, 0.01)

    assert dec.label_chain(squeezed, 5)[0] == (0, 1, 2, 3, 4)
    chain, reason = dec.label_chain(squeezed, 5, check)
    assert chain is None and "no plausible disc chain" in reason and "10.0 mm" in reason


def test_a_disc_left_below_l5_s1_counts_against_a_chain_shifted_up():
    # Level scores measured on a held-out synthetic study whose sacrum was half out of view:
    # the network spreads each disc over neighbouring levels and leans one level down, so the
    # level scores alone prefer the chain one disc up (T12/L1 .. L4/L5: sum of log = -4.602
    # against -5.054 for the true L1/L2 .. L5/S1). The true L5/S1 left below that chain is
    # still clearly a disc (0.02 + 0.06 + 0.11 + 0.19 + 0.26 = 0.64): log(1 - 0.64) = -1.022
    # makes the shifted chain -5.624, and the true chain wins.
    levels = [[0.26, 0.21, 0.19, 0.10, 0.05], [0.37, 0.47, 0.43, 0.24, 0.09],
              [0.42, 0.46, 0.57, 0.26, 0.10], [0.12, 0.28, 0.39, 0.36, 0.24],
              [0.04, 0.15, 0.21, 0.37, 0.40], [0.02, 0.06, 0.11, 0.19, 0.26]]
    cands = [_cand(132.0 - 40.0 * i, lv) for i, lv in enumerate(levels)]
    up = sum(np.log(levels[k][k]) for k in range(5))
    assert dec.chain_log_score(cands, (0, 1, 2, 3, 4)) == pytest.approx(up + np.log(1 - 0.64))
    assert dec.chain_log_score(cands, (1, 2, 3, 4, 5)) == pytest.approx(
        sum(np.log(levels[k + 1][k]) for k in range(5)))
    assert up > dec.chain_log_score(cands, (1, 2, 3, 4, 5))  # the level scores alone: wrong
    assert dec.label_chain(cands, 5)[0] == (1, 2, 3, 4, 5)


def test_ordered_levels_ignore_thoracic_and_sacral_candidates():
    s = _series(n=3, size=64, shape=(64, 64))
    s.pixel_spacing[:] = 4.0  # 4 mm pixels: heatmap cells are 8 mm, rows 5 cells = 40 mm apart
    hm = np.zeros((3, 5, 32, 32), dtype=np.float32)
    rows = [1, 6, 11, 15, 20, 25, 29, 31]  # two thoracic, five lumbar, one sacral line
    hm[1, 0, rows[0], 10] = hm[1, 0, rows[1], 10] = 0.7  # L1/L2's channel on both thoracic
    for k in range(5):
        hm[1, k, rows[k + 2], 10] = 0.6
    hm[1, 4, rows[7], 10] = 0.3  # the sacral line: L5/S1's channel, faintly
    cells = dec.ordered_level_cells(hm, list(range(5)), s, stride=2, min_sep_mm=15.0)
    assert cells == {k: (rows[k + 2], 10) for k in range(5)}


def _stack_series(study: int, series_id: int, z: np.ndarray, first_instance: int
                  ) -> D.PreparedSeries:
    """Axial slices at heights ``z`` (ascending), rows along +x, columns along +y, 1 mm pixels."""
    n = len(z)
    return D.PreparedSeries(
        study_id=study, series_id=series_id, images=np.zeros((n, 64, 64), dtype=np.uint8),
        depth=np.zeros(n, dtype=np.float32), instance_numbers=np.arange(n) + first_instance,
        shapes=np.tile([256, 256], (n, 1)),
        positions=np.array([[-100.0, -100.0, zi] for zi in z]),
        pixel_spacing=np.ones((n, 2)), orientation=np.array([1.0, 0, 0, 0, 1.0, 0]))


class _FakeSagittal(torch.nn.Module):
    """Level k peaks at cell (DISC_ROWS[k], 12) on the middle slice (position plane 0) only."""

    def forward(self, x):
        out = torch.full((x.shape[0], 5, 32, 32), -30.0)
        for b in range(x.shape[0]):
            if float(x[b, -1, 0, 0]) == 0.0:
                for k, r in enumerate(DISC_ROWS):
                    out[b, k, r, 12] = 5.0
        return out


class _FakeAxial(torch.nn.Module):
    """Every channel peaks at cell (16, 12) of every slice: only the geometry picks a slice."""

    def forward(self, x):
        out = torch.full((x.shape[0], 10, 32, 32), -30.0)
        out[:, :, 16, 12] = 5.0
        return out


DISC_ROWS = [4, 9, 14, 19, 24]


class _FakeT1(torch.nn.Module):
    """Left foramina (channels 0-4) on the slice at +4 mm (patient left), right (5-9) at -4 mm,
    every channel of a side on all five discs at column 14, and L1/L2's left channel also,
    more strongly, on a thoracic disc at row 0: only the Sagittal T2 discs can sort them."""

    def forward(self, x):
        out = torch.full((x.shape[0], 10, 32, 32), -30.0)
        for b in range(x.shape[0]):
            side = {1.0: range(5), -1.0: range(5, 10)}.get(float(x[b, -1, 0, 0]), ())
            for k in side:
                for r in DISC_ROWS:
                    out[b, k, r, 14] = 5.0
            if 0 in side:
                out[b, 0, 0, 14] = 9.0
        return out


def _sagittal_1mm(series_id: int) -> D.PreparedSeries:
    """3 sagittal slices at x = -4, 0, 4 (position planes -1, 0, 1), IPP (x, -100, 100), rows
    along +y, columns along -z, 1 mm pixels, 256 px native on a 64 px grid."""
    return D.PreparedSeries(
        study_id=5, series_id=series_id, images=np.zeros((3, 64, 64), dtype=np.uint8),
        depth=np.array([-1.0, 0.0, 1.0], dtype=np.float32), instance_numbers=np.array([1, 2, 3]),
        shapes=np.tile([256, 256], (3, 1)),
        positions=np.array([[x, -100.0, 100.0] for x in (-4.0, 0.0, 4.0)]),
        pixel_spacing=np.ones((3, 2)), orientation=np.array([0.0, 1.0, 0, 0, 0, -1.0]))


def test_two_axial_stacks_get_their_slices_from_the_sagittal_discs():
    from spinegrade.constants import AXIAL_T2, SAGITTAL_T1, SAGITTAL_T2

    # Sagittal T2: 3 slices at x = -4, 0, 4; rows along +y, columns along -z; 1 mm pixels,
    # 256 px native on a 64 px grid, stride 2: heatmap cell (r, c) is native pixel
    # (8c + 3.5, 8r + 3.5). Disc k at cell (DISC_ROWS[k], 12) = native (99.5, 35.5 + 40k), so
    # in patient coordinates (0, -100 + 99.5, 100 - 35.5 - 40k) = (0, -0.5, 64.5 - 40k).
    sag = _sagittal_1mm(20)
    # Two axial stacks 5 mm apart: A at z = 10..80 (instances 101..115), B at z = -110..0
    # (201..223). Discs at z 64.5, 24.5 fall in A on z = 65 (index 11) and 25 (index 3);
    # -15.5, -55.5, -95.5 in B on -15 (19), -55 (11), -95 (3). (-15.5 is 25.5 mm from A's
    # lowest plane, beyond 1.5 slice gaps.)
    a = _stack_series(5, 30, 10.0 + 5.0 * np.arange(15), 101)
    b = _stack_series(5, 31, -110.0 + 5.0 * np.arange(23), 201)
    t1 = _sagittal_1mm(21)
    models = {"sagittal_t2_stir": (D.make_task(SAGITTAL_T2), _FakeSagittal()),
              "sagittal_t1": (D.make_task(SAGITTAL_T1), _FakeT1()),
              "axial_t2": (D.make_task(AXIAL_T2), _FakeAxial())}
    lcfg = LocalizerConfig(img_size=64, heatmap_stride=2, refine_radius=1, n_context_slices=1,
                           min_score=0.01)
    out = L.locate_study(models, [(SAGITTAL_T2, sag), (SAGITTAL_T1, t1), (AXIAL_T2, a),
                                  (AXIAL_T2, b)], lcfg, torch.device("cpu"))
    spinal = out[out["condition"] == "spinal_canal_stenosis"].sort_values("level_idx")
    assert spinal["instance_number"].tolist() == [2] * 5
    assert spinal["method"].tolist() == ["chain"] * 5
    np.testing.assert_allclose(spinal["y"], 35.5 + 40.0 * np.arange(5), atol=1e-6)
    axial = out[out["series_description"] == AXIAL_T2]
    assert len(axial) == 10 and set(axial["method"]) == {"geometry"}
    for cond in ("left_subarticular_stenosis", "right_subarticular_stenosis"):
        got = axial[axial["condition"] == cond].sort_values("level_idx")
        assert got["series_id"].tolist() == [30, 30, 31, 31, 31]
        assert got["instance_number"].tolist() == [112, 104, 220, 212, 204]
    # Sagittal T1: each foramen found near its own disc (cell (DISC_ROWS[k], 14) = native
    # (115.5, 35.5 + 40k)) on its side's slice, never on the decoy at row 0.
    for cond, inst in (("left_neural_foraminal_narrowing", 3),
                       ("right_neural_foraminal_narrowing", 1)):
        got = out[out["condition"] == cond].sort_values("level_idx")
        assert got["method"].tolist() == ["sagittal"] * 5
        assert got["instance_number"].tolist() == [inst] * 5
        np.testing.assert_allclose(got["y"], 35.5 + 40.0 * np.arange(5), atol=1e-6)
        np.testing.assert_allclose(got["x"], 115.5, atol=1e-6)


def test_patient_point_uses_each_slices_own_orientation():
    s = _series(n=2)
    # Slice 1 is tilted to an axial plane (rows along +x, columns along +y): a block of its own.
    s.orientations = np.array([[0.0, 1.0, 0, 0, 0, -1.0], [1.0, 0, 0, 0, 1.0, 0]])
    np.testing.assert_allclose(s.patient_point(0, 10.0, 20.0), [0.0, -10.0 + 8.0, 50.0 - 10.0])
    # 10 columns x 0.8 mm along +x, 20 rows x 0.5 mm along +y from IPP (4, -10, 50).
    np.testing.assert_allclose(s.patient_point(1, 10.0, 20.0), [4.0 + 8.0, -10.0 + 10.0, 50.0])


def test_sagittal_t1_votes_on_the_level_of_each_t2_disc():
    from spinegrade.constants import SAGITTAL_T1

    # The sagittal geometry of the axial-stacks test: cell (r, c) of any slice lies at
    # patient (x_j, -100 + 8c + 3.5, 100 - 8r - 3.5); the T1 left foramen channels (0-4)
    # vote 0.8 for level k at cell (DISC_ROWS[k], 12) of the slice at x = +4.
    t1 = _sagittal_1mm(21)
    hm = np.zeros((3, 10, 32, 32), dtype=np.float32)
    for k, r in enumerate(DISC_ROWS):
        hm[2, k, r, 12] = 0.8
    scored = L._Scored(SAGITTAL_T1, t1, D.make_task(SAGITTAL_T1), hm)
    lcfg = LocalizerConfig(img_size=64, heatmap_stride=2)
    vote = L.t1_evidence(scored, lcfg)
    # A T2 candidate at L2/L3's disc, (0, -0.5, 24.5), that the T2 channels took for L1/L2.
    cand = dec.DiscCandidate((9, 12), 1, np.array([0.0, -0.5, 24.5]), 24.5, 0.5,
                             np.array([0.5, 0.1, 0.0, 0.0, 0.0]))
    (fused,) = vote([cand])
    # Left side votes (0, 0.8, 0, 0, 0), right side nothing: mean (0, 0.4, 0, 0, 0), level
    # shares (0, 1, 0, 0, 0). The T2 shares are (5/6, 1/6, 0, 0, 0); their average
    # (5/12, 7/12, 0, 0, 0) times the T2 disc probability 0.5 is (0.2083, 0.2917, 0, 0, 0):
    # T1 moves the level towards L2/L3 but leaves the disc probability to T2.
    np.testing.assert_allclose(fused.levels, [0.5 * 5 / 12, 0.5 * 7 / 12, 0.0, 0.0, 0.0])
    assert fused.disc == pytest.approx(0.5)
    # A candidate without geometry is left as it is.
    blind = dataclasses.replace(cand, point=np.full(3, np.nan))
    assert vote([blind])[0] is blind


def test_shift_rows_by_hand():
    x = np.arange(12, dtype=np.float32).reshape(1, 4, 3)
    np.testing.assert_array_equal(L.shift_rows(x, 1)[0], [[0, 0, 0], [0, 1, 2], [3, 4, 5], [6, 7, 8]])
    np.testing.assert_array_equal(L.shift_rows(x, -2)[0], [[6, 7, 8], [9, 10, 11], [0, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(L.shift_rows(x, 0), x)
    lcfg = dataclasses.replace(LocalizerConfig(), img_size=128, heatmap_stride=4)
    # 0.125 x 128 = 16 px = 4 cells; 0.1 x 128 = 12.8 px -> 3 cells = 12 px.
    assert L.shift_pixels(lcfg, (0.0, 0.125, -0.1)) == (0, 16, -12)


class _PoolModel(torch.nn.Module):
    """Heatmaps = the first input channel average-pooled by ``stride`` (translation
    equivariant by whole cells), plus a constant channel."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.avg_pool2d(x[:, :1], self.stride)
        return torch.cat([torch.logit(pooled.clamp(1e-4, 1 - 1e-4)), torch.full_like(pooled, 2.0)], 1)


def test_shifted_views_average_back_onto_the_same_cells():
    """An equivariant network gives the same heatmaps with and without shifted framings
    (moved back exactly); a constant one stays constant at the edges a view did not see
    (averaged over the views that saw each cell, not diluted by the zeros shifted in)."""
    series = _series(n=3, size=32)
    rng = np.random.default_rng(0)
    series = dataclasses.replace(series, images=rng.integers(0, 255, (3, 32, 32)).astype(np.uint8))
    model = _PoolModel(stride=4)
    one = L.heatmaps(model, series, 0, torch.device("cpu")).numpy()
    three = L.heatmaps(model, series, 0, torch.device("cpu"), shifts=(0, 8, -8)).numpy()
    assert three.shape == one.shape == (3, 2, 8, 8)
    np.testing.assert_allclose(three, one, atol=1e-5)
    np.testing.assert_allclose(three[:, 1], 1 / (1 + np.exp(-2.0)), atol=1e-6)
