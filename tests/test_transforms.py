"""Preprocessing and augmentation: shapes, scaling, label-preserving mixes."""

from __future__ import annotations

import numpy as np
import torch

from core.config import AugmentConfig
from core.data import ImageDataset, Sample
from core.transforms import HEDJitter, RandomRot90, build_eval_transform, build_train_transform, mixup_batch

PRE = {"input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "scaling": "imagenet",
       "interpolation": "bilinear"}


def test_eval_transform_resizes_and_scales():
    rgb = np.full((50, 70, 3), 255, np.uint8)
    x = build_eval_transform(PRE)(rgb)
    assert x.shape == (3, 32, 32)
    assert torch.allclose(x, torch.full_like(x, 2.0))  # (1 - 0.5) / 0.25
    unit = build_eval_transform({**PRE, "scaling": "unit"})(rgb)
    assert unit.min() >= 0 and unit.max() <= 1 and torch.allclose(unit, torch.ones_like(unit))


def test_train_transform_with_every_augmentation():
    torch.manual_seed(0)
    aug = AugmentConfig(rotate_degrees=180, rotate90=True, hflip=0.5, vflip=0.5, crop_scale=0.8, gaussian_noise=0.05,
                        color_jitter=0.2, hue_jitter=0.05, hed_jitter=0.05)
    t = build_train_transform(PRE, aug)
    rgb = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    a, b = t(rgb), t(rgb)
    assert a.shape == b.shape == (3, 32, 32) and torch.isfinite(a).all()
    assert not torch.equal(a, b)  # random


def test_rot90_only_permutes_pixels():
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4)
    for _ in range(8):
        y = RandomRot90()(x)
        assert torch.equal(torch.sort(y.flatten()).values, torch.sort(x.flatten()).values)


def test_hed_jitter_zero_is_identity():
    x = torch.rand(3, 8, 8) * 0.8 + 0.1
    assert torch.allclose(HEDJitter(0.0)(x), x, atol=1e-4)


def test_mixup_targets_are_convex_combinations():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    xm, soft = mixup_batch(x, y, 3, alpha=0.4)
    assert soft.shape == (8, 3) and torch.allclose(soft.sum(1), torch.ones(8))
    assert xm.shape == x.shape
    _, hard = mixup_batch(x, y, 3, alpha=0.0)
    assert torch.equal(hard.argmax(1), y)


def test_same_class_mix_keeps_label_and_class(tmp_path):
    from PIL import Image

    samples = []
    for i, (value, label) in enumerate([(0, 0), (100, 0), (255, 1)]):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)
        samples.append(Sample(str(path), label))
    ds = ImageDataset(samples, transform=None, same_class_mix_p=1.0, same_class_mix_alpha=1.0)
    torch.manual_seed(0)
    for _ in range(10):
        x, label = ds[0]
        assert label == 0 and x.max() <= 100  # only mixed with the other class-0 image
        x, label = ds[2]
        assert label == 1 and (x == 255).all()  # the only class-1 image mixes with itself
