"""Custom architectures: created through timm, forward/backward, parameter arithmetic, freezing."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import models  # noqa: F401
from models.ds_resnet import DualScaleBottleneck, SimAM
from models.freeze import FreezeError, freeze_backbone, set_frozen_norm_eval, unfreeze_all
from models.se_resnet_factorized import FactorizedSEBlock


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", list(models.CUSTOM_MODELS))
def test_custom_model_forward_backward(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=3, drop_rate=0.5)
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 3)
    out.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.ndim == 4  # a spatial map: the Grad-CAM target
        assert torch.allclose(model.forward_head(feats), model(x), atol=1e-5)
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, model.num_features)
    model.reset_classifier(5)
    assert model(x[:1]).shape == (1, 5) if not model.training else True


def test_factorized_block_follows_paper_arithmetic():
    # Eq. 7 of seed paper 003: four 64→64 asymmetric convs cost 12·64² weights (vs 17·64²
    # for the bottleneck and 18·64² for the basic block).
    block = FactorizedSEBlock(64, 64, attn_layer=None)
    conv_weights = sum(m.weight.numel() for m in block.modules() if isinstance(m, nn.Conv2d))
    assert conv_weights == 12 * 64 ** 2
    kernels = [tuple(m.kernel_size) for m in block.modules() if isinstance(m, nn.Conv2d)]
    assert kernels == [(1, 3), (3, 1), (1, 3), (3, 1)]
    se_block = FactorizedSEBlock(256, 256)
    fc = [m for m in se_block.se.modules() if isinstance(m, nn.Conv2d)]
    assert fc[0].out_channels == 256 // 16  # SE reduction 16


def test_factorized_se_resnet_is_smaller_than_seresnet50():
    ours = _n_params(timm.create_model("se_resnet50_factorized", num_classes=4))
    ref = _n_params(timm.create_model("seresnet50", num_classes=4))
    assert ours < ref
    model = timm.create_model("se_resnet50_factorized", num_classes=4)
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]


def test_ds_resnet50_dual_scale_and_parameter_free_attention():
    assert _n_params(SimAM()) == 0
    block = DualScaleBottleneck(256, 64)
    dilations = [m.dilation for m in block.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert dilations == [(1, 1), (3, 3)]
    x = torch.randn(1, 256, 16, 16)
    assert block(x).shape == x.shape
    ds = _n_params(timm.create_model("ds_resnet50", num_classes=3))
    r50 = _n_params(timm.create_model("resnet50", num_classes=3))
    # Only the depthwise dilated branch (and its BN) is added to ResNet50.
    assert r50 < ds < 1.01 * r50


def test_simam_weights_outliers_more():
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 3, 3] = 5.0
    y = SimAM()(x)
    # Sigmoid of the inverse energy: the distinct neuron keeps nearly all of its value.
    assert y[0, 0, 3, 3] > 0.99 * 5.0


def test_resnetv2_attn_concatenates_attention_with_features():
    model = timm.create_model("resnetv2_50_attn", num_classes=5, attn_dim=32).eval()
    with torch.no_grad():
        f = model.forward_features(torch.randn(1, 3, 64, 64))
    assert f.shape[1] == 2048 + 32
    assert model.num_features == 2048 + 32


@pytest.mark.parametrize("name", ["googlenet", "shufflenetv2_x1_0", "resnetv2_50_attn"])
def test_wrapped_models_keep_timms_head_names(name):
    # Checkpoints and freezing address the head as ``fc`` (pretrained_cfg["classifier"]) and the
    # pooling as ``global_pool``, as on timm's own models; the shared head must keep those names.
    model = timm.create_model(name, num_classes=3, drop_rate=0.2)
    keys = set(model.state_dict())
    assert {"fc.weight", "fc.bias"} <= keys and model.pretrained_cfg["classifier"] == "fc"
    assert model.get_classifier() is model.fc and model.fc.out_features == 3
    model.reset_classifier(0)
    assert isinstance(model.fc, nn.Identity) and model.num_classes == 0
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, model.num_features)


@pytest.mark.parametrize("name, source", [("ds_resnet50", "resnet50"), ("se_resnet50_factorized", "seresnet50")])
def test_resnet_variants_take_pretrained_tensors_from_their_own_source(name, source, monkeypatch):
    import models.resnet_variant

    asked = []
    monkeypatch.setattr(models.resnet_variant, "init_from_timm_model", lambda model, src: asked.append(src) or 0)
    timm.create_model(name, pretrained=True, num_classes=2)
    assert asked == [source]
    timm.create_model(name, pretrained=False, num_classes=2)
    assert asked == [source]


@pytest.mark.parametrize("name", [
    "resnet50", "seresnet50", "resnest50d", "resnext50_32x4d", "senet154", "vgg16", "inception_v3",
    "mobilenetv2_100", "efficientnet_b0", "densenet121", "resnetv2_50", "convnext_tiny",
    "vit_tiny_patch16_224", "googlenet", "shufflenetv2_x1_0",
])
def test_issue_architectures_are_registered(name):
    assert timm.is_model(name)


def test_inception_v3_default_input_is_299():
    from timm.data import resolve_data_config

    cfg = resolve_data_config(model=timm.create_model("inception_v3", num_classes=2))
    assert cfg["input_size"] == (3, 299, 299)


def _classifier_trainable(model: nn.Module) -> bool:
    return all(p.requires_grad for p in model.get_classifier().parameters())


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.75, 1.0])
def test_freeze_by_fraction(fraction):
    model = timm.create_model("resnet18", num_classes=2)
    report = freeze_backbone(model, fraction=fraction)
    biggest = max(p.numel() for p in model.parameters()) / report.backbone_params
    assert fraction <= report.fraction <= fraction + biggest
    assert _classifier_trainable(model)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if fraction == 0:
        assert frozen == []
    else:
        assert frozen[0] == "conv1.weight"  # the leading layers freeze first


def test_freeze_by_stages_and_conv_layers():
    model = timm.create_model("resnet18", num_classes=2)
    freeze_backbone(model, stages=1)
    frozen = {n.split(".")[0] for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1", "bn1", "layer1"}
    unfreeze_all(model)
    freeze_backbone(model, conv_layers=5)  # stem conv + the 4 convs of layer1
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad and n.endswith("conv2.weight")]
    assert frozen == ["layer1.0.conv2.weight", "layer1.1.conv2.weight"]
    assert model.layer2[0].conv1.weight.requires_grad
    with pytest.raises(FreezeError):
        freeze_backbone(model, stages=9)
    with pytest.raises(FreezeError):
        freeze_backbone(model, fraction=0.5, stages=1)


def test_frozen_layers_do_not_change_during_training():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=2)
    freeze_backbone(model, stages=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    bn_stats = model.bn1.running_mean.clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    set_frozen_norm_eval(model)
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("layer3", "layer4", "fc")) for n in changed)
    assert torch.equal(model.bn1.running_mean, bn_stats)
