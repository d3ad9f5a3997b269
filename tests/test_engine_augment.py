"""Batched augmentation, TTA views and checkpoint round trips."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from spinegrade.data.augment import BatchAugment, affine_slices, channels_last_5d, mixup, zoom
from spinegrade.engine.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from spinegrade.engine.tta import predict_views, tta_views
from spinegrade.errors import UserError


def _batch(b=4, s=7, size=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, s, 3, size, size, generator=g)


def test_all_slices_of_a_sample_share_one_transform():
    x = _batch()
    same = x[:, :1].expand_as(x).clone()  # identical slices in each sample
    out, offset = BatchAugment(rotate_deg=15, shift=0.1, gamma=0.2)(same, torch.Generator().manual_seed(1))
    assert torch.equal(offset, torch.zeros(4, dtype=torch.int64))
    for k in range(1, 7):
        torch.testing.assert_close(out[:, k], out[:, 0])
    # ... while different samples get different transforms.
    assert not torch.allclose(out[0, 0], out[1, 0])
    assert out.min() >= 0 and out.max() <= 1


def test_zero_strength_is_identity_and_same_generator_same_result():
    x = _batch()
    ident = BatchAugment(rotate_deg=0, shift=0, scale=(1, 1), brightness=0, gamma=0)
    out, _ = ident(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)
    aug = BatchAugment()
    a, _ = aug(x, torch.Generator().manual_seed(5))
    b, _ = aug(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_no_flip_a_shift_moves_content_the_expected_way():
    x = torch.zeros(1, 1, 1, 8, 8)
    x[..., 2] = 1.0  # a vertical line at column 2
    # theta maps output -> input; tx = -0.5 (normalised) samples 2 px to the left.
    theta = torch.tensor([[[1.0, 0.0, -0.5], [0.0, 1.0, 0.0]]])
    out = affine_slices(x, theta)
    assert out[0, 0, 0, 4].argmax().item() == 4


def test_slice_jitter_reports_where_the_labelled_slice_went():
    s = 7
    x = torch.arange(s, dtype=torch.float32).view(1, s, 1, 1, 1).expand(16, s, 3, 4, 4) / 10
    aug = BatchAugment(rotate_deg=0, shift=0, scale=(1, 1), brightness=0, gamma=0, slice_jitter=2)
    out, offset = aug(x.contiguous(), torch.Generator().manual_seed(0))
    assert offset.abs().max() <= 2 and offset.abs().max() > 0
    for i in range(16):  # the original centre slice (value 0.3) sits at S//2 + offset
        assert out[i, s // 2 + offset[i], 0, 2, 2].item() == pytest.approx(0.3, abs=1e-5)


def test_mixup_is_a_convex_combination():
    x = _batch()
    mixed, perm, lam = mixup(x, 0.4, torch.Generator().manual_seed(0))
    assert 0 <= lam <= 1
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x[perm])


def test_channels_last_5d_keeps_values():
    x = _batch()
    y = channels_last_5d(x)
    assert torch.equal(x, y)
    assert y.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)


class _Toy(torch.nn.Module):
    def forward(self, x, level):
        m = x.mean(dim=(1, 2, 3, 4))
        return {"logits": torch.stack([m, 2 * m, 0 * m], 1)}

    def probabilities(self, logits):
        return logits.softmax(-1)


def test_zoom_scales_a_centred_square_about_the_image_centre():
    # 8-px square on columns/rows 12..19 of a 32-px image, centred on the image centre (15.5).
    # zoom(s) samples output pixel i at input (i - 15.5) / s + 15.5 (bilinear). At s = 2 the
    # interpolated value exceeds 0.5 where that lies in (11.5, 19.5): i = 8..23, 16 px.
    x = torch.zeros(1, 1, 1, 32, 32)
    x[..., 12:20, 12:20] = 1.0
    big = zoom(x, 2.0)[0, 0, 0] > 0.5
    assert big.sum(-1).max() == 16 and big.sum(-2).max() == 16 and big.sum() == 256
    assert big[8:24, 8:24].all()
    # s = 0.5: input (i - 15.5) * 2 + 15.5 in (11.5, 19.5) -> i = 14..17, 4 px.
    small = zoom(x, 0.5)[0, 0, 0] > 0.5
    assert small.sum() == 16 and small[14:18, 14:18].all()
    assert torch.equal(zoom(x, 1.0), x)
    assert not torch.allclose(zoom(x, 1.1), x)


def test_tta_views_are_identity_brightness_and_scale_averaged():
    views = tta_views((0.9, 1.1), (0.9, 1.1))
    assert len(views) == 5
    x, level, model = _batch() * 0.5, torch.zeros(4, dtype=torch.long), _Toy()
    probs, first = predict_views(model, x, level, views)
    expected = sum(model.probabilities(model(v(x), level)["logits"]) for v in
                   [lambda t: t, lambda t: t * 0.9, lambda t: t * 1.1,
                    lambda t: zoom(t, 0.9), lambda t: zoom(t, 1.1)]) / 5
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(first["logits"], model(x, level)["logits"])


def test_checkpoint_round_trip_weights_only_with_rng(tmp_path):
    gen = torch.Generator().manual_seed(3)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = rng_state(gen)
    expected = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen).item())
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    path = save_checkpoint(tmp_path / "c.pt", {"model": model.state_dict(), "rng": state,
                                              "optimizer": opt.state_dict(), "config": {"a": [1]}})
    ck = load_checkpoint(path)  # weights_only=True inside
    assert ck["format_version"] == 1 and ck["class_names"] == ["normal_mild", "moderate", "severe"]
    set_rng_state(ck["rng"], gen)
    assert (random.random(), np.random.rand(), torch.rand(1).item(),
            torch.rand(1, generator=gen).item()) == expected
    restored = torch.nn.Linear(3, 2)
    restored.load_state_dict(ck["model"])
    assert ck["model"].keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(ck["model"][name], tensor), name
        assert torch.equal(restored.state_dict()[name], tensor), name
    opt2 = torch.optim.AdamW(restored.parameters())
    opt2.load_state_dict(ck["optimizer"])
    for key in ("exp_avg", "exp_avg_sq", "step"):
        for i in range(2):
            assert torch.equal(opt2.state_dict()["state"][i][key], opt.state_dict()["state"][i][key])
    assert ck["config"] == {"a": [1]}


class _NotATensor:
    """A custom class: pickled by reference, so weights_only loading must refuse it."""

    def __init__(self) -> None:
        self.value = 1


def test_checkpoint_with_custom_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "class_names": ["normal_mild", "moderate", "severe"],
                "model": {"w": torch.zeros(1)}, "extra": _NotATensor()}, path)
    with pytest.raises(UserError, match="not a readable spinegrade checkpoint"):
        load_checkpoint(path)
    # The same payload without the object loads: the refusal is about the object only.
    torch.save({"format_version": 1, "class_names": ["normal_mild", "moderate", "severe"],
                "model": {"w": torch.zeros(1)}}, path)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.zeros(1))


def test_bad_checkpoint_is_a_user_error(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError):
        load_checkpoint(tmp_path / "x.pt")
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
