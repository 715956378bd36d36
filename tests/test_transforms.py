"""Preprocessing and augmentation: shapes, scaling, label-preserving mixes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.config import AugmentConfig
from core.labeled_sets import Sample
from core.torch_data import ImageDataset
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


def test_lab_round_trip_and_randstain_moves_stain_statistics_towards_the_template(bueno_dir):
    import numpy as np
    from PIL import Image

    from core.config import AugmentConfig
    from core.transforms import RandStainNA, build_train_transform, lab_statistics, lab_to_rgb, rgb_to_lab

    paths = sorted((bueno_dir / "globally_sclerotic").glob("*.png"))[:8]
    imgs = [torch.from_numpy(np.asarray(Image.open(p).convert("RGB"))).permute(2, 0, 1).float() / 255 for p in paths]
    x = imgs[0]
    assert torch.allclose(lab_to_rgb(rgb_to_lab(x)), x, atol=2e-3)
    # skimage agrees on the colour space
    from skimage.color import rgb2lab

    ref = torch.from_numpy(rgb2lab(x.permute(1, 2, 0).numpy())).permute(2, 0, 1).float()
    assert torch.allclose(rgb_to_lab(x), ref, atol=0.05)
    # A template far from the image: the re-stained image's LAB means land on the drawn target.
    target = {"mean": [40.0, 30.0, -20.0, 10.0, 8.0, 5.0], "std": [0.0] * 6}
    out = RandStainNA(target, p=1.0)(x)
    lab = rgb_to_lab(out).flatten(1)
    assert out.shape == x.shape and 0 <= float(out.min()) and float(out.max()) <= 1
    assert abs(float(lab[0].mean()) - 40) < 3 and abs(float(lab[1].mean()) - 30) < 3
    stats = lab_statistics(imgs)
    assert len(stats["mean"]) == 6 and all(s > 0 for s in stats["std"])
    aug = AugmentConfig(randstain=1.0, grayscale=0.5, blur=0.5, jpeg=0.5, hed_jitter=0.05)
    t = build_train_transform({"input_size": [3, 64, 64], "mean": [0.5] * 3, "std": [0.5] * 3,
                               "scaling": "imagenet", "interpolation": "bilinear"}, aug, stats)
    rgb = (x.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    outs = torch.stack([t(rgb) for _ in range(6)])
    assert outs.shape == (6, 3, 64, 64) and torch.isfinite(outs).all()
    assert outs.std(0).mean() > 0.01  # random: no two views alike
    with pytest.raises(Exception, match="LAB statistics"):
        build_train_transform({"input_size": [3, 64, 64], "mean": [0.5] * 3, "std": [0.5] * 3,
                               "scaling": "imagenet"}, aug, None)
