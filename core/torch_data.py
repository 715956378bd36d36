"""Samples as torch data: image decoding (:func:`read_rgb`), :class:`ImageDataset` (stain
normalisation, cache, same-class mixup) and a class-balanced sampler."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, WeightedRandomSampler

from core.labeled_sets import DataError, Sample
from core.stain import PerStainNormalizer

__all__ = ["ImageDataset", "balanced_sampler", "read_rgb"]


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file to HWC uint8 RGB."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except OSError as e:
        raise DataError(f"cannot read image {path}: {e}") from None


class ImageDataset(Dataset):
    """Samples → (tensor, label). Optional stain normalisation, in-memory cache, same-class mixup.

    ``same_class_mix_p``: probability of blending an image with another image of the same class
    (λ ~ Beta(α, α)) before augmentation; the label is unchanged (seed paper 003).
    """

    def __init__(self, samples: Sequence[Sample], transform: Callable | None = None,
                 stain_normalizer: Callable[[np.ndarray], np.ndarray] | None = None,
                 cache: bool = False, same_class_mix_p: float = 0.0,
                 same_class_mix_alpha: float = 0.4) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.stain_normalizer = stain_normalizer
        self.cache = cache
        self._cache: dict[int, np.ndarray] = {}
        self.same_class_mix_p = same_class_mix_p
        self.same_class_mix_alpha = same_class_mix_alpha
        self._by_class: dict[int, list[int]] = {}
        for i, s in enumerate(self.samples):
            self._by_class.setdefault(s.label, []).append(i)

    def __len__(self) -> int:
        return len(self.samples)

    def load_rgb(self, index: int) -> np.ndarray:
        """The decoded (and stain-normalised) image, HWC uint8."""
        if index in self._cache:
            return self._cache[index]
        sample = self.samples[index]
        rgb = read_rgb(sample.path)
        if isinstance(self.stain_normalizer, PerStainNormalizer):
            rgb = self.stain_normalizer(rgb, sample.stain)
        elif self.stain_normalizer is not None:
            rgb = self.stain_normalizer(rgb)
        if self.cache:
            self._cache[index] = rgb
        return rgb

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        rgb = self.load_rgb(index)
        label = self.samples[index].label
        # torch's generator: DataLoader seeds it per worker and per epoch.
        if self.same_class_mix_p > 0 and torch.rand(()).item() < self.same_class_mix_p:
            peers = self._by_class[label]
            other = self.load_rgb(peers[int(torch.randint(len(peers), ()).item())])
            if other.shape == rgb.shape:
                a = torch.tensor(self.same_class_mix_alpha)
                lam = float(torch.distributions.Beta(a, a).sample())
                rgb = (lam * rgb + (1 - lam) * other).round().astype(np.uint8)
        x = self.transform(rgb) if self.transform is not None else torch.from_numpy(rgb).permute(2, 0, 1)
        return x, label


def balanced_sampler(samples: Sequence[Sample], num_classes: int, seed: int = 0) -> WeightedRandomSampler:
    """Draw classes equally often (with replacement), one epoch = ``len(samples)`` draws."""
    counts = Counter(s.label for s in samples)
    weights = torch.tensor([1.0 / counts[s.label] for s in samples], dtype=torch.double)
    g = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(weights, num_samples=len(samples), replacement=True, generator=g)
