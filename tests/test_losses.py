"""Losses against torch's reference and hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spinegrade.config import ConfigError, load_config
from spinegrade.constants import CLASS_WEIGHTS, NUM_CLASSES
from spinegrade.losses import (
    CompetitionWeightedCE,
    CoralLoss,
    CumulativeOrdinalLoss,
    aux_loss,
    build_loss,
)

LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.2, 1.5, 0.3], [-0.5, 0.1, 0.9]])
LABELS = torch.tensor([0, 2, 1])


def _np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_weighted_ce_equals_torch_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, NUM_CLASSES, generator=g) * 3
    y = torch.randint(0, NUM_CLASSES, (64,), generator=g)
    ref = F.cross_entropy(logits, y, weight=torch.tensor(CLASS_WEIGHTS))
    torch.testing.assert_close(CompetitionWeightedCE(CLASS_WEIGHTS)(logits, y), ref)
    torch.testing.assert_close(CompetitionWeightedCE(None)(logits, y), F.cross_entropy(logits, y))


def test_focal_weighted_ce_equals_hand_computed_value():
    p = _np_softmax(LOGITS.numpy().astype(np.float64))
    y = LABELS.numpy()
    w = np.array(CLASS_WEIGHTS)[y]
    py = p[np.arange(3), y]
    expected = (w * (1 - py) ** 1.5 * -np.log(py)).sum() / w.sum()
    got = CompetitionWeightedCE(CLASS_WEIGHTS, gamma=1.5)(LOGITS, LABELS)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_soft_targets_one_hot_equal_hard_and_mixup_is_weighted_by_q():
    loss = CompetitionWeightedCE(CLASS_WEIGHTS, gamma=1.5)
    one_hot = F.one_hot(LABELS, NUM_CLASSES).float()
    torch.testing.assert_close(loss(LOGITS, one_hot), loss(LOGITS, LABELS))
    # Mixup of sample i with sample j: q = lam * e_yi + (1 - lam) * e_yj.
    lam = 0.7
    q = lam * one_hot + (1 - lam) * one_hot.roll(1, 0)
    p = _np_softmax(LOGITS.numpy().astype(np.float64))
    qw = q.numpy() * np.array(CLASS_WEIGHTS)
    expected = (qw * (1 - p) ** 1.5 * -np.log(p)).sum() / qw.sum()
    assert loss(LOGITS, q).item() == pytest.approx(expected, rel=1e-5)


def test_coral_loss_equals_hand_computed_bce():
    logits = torch.tensor([[-2.0, -2.95], [1.0, -0.5], [2.0, 1.0]])
    y = np.array([0, 1, 2])
    t = np.stack([(y > 0), (y > 1)], 1).astype(np.float64)
    s = 1 / (1 + np.exp(-logits.numpy().astype(np.float64)))
    bce = -(t * np.log(s) + (1 - t) * np.log(1 - s)).sum(1)
    w = np.array(CLASS_WEIGHTS)[y]
    got = CoralLoss(CLASS_WEIGHTS)(logits, torch.from_numpy(y))
    assert got.item() == pytest.approx((w * bce).sum() / w.sum(), rel=1e-5)


def test_cumulative_ordinal_loss_matches_formula_and_punishes_far_errors_more():
    p = _np_softmax(LOGITS.numpy().astype(np.float64))
    y = LABELS.numpy()
    above = np.stack([p[:, 1:].sum(1), p[:, 2]], 1)
    t = np.stack([(y > 0), (y > 1)], 1)
    expected = -(t * np.log(above) + (1 - t) * np.log(1 - above)).sum(1).mean()
    got = CumulativeOrdinalLoss(None)(LOGITS, LABELS)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    loss = CumulativeOrdinalLoss(None)
    severe = torch.tensor([2])
    says_normal = torch.tensor([[4.0, 0.0, 0.0]])
    says_moderate = torch.tensor([[0.0, 4.0, 0.0]])
    assert loss(says_normal, severe) > loss(says_moderate, severe)


def test_aux_loss_targets_level_and_labelled_slice():
    g = torch.Generator().manual_seed(0)
    outputs = {"aux_level": torch.randn(4, 5, generator=g), "aux_slice": torch.randn(4, 7, generator=g)}
    batch = {"level": torch.tensor([0, 1, 4, 2]), "slice_offset": torch.tensor([0, 1, -2, 0])}
    expected = (F.cross_entropy(outputs["aux_level"], batch["level"])
                + F.cross_entropy(outputs["aux_slice"], torch.tensor([3, 4, 1, 3])))
    torch.testing.assert_close(aux_loss(outputs, batch), expected)
    with pytest.raises(ConfigError, match="aux_heads"):
        aux_loss({"logits": torch.zeros(1, 3)}, {"level": torch.zeros(1, dtype=torch.long)})


@pytest.mark.parametrize("version", ["v4", "v5", "v6", "v7", "v8"])
def test_each_version_builds_a_finite_differentiable_loss(version):
    cfg = load_config(f"configs/{version}.yaml")
    loss = build_loss(cfg.loss, head=cfg.model.head)
    n = NUM_CLASSES - 1 if cfg.model.head == "coral" else NUM_CLASSES
    # Crossed CORAL thresholds (logit 1 > logit 0) give a zero probability: still finite.
    logits = torch.tensor([[-3.0, 3.0][:n] + [0.5] * (n - 2), [1.0, 0.0, 2.0][:n]], requires_grad=True)
    outputs = {"logits": logits, "aux_level": torch.zeros(2, 5, requires_grad=True),
               "aux_slice": torch.zeros(2, 7, requires_grad=True)}
    batch = {"label": torch.tensor([1, 2]), "level": torch.tensor([0, 3])}
    terms = loss.components(outputs, batch)
    assert torch.isfinite(terms["total"]) and ("aux" in terms) == (cfg.loss.aux_weight > 0)
    assert ("ordinal" in terms) == (cfg.loss.ordinal_weight > 0)
    terms["total"].backward()
    assert torch.isfinite(logits.grad).all()
    # Mixup soft targets take precedence over the hard label: a one-hot soft target of
    # another class gives that class's hard-label loss, not the batch label's.
    other = (batch["label"] + 1) % NUM_CLASSES
    soft = dict(batch, label_soft=F.one_hot(other, NUM_CLASSES).float())
    with torch.no_grad():
        got, want = loss(outputs, soft), loss(outputs, dict(batch, label=other))
        torch.testing.assert_close(got, want)
        assert not torch.isclose(got, terms["total"].detach())


def test_v8_loss_is_plain_weighted_ce():
    cfg = load_config("configs/v8.yaml")
    loss = build_loss(cfg.loss)
    batch = {"label": LABELS, "level": torch.zeros(3, dtype=torch.long)}
    ref = F.cross_entropy(LOGITS, LABELS, weight=torch.tensor(CLASS_WEIGHTS))
    torch.testing.assert_close(loss({"logits": LOGITS}, batch), ref)


def test_build_loss_rejects_mismatched_settings():
    with pytest.raises(ConfigError, match="model.head=coral"):
        build_loss(load_config("configs/v6.yaml").loss, head="softmax")
    with pytest.raises(ConfigError, match="ordinal_weight > 0"):
        build_loss(load_config("configs/v7.yaml", ["loss.ordinal_weight=0"]).loss)
    with pytest.raises(ConfigError, match="no ordinal"):
        build_loss(load_config("configs/v8.yaml", ["loss.ordinal_weight=0.5"]).loss)


def _np_coral_probs(logits: np.ndarray) -> np.ndarray:
    """K=3 CORAL decoding (models.heads docs): p0 = s(l0), p1 = min(s(l1), p0)."""
    s = 1 / (1 + np.exp(-logits))
    above0, above1 = s[:, 0], np.minimum(s[:, 1], s[:, 0])
    return np.stack([1 - above0, above0 - above1, above1], 1)


CORAL_LOGITS = torch.tensor([[-2.0, -2.95], [1.0, -0.5], [2.0, 1.0], [0.3, 0.8]])  # last: crossed
CORAL_Y = np.array([0, 1, 2, 2])  # crossed row: p1 = 0, so label it 2


def test_weighted_ce_on_a_coral_head_is_ce_of_the_decoded_probabilities():
    # v8's weighted CE on a CORAL head: -sum_b w[y_b] log p_b[y_b] / sum_b w[y_b] with p the
    # decoded CORAL probabilities (no ordinal term: v8 has ordinal_weight 0).
    loss = build_loss(load_config("configs/v8.yaml").loss, head="coral")
    p = _np_coral_probs(CORAL_LOGITS.numpy().astype(np.float64))
    w = np.array(CLASS_WEIGHTS)[CORAL_Y]
    expected = (w * -np.log(p[np.arange(4), CORAL_Y])).sum() / w.sum()
    got = loss({"logits": CORAL_LOGITS}, {"label": torch.from_numpy(CORAL_Y)})
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_v6_coral_ce_is_focal_ce_on_decoded_probs_plus_coral_bce():
    # v6: focal CE (gamma 1.5, unweighted) on the decoded probabilities + 1.0 x CORAL BCE
    # (sum over thresholds of BCE(l_k, 1[y > k]), unweighted mean over samples).
    cfg = load_config("configs/v6.yaml")
    assert (cfg.loss.focal_gamma, cfg.loss.ordinal_weight, cfg.loss.use_class_weights) == (1.5, 1.0, False)
    loss = build_loss(cfg.loss, head="coral")
    logits = CORAL_LOGITS.numpy().astype(np.float64)
    p = _np_coral_probs(logits)[np.arange(4), CORAL_Y]
    focal = ((1 - p) ** 1.5 * -np.log(p)).mean()
    s = 1 / (1 + np.exp(-logits))
    t = np.stack([CORAL_Y > 0, CORAL_Y > 1], 1).astype(np.float64)
    coral = -(t * np.log(s) + (1 - t) * np.log(1 - s)).sum(1).mean()
    terms = loss.components({"logits": CORAL_LOGITS}, {"label": torch.from_numpy(CORAL_Y)})
    assert terms["main"].item() == pytest.approx(focal, rel=1e-5)
    assert terms["ordinal"].item() == pytest.approx(coral, rel=1e-5)
    assert terms["total"].item() == pytest.approx(focal + coral, rel=1e-5)


def test_plan_focal_form_uses_exp_of_the_weighted_ce():
    """The plan's snippet: pt = exp(-weighted ce) = p ** w, so the focus is (1 - p ** w) ** g."""
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.3, 0.2], [-0.5, 0.0, 1.5]])
    y = torch.tensor([0, 1, 2])
    gamma, w = 2.0, np.array([1.0, 2.0, 4.0])
    p = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(1, keepdims=True)
    py, wy = p[np.arange(3), y.numpy()], w[y.numpy()]
    textbook = (wy * (1 - py) ** gamma * -np.log(py)).sum() / wy.sum()
    plan = (wy * (1 - py ** wy) ** gamma * -np.log(py)).sum() / wy.sum()
    assert plan > textbook  # p ** w < p: weighted samples count as less well classified
    got_textbook = CompetitionWeightedCE(CLASS_WEIGHTS, gamma=gamma)(logits, y)
    got_plan = CompetitionWeightedCE(CLASS_WEIGHTS, gamma=gamma, focal_form="plan")(logits, y)
    assert got_textbook.item() == pytest.approx(textbook, rel=1e-5)
    assert got_plan.item() == pytest.approx(plan, rel=1e-5)
    # Without class weights the two forms are one.
    unweighted = [CompetitionWeightedCE(None, gamma=gamma, focal_form=f)(logits, y).item()
                  for f in ("textbook", "plan")]
    assert unweighted[0] == pytest.approx(unweighted[1])
    cfg = load_config("v4", ["loss.focal_form=plan"])
    assert build_loss(cfg.loss).main.focal_form == "plan"
    assert load_config("v4").loss.focal_form == "textbook"   # the default
    with pytest.raises(ConfigError, match="focal_form"):
        load_config("v4", ["loss.focal_form=paper"])
