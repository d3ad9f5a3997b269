"""Models: every variant (v4..v8, every aggregator) on a tiny timm backbone at 32 px."""

from __future__ import annotations

import hashlib
import logging

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import adapt_input_conv

from spinegrade import choices
from spinegrade.config import ConfigError, load_config
from spinegrade.config_checks import CHOICES
from spinegrade.constants import CORAL_PRIOR_LOGITS, NUM_CLASSES, NUM_LEVELS, PRIOR_LOGITS
from spinegrade.errors import UserError
from spinegrade.losses import build_loss
from spinegrade.models import build_model, coral_to_probs, create_backbone
from spinegrade.models.aggregators import AGGREGATOR_BUILDERS, create_aggregator
from spinegrade.models.conditioning import LevelEmbedding, LevelFiLM
from spinegrade.models.heads import HEAD_CLASSES

TINY = "test_efficientnet"
S, IMG = 7, 32

VARIANTS = {
    "v4": ("v4", []),
    "v5": ("v5", []),
    "v6": ("v6", []),
    "v7": ("v7", []),
    "v8": ("v8", []),
    "v8-attention_mil": ("v8", ["model.aggregator=attention_mil"]),
    "v8-bilstm_attention": ("v8", ["model.aggregator=bilstm_attention"]),
    "v8-bigru_attn": ("v8", ["model.aggregator=bigru_attn"]),
    "v8-bilstm_attn_mean": ("v8", ["model.aggregator=bilstm_attn_mean"]),
    "v8-hidden-head-film": ("v8", ["model.head_hidden=32", "model.level_conditioning=film"]),
}


def tiny_cfg(version: str, *overrides: str):
    return load_config(f"configs/{version}.yaml",
                       [f"model.backbone={TINY}", "model.pretrained=false", *overrides])


def make_batch(b: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(b, S, 3, IMG, IMG, generator=g),
        "level": torch.arange(b) % NUM_LEVELS,
        "label": torch.arange(b) % NUM_CLASSES,
        "slice_offset": torch.zeros(b, dtype=torch.long),
    }


def forward_loss(model, cfg, batch):
    out = model(batch["image"], batch["level"])
    return out, build_loss(cfg.loss, head=cfg.model.head)(out, batch)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_shapes_and_gradients(name):
    version, overrides = VARIANTS[name]
    cfg = tiny_cfg(version, *overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, n_slices=S)
    batch = make_batch()
    out, loss = forward_loss(model, cfg, batch)
    n_logits = NUM_CLASSES - 1 if cfg.model.head == "coral" else NUM_CLASSES
    assert out["logits"].shape == (3, n_logits)
    probs = model.probabilities(out["logits"])
    assert probs.shape == (3, NUM_CLASSES)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))
    if cfg.model.aux_heads:
        assert out["aux_level"].shape == (3, NUM_LEVELS) and out["aux_slice"].shape == (3, S)
    assert torch.isfinite(loss)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"parameters without gradient: {no_grad}"


@pytest.mark.parametrize("version", ["v8", "v7", "v5"])
def test_frozen_backbone_gets_no_gradient_and_keeps_bn_in_eval(version):
    cfg = tiny_cfg(version)
    model = build_model(cfg.model, n_slices=S)
    model.set_backbone_trainable(False)
    model.train()
    assert not model.backbone.training and model.head.training
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and not any(m.training for m in bns)
    running = bns[0].running_mean.clone()
    _, loss = forward_loss(model, cfg, make_batch())
    loss.backward()
    assert all(p.grad is None for p in model.backbone_parameters())
    assert all(p.grad is not None for p in model.head_parameters())
    torch.testing.assert_close(bns[0].running_mean, running)
    model.set_backbone_trainable(True)
    assert model.backbone.training and all(p.requires_grad for p in model.backbone_parameters())


def test_parameter_groups_partition_the_model():
    model = build_model(tiny_cfg("v4").model, n_slices=S)
    backbone = {id(p) for p in model.backbone_parameters()}
    head = {id(p) for p in model.head_parameters()}
    assert backbone and head and not backbone & head
    assert backbone | head == {id(p) for p in model.parameters()}


