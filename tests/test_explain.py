"""Heatmaps: every method on tiny models of each family, hooks released, and maps that point at
the glomerulus for a model trained on demo images whose class evidence lies inside a known box."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from pytorch_grad_cam import GradCAM

import models  # noqa: F401  (registers the seed architectures)
from core.explain import (
    CAM_METHOD_NAMES,
    ExplainError,
    find_target_layers,
    mass_inside_box,
    open_cam,
    overlay,
)
from core.demo import DEMO_CLASSES
from tests.demo_checkpoint import demo_checkpoint, demo_set, to_batch

# (architecture, kwargs, input px): one tiny member per family the registry covers.
FAMILIES = [
    ("test_resnet", {}, 64),
    ("test_vit", {}, 160),
    ("test_convnext", {}, 64),
    ("test_efficientnet", {}, 64),
    ("mobilenetv3_small_050", {}, 64),
    ("vgg11", {}, 64),
    ("densenet121", {"growth_rate": 8, "block_config": (1, 1, 1, 1)}, 64),
    ("inception_v3", {}, 96),
    ("se_resnet50_factorized", {"layers": (1, 1, 1, 1)}, 64),
    ("ds_resnet50", {"layers": (1, 1, 1, 1)}, 64),
    ("resnetv2_50_attn", {"attn_dim": 16, "layers": (1, 1, 1, 1)}, 64),
    ("googlenet", {}, 64),
    ("shufflenetv2_x1_0", {}, 64),
]


def _model(name: str, kwargs: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=3, **kwargs).eval()


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.mark.parametrize("name,kwargs,size", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_every_family_gets_a_heatmap_and_its_hooks_back(name, kwargs, size):
    model = _model(name, kwargs)
    target = find_target_layers(model, name)
    assert target.where and len(target.layers) == 1
    before = _hooks(model)
    x = torch.randn(2, 3, size, size)
    with open_cam(model, name, "gradcam") as cam:
        heat = cam(x, target_class=1)
        assert _hooks(model) > before
    assert _hooks(model) == before, "hooks must be released when the CAM closes"
    assert all(p.requires_grad for p in model.parameters()), "requires_grad flags must be restored"
    assert heat.shape == (2, size, size) and heat.dtype == np.float32
    assert 0.0 <= heat.min() and heat.max() <= 1.0
    assert (name == "test_vit") == (target.reshape_transform is not None)


# Score-CAM runs one forward per target-layer channel (512 for the seed model): resnet and ViT only.
METHOD_CASES = [(m, *f) for m in CAM_METHOD_NAMES for f in (FAMILIES[0], FAMILIES[1], FAMILIES[8])
                if not (m == "scorecam" and f[0] == "se_resnet50_factorized")]


@pytest.mark.parametrize("method,name,kwargs,size", METHOD_CASES, ids=[f"{c[0]}-{c[1]}" for c in METHOD_CASES])
def test_every_method_runs_on_cnn_vit_and_seed_model(method, name, kwargs, size):
    model = _model(name, kwargs)
    x = torch.randn(1, 3, size, size)
    with open_cam(model, name, method) as cam:
        heat = cam(x, target_class=0)
        logits = cam.outputs
    assert heat.shape == (1, size, size) and np.isfinite(heat).all()
    assert logits is not None and logits.shape == (1, 3)


def test_cut_graph_gives_the_same_map_as_the_library_default():
    """The speed-up (no weight gradients, backward stops at the layer) must not change the map."""
    model = _model("test_resnet", {})
    x = torch.randn(3, 3, 64, 64)
    target = find_target_layers(model, "test_resnet")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAM(model, target.layers) as ref_cam:
        ref = ref_cam(x, targets=[ClassifierOutputTarget(2)] * 3)
    with open_cam(model, "test_resnet", "gradcam") as cam:
        ours = cam(x, target_class=2)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_bad_inputs_are_named_errors():
    model = _model("test_resnet", {})
    with pytest.raises(ExplainError, match="unknown CAM method"):
        open_cam(model, "test_resnet", "magic")
    with open_cam(model, "test_resnet") as cam, pytest.raises(ExplainError, match="batch"):
        cam(torch.randn(3, 64, 64))
    cam = open_cam(model, "test_resnet")
    with pytest.raises(ExplainError, match="inside"):
        cam(torch.randn(1, 3, 64, 64))


def test_overlay_checks_range_and_blends_by_opacity():
    rgb = np.full((40, 50, 3), 128, np.uint8)
    heat = np.zeros((10, 10), np.float32)
    heat[:5] = 1.0
    assert overlay(rgb, heat, 0.0).shape == (40, 50, 3)
    np.testing.assert_array_equal(overlay(rgb, heat, 0.0), rgb)  # opacity 0: the image, unchanged
    strong = overlay(rgb, heat, 1.0)
    r, b = strong[..., 0].astype(int), strong[..., 2].astype(int)
    assert (r[:20] > b[:20] + 60).all() and (b[20:] > r[20:] + 60).all()  # hot half red, cold half blue (JET)
    half = overlay(rgb, heat, 0.5).astype(int)
    np.testing.assert_allclose(half, (rgb.astype(int) + strong.astype(int)) / 2, atol=1)
    with pytest.raises(ExplainError):
        overlay(rgb.astype(np.float32), heat)
    with pytest.raises(ExplainError):
        overlay(rgb, heat, 1.5)


def test_mass_inside_box():
    heat = np.zeros((10, 10), np.float32)
    heat[2:4, 2:4] = 1
    assert mass_inside_box(heat, (2, 2, 4, 4)) == pytest.approx(1.0)
    assert mass_inside_box(heat, (5, 5, 10, 10)) == 0.0
    assert mass_inside_box(np.ones((10, 10)), (0, 0, 5, 10)) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model, _ = demo_checkpoint()
    test = demo_set(tmp_path_factory.mktemp("cam") / "test", 5, seed=1)  # unseen images
    return model, list(DEMO_CLASSES), test


@pytest.mark.slow  # the shared demo model trains in ~10 s on an idle 2-core CPU
@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "hirescam", "layercam"])
def test_heatmap_mass_falls_on_the_glomerulus(trained, method):
    """Demo images carry all class evidence inside the glomerulus box (about a third of the image):
    a trained model's map for the true class must put most of its mass there."""
    model, classes, test = trained
    x = to_batch(test.paths)
    y = [classes.index(c) for c in test.labels]
    with torch.no_grad():
        assert (model(x).argmax(1).numpy() == np.array(y)).mean() >= 0.8, "the tiny model did not learn"
    with open_cam(model, "test_resnet", method) as cam:
        heat = cam(x, target_class=y)
    inside = np.array([mass_inside_box(h, b) for h, b in zip(heat, test.boxes)])
    area = np.array([mass_inside_box(np.ones_like(h), b) for h, b in zip(heat, test.boxes)])
    assert np.median(inside) > 0.6, f"median mass in the box {np.median(inside):.2f}"
    assert np.median(inside - area) > 0.2, "no better than a uniform map"
    assert (inside > area).mean() >= 0.8


@pytest.mark.slow
def test_target_class_and_contrast_change_the_map(trained):
    model, classes, test = trained
    x = to_batch(test.paths[:2])
    with open_cam(model, "test_resnet", "gradcam") as cam:
        a, b, ab = cam(x, target_class=0), cam(x, target_class=1), cam(x, target_class=0, versus_class=1)
    assert not np.allclose(a, b, atol=0.05) and not np.allclose(a, ab, atol=0.05)


@pytest.mark.slow
def test_untrained_model_does_not_pass_the_mass_check(trained):
    """The check above can fail: the same architecture untrained spreads its map anywhere."""
    _, classes, test = trained
    model = timm.create_model("test_resnet", num_classes=len(classes), output_stride=8).eval()
    x = to_batch(test.paths)
    with open_cam(model, "test_resnet", "gradcam") as cam:
        heat = cam(x, target_class=0)
    inside = np.array([mass_inside_box(h, b) for h, b in zip(heat, test.boxes)])
    area = np.array([mass_inside_box(np.ones_like(h), b) for h, b in zip(heat, test.boxes)])
    assert not (np.median(inside) > 0.6 and np.median(inside - area) > 0.2)