def test_v8_aggregator_starts_on_the_centre_slice():
    model = build_model(tiny_cfg("v8").model, n_slices=S)
    w = model.slice_weights()
    assert w.shape == (S,) and int(w.argmax()) == S // 2
    assert (w[S // 2] > w[torch.arange(S) != S // 2]).all()
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    assert build_model(tiny_cfg("v5").model, n_slices=S).slice_weights() is None


@pytest.mark.parametrize("version,prior", [("v8", PRIOR_LOGITS), ("v6", CORAL_PRIOR_LOGITS)])
def test_initial_probabilities_equal_the_prior(version, prior):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(version).model, n_slices=S).eval()
    batch = make_batch(b=8)
    with torch.no_grad():
        logits = model(batch["image"], batch["level"])["logits"]
    prior = torch.tensor(prior)
    expected = coral_to_probs(prior[None]) if version == "v6" else prior.softmax(0)[None]
    # The final weight starts tiny, so logits equal the bias up to a small input term.
    torch.testing.assert_close(logits, prior.expand_as(logits), atol=0.05, rtol=0)
    torch.testing.assert_close(model.probabilities(logits), expected.expand(8, -1), atol=0.01, rtol=0)


def test_log_prior_bias_from_class_counts():
    counts = [80, 12, 8]
    m = build_model(tiny_cfg("v8", "model.bias_init=log_prior").model, class_counts=counts)
    torch.testing.assert_close(m.head.fc.bias.softmax(0), torch.tensor([0.80, 0.12, 0.08]))
    m = build_model(tiny_cfg("v6", "model.bias_init=log_prior").model, class_counts=counts)
    torch.testing.assert_close(m.head.bias.sigmoid(), torch.tensor([0.20, 0.08]))
    # Without counts (e.g. before loading a checkpoint) the fixed prior is used.
    m = build_model(tiny_cfg("v8", "model.bias_init=log_prior").model)
    torch.testing.assert_close(m.head.fc.bias, torch.tensor(PRIOR_LOGITS))


def test_reset_head_bias():
    model = build_model(tiny_cfg("v8").model)
    with torch.no_grad():
        model.head.fc.bias.fill_(5.0)
    model.reset_head_bias()
    torch.testing.assert_close(model.head.fc.bias.detach(), torch.tensor(PRIOR_LOGITS))


def test_film_and_embedding_parameter_counts():
    # The seed's numbers: FiLM gamma+beta on F=1280 features vs a 256-d embedding, 5 levels.
    assert sum(p.numel() for p in LevelFiLM(NUM_LEVELS, 1280).parameters()) == 12_800
    assert sum(p.numel() for p in LevelEmbedding(NUM_LEVELS, 256).parameters()) == 1_280
    model = build_model(tiny_cfg("v5").model)
    assert sum(p.numel() for p in model.film.parameters()) == 2 * NUM_LEVELS * model.num_features


def test_coral_decoding_is_a_valid_distribution_for_crossed_thresholds():
    logits = torch.tensor([[-2.0, -2.95], [-3.0, 3.0], [3.0, -3.0], [0.0, 0.0], [-10.0, 10.0]])
    probs = coral_to_probs(logits)
    assert (probs >= 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(5))
    p0 = torch.sigmoid(torch.tensor(-3.0))
    torch.testing.assert_close(probs[1], torch.stack([1 - p0, torch.tensor(0.0), p0]))
    torch.testing.assert_close(probs[3], torch.tensor([0.5, 0.0, 0.5]))
    random = coral_to_probs(torch.randn(1000, 2) * 5)
    assert (random >= 0).all() and torch.allclose(random.sum(-1), torch.ones(1000))


def _synthetic_set(n: int = 100, seed: int = 0) -> dict[str, torch.Tensor]:
    """Imbalanced 80/12/8 crops whose brightness and a central blob depend on the class."""
    g = torch.Generator().manual_seed(seed)
    label = torch.tensor([0] * int(0.8 * n) + [1] * int(0.12 * n) + [2] * (n - int(0.92 * n)))
    label = label[torch.randperm(n, generator=g)]
    image = 0.1 * torch.rand(n, S, 3, IMG, IMG, generator=g) + 0.15 + 0.25 * label.view(-1, 1, 1, 1, 1)
    image[..., IMG // 4: 3 * IMG // 4, IMG // 4: 3 * IMG // 4] *= 1 + label.view(-1, 1, 1, 1, 1)
    return {"image": image.clamp(0, 1), "label": label,
            "level": torch.randint(0, NUM_LEVELS, (n,), generator=g)}


def _frozen_calibrated_model(cfg, data):
    """v8 model with a frozen backbone whose BN statistics are computed on ``data``.

    Stands in for a pretrained backbone: a random one keeps BN's default running statistics,
    which shrink its features ~1000x, far below the level embedding's scale.
    """
    model = build_model(cfg.model, n_slices=S)
    for m in model.backbone.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one pass gives the exact statistics
    model.train()
    with torch.no_grad():
        model.backbone(model._images(data["image"]))
    model.set_backbone_trainable(False)
    model.train()
    return model


def _epoch(model, loss_fn, data, opt, batch_size, g):
    """One epoch; returns per-class |gradient| of the classifier's rows, summed over steps."""
    class_grad = torch.zeros(NUM_CLASSES)
    for idx in torch.randperm(len(data["label"]), generator=g).split(batch_size):
        batch = {k: v[idx] for k, v in data.items()}
        loss = loss_fn(model(batch["image"], batch["level"]), batch)
        opt.zero_grad()
        loss.backward()
        fc = model.head.fc
        class_grad += fc.weight.grad.abs().sum(1) + fc.bias.grad.abs()
        opt.step()
    return class_grad


def test_step2_frozen_backbone_every_class_gets_gradient_every_epoch():
    torch.manual_seed(0)
    cfg = tiny_cfg("v8")
    data, g = _synthetic_set(), torch.Generator().manual_seed(1)
    model = _frozen_calibrated_model(cfg, data)
    loss_fn = build_loss(cfg.loss, head=cfg.model.head)
    opt = torch.optim.AdamW(model.head_parameters(), lr=3e-3)
    for epoch in range(5):
        grad = _epoch(model, loss_fn, data, opt, 20, g)
        assert (grad > 0).all(), f"epoch {epoch}: a class received no gradient: {grad}"


def test_step3_one_epoch_predicts_all_three_classes():
    torch.manual_seed(0)
    cfg = tiny_cfg("v8")  # weighted CE [1, 2, 4] and the prior bias
    data = _synthetic_set()
    model = _frozen_calibrated_model(cfg, data)
    with torch.no_grad():
        before = model.eval()(data["image"], data["level"])["logits"].argmax(-1)
    assert set(before.tolist()) == {0}, "before training, the prior bias predicts Normal only"
    model.train()
    loss_fn = build_loss(cfg.loss, head=cfg.model.head)
    opt = torch.optim.AdamW(model.head_parameters(), lr=3e-3)
    _epoch(model, loss_fn, data, opt, 10, torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        pred = model.probabilities(model(data["image"], data["level"])["logits"]).argmax(-1)
    assert set(pred.tolist()) == {0, 1, 2}, f"predicted classes: {pred.bincount(minlength=3)}"


def _save(state: dict, path):
    if str(path).endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pretrained_path_loads_the_saved_weights(tmp_path, suffix, caplog):
    source = timm.create_model(TINY, pretrained=False, num_classes=10)  # with a classifier
    path = tmp_path / f"weights{suffix}"
    _save(source.state_dict(), path)
    with caplog.at_level(logging.INFO, logger="spinegrade.models.backbone"):
        backbone, info = create_backbone(TINY, pretrained=True, pretrained_path=str(path))
    assert info.source == "file" and not info.missing_keys
    assert any("loaded weights from file" in r.getMessage() for r in caplog.records)
    for k, v in backbone.state_dict().items():
        torch.testing.assert_close(v, source.state_dict()[k], msg=k)


def test_pretrained_path_adapts_a_3_channel_stem_to_7_channels(tmp_path):
    source = timm.create_model(TINY, pretrained=False, num_classes=0)
    path = tmp_path / "rgb.pth"
    torch.save({"state_dict": source.state_dict()}, path)  # wrapped, as training scripts save
    cfg = tiny_cfg("v7", f"model.pretrained_path={path}", "model.stem_init=adapt")
    model = build_model(cfg.model, n_slices=S)
    stem = model.backbone.conv_stem.weight
    assert stem.shape[1] == S and model.normalize.mean.shape[1] == S
    torch.testing.assert_close(stem.detach(), adapt_input_conv(S, source.conv_stem.weight.detach()))
    torch.testing.assert_close(model.backbone.bn1.weight.detach(), source.bn1.weight.detach())
    assert model.backbone_weights.source == "file" and not model.backbone_weights.missing_keys
    assert model.backbone_weights.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert model.backbone_weights.random_stem_channels == 0


def test_v7_stem_keeps_pretrained_filters_on_3_channels_only(tmp_path):
    """The plan: v7's 7-channel stem threw away the pretrained weights of 4 channels."""
    source = timm.create_model(TINY, pretrained=False, num_classes=0)
    path = tmp_path / "rgb.pth"
    torch.save(source.state_dict(), path)
    cfg = tiny_cfg("v7", f"model.pretrained_path={path}")
    assert cfg.model.stem_init == "rgb_plus_random"
    model = build_model(cfg.model, n_slices=S)
    stem = model.backbone.conv_stem.weight.detach()
    rgb = source.conv_stem.weight.detach()
    torch.testing.assert_close(stem[:, :3], rgb)          # unscaled pretrained RGB filters
    for c in range(3, S):                                  # neither copies nor scaled copies
        assert not torch.allclose(stem[:, c], rgb[:, c % 3] * 3 / S)
        assert not torch.allclose(stem[:, c], rgb[:, c % 3])
    # The random channels have the spread of a fresh initialisation, not zeros.
    fresh = timm.create_model(TINY, pretrained=False, num_classes=0, in_chans=S).conv_stem.weight
    assert float(stem[:, 3:].std()) == pytest.approx(float(fresh[:, 3:].detach().std()), rel=0.3)
    torch.testing.assert_close(model.backbone.bn1.weight.detach(), source.bn1.weight.detach())
    assert model.backbone_weights.random_stem_channels == S - 3
    assert "4 stem channels randomly initialised" in model.backbone_weights.describe()


def test_pretrained_path_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        create_backbone(TINY, pretrained=False, pretrained_path=str(tmp_path / "nope.pth"))
    path = tmp_path / "other.pth"
    torch.save({"foo.weight": torch.zeros(3)}, path)
    with pytest.raises(UserError, match="no key"):
        create_backbone(TINY, pretrained=False, pretrained_path=str(path))
    with pytest.raises(UserError, match="not a timm model"):
        create_backbone("tf_efficientnetv2_ss", pretrained=False)


def test_input_mode_and_aggregator_must_agree():
    with pytest.raises(ConfigError, match="input_mode=channels"):
        build_model(tiny_cfg("v8", "model.input_mode=channels").model)
    with pytest.raises(ConfigError, match="input_mode=channels"):
        build_model(tiny_cfg("v8", "model.aggregator=none").model)


def test_default_v8_is_efficientnetv2_s_rgb_1280():
    cfg = load_config("configs/v8.yaml", ["model.pretrained=false"])
    model = build_model(cfg.model, n_slices=S)
    assert model.backbone.pretrained_cfg["architecture"] == "tf_efficientnetv2_s"
    assert model.backbone.conv_stem.in_channels == 3 and model.num_features == 1280
    torch.testing.assert_close(model.normalize.mean.flatten(), torch.tensor([0.5, 0.5, 0.5]))
    assert model.backbone_weights.source == "random"


def test_hub_unreachable_falls_back_to_random_init_with_a_warning(monkeypatch, caplog):
    real = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("simulated: no network")
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    cfg = tiny_cfg("v8", "model.pretrained=true")
    with caplog.at_level(logging.WARNING, logger="spinegrade.models.backbone"):
        model = build_model(cfg.model, n_slices=S)
    assert model.backbone_weights.source == "random" and "no network" in model.backbone_weights.detail
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(msgs) == 1 and "RANDOMLY INITIALISED" in msgs[0]


def test_channels_last_and_grad_checkpointing_match_the_plain_forward():
    torch.manual_seed(0)
    model = build_model(tiny_cfg("v8").model, n_slices=S).eval()
    batch = make_batch()
    with torch.no_grad():
        ref = model(batch["image"], batch["level"])["logits"]
        model.to(memory_format=torch.channels_last)
        torch.testing.assert_close(model(batch["image"], batch["level"])["logits"], ref)
    with pytest.raises(TypeError, match="float"):
        model((batch["image"] * 255).to(torch.uint8), batch["level"])


def test_grad_checkpointing_gives_the_plain_gradients(monkeypatch):
    import torch.utils.checkpoint as torch_checkpoint

    torch.manual_seed(0)
    cfg = tiny_cfg("v8")
    model = build_model(cfg.model, n_slices=S).eval()  # eval: no dropout, fixed BN statistics
    batch = make_batch()

    def grads():
        model.zero_grad(set_to_none=True)
        forward_loss(model, cfg, batch)[1].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    calls = []
    real = torch_checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch_checkpoint, "checkpoint", counting)
    model.set_grad_checkpointing(True)
    assert model.backbone.grad_checkpointing is True
    ckpt = grads()
    assert calls, "grad checkpointing is set but the backbone never checkpointed"
    assert plain.keys() == ckpt.keys() and any(n.startswith("backbone.") for n in plain)
    for name, g in plain.items():
        torch.testing.assert_close(ckpt[name], g, msg=name)


@pytest.mark.parametrize("name", ["mobilenetv3_small_050", "test_efficientnet", "resnet10t"])
def test_feature_size_matches_backbone_output(name):
    """Pre-logits heads (MobileNetV3) change the pooled size; the net must follow the output."""
    from spinegrade.models.backbone import backbone_feature_dim

    backbone = timm.create_model(name, pretrained=False, num_classes=0)
    with torch.no_grad():
        out = backbone.eval()(torch.zeros(1, 3, 32, 32))
    assert backbone_feature_dim(backbone) == out.shape[1]
    cfg = load_config("v8", [f"model.backbone={name}", "model.pretrained=false"])
    model = build_model(cfg.model, n_slices=3)
    logits = model(torch.rand(2, 3, 3, 32, 32), torch.tensor([0, 4]))["logits"]
    assert logits.shape == (2, 3)


def test_config_choices_are_what_the_registries_serve():
    assert tuple(AGGREGATOR_BUILDERS) == choices.AGGREGATORS == CHOICES["model.aggregator"]
    assert tuple(HEAD_CLASSES) == choices.HEADS == CHOICES["model.head"]
    with pytest.raises(ValueError, match="unknown aggregator"):
        create_aggregator("lstm", num_features=8, n_slices=3)


def test_random_head_init_is_input_dependent_and_keeps_the_prior_for_resets():
    """v4, v5, v7: "random" head initialisation (nn.Linear's default), not the prior bias."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg("v4").model, n_slices=S)
    assert tiny_cfg("v4").model.head_init == "random"
    fc = model.head.fc
    bound = 1 / fc.in_features ** 0.5
    assert fc.weight.abs().max() <= bound and fc.weight.std() > 10 * 1e-3   # not std 1e-3
    assert not torch.allclose(fc.bias, torch.tensor(PRIOR_LOGITS))
    model.reset_head_bias()                     # the dead-class action still has a prior
    torch.testing.assert_close(fc.bias.detach(), torch.tensor(PRIOR_LOGITS))
    prior = build_model(tiny_cfg("v8").model, n_slices=S)
    torch.testing.assert_close(prior.head.fc.bias.detach(), torch.tensor(PRIOR_LOGITS))
    v6 = build_model(tiny_cfg("v6").model, n_slices=S)     # ordinal init: CORAL thresholds
    torch.testing.assert_close(v6.head.bias.detach(), torch.tensor([-2.0, -2.95]))


def test_hub_weights_are_recorded_with_their_tag_and_timm_version(monkeypatch):
    real = timm.create_model

    def hub(name, pretrained=False, **kwargs):  # the hub's weights, without the network
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", hub)
    model = build_model(tiny_cfg("v8", "model.pretrained=true").model, n_slices=S)
    w = model.backbone_weights
    expected = real(TINY, pretrained=False).pretrained_cfg["hf_hub_id"]
    assert (w.source, w.detail, w.timm_version) == ("hub", expected, timm.__version__)
    record = w.as_dict()
    assert record["backbone"] == TINY and record["sha256"] is None
    assert w.describe() == f"{TINY}: timm hub {expected} (timm {timm.__version__})"
    random = build_model(tiny_cfg("v8").model, n_slices=S).backbone_weights
    assert random.as_dict()["source"] == "random" and random.detail == "model.pretrained=false"
