"""Tiny checkpoints for the viewer and CAM tests, trained in seconds and saved the real way.

``test_resnet`` (timm, a few hundred thousand parameters) with ``output_stride=8`` keeps a 12×12
feature map at 96 px, fine enough for a heatmap to be checked against a region. It is saved with
:func:`core.checkpoint.save_checkpoint`, so the viewer loads it through safetensors + JSON.
"""

from __future__ import annotations

import atexit
import csv
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import timm
import torch

from core.checkpoint import CheckpointMeta, save_checkpoint
from core.torch_data import read_rgb
from core.demo import DEMO_CLASSES, generate_demo_images

ARCH = "test_resnet"
KWARGS = {"output_stride": 8}
SIZE_PX = 96
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
PREPROCESS = {"input_size": [3, SIZE_PX, SIZE_PX], "mean": MEAN, "std": STD, "scaling": "imagenet",
              "interpolation": "bilinear"}


@dataclass
class DemoSet:
    paths: list[Path]
    labels: list[str]
    boxes: list[tuple[int, int, int, int]]  # glomerulus box (x0, y0, x1, y1) in image pixels


def demo_set(out_dir: Path, n_per_class: int, seed: int) -> DemoSet:
    generate_demo_images(out_dir, n_per_class, size_px=SIZE_PX, seed=seed)
    rows = list(csv.DictReader((out_dir / "manifest.csv").open()))
    return DemoSet([out_dir / r["path"] for r in rows], [r["label"] for r in rows],
                   [tuple(int(r[k]) for k in ("x0", "y0", "x1", "y1")) for r in rows])


def to_batch(paths: Sequence[Path]) -> torch.Tensor:
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    out = []
    for p in paths:
        rgb = read_rgb(p)
        t = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
        if t.shape[-1] != SIZE_PX or t.shape[-2] != SIZE_PX:
            t = torch.nn.functional.interpolate(t[None], size=(SIZE_PX, SIZE_PX), mode="bilinear",
                                                antialias=True, align_corners=False)[0]
        out.append((t - mean) / std)
    return torch.stack(out)


def train_checkpoint(paths: Sequence[Path], labels: Sequence[str], classes: Sequence[str], stem: Path, *,
                     epochs: int = 8, seed: int = 0, display_names: Sequence[str] | None = None,
                     temperature: float | None = 1.5) -> tuple[torch.nn.Module, Path]:
    """Train ``test_resnet`` on the images and save ``stem``.safetensors/.json; (model, weights path)."""
    torch.manual_seed(seed)
    x = to_batch(paths)
    y = torch.tensor([list(classes).index(c) for c in labels])
    model = timm.create_model(ARCH, pretrained=False, num_classes=len(classes), **KWARGS)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 16):
            idx = perm[i:i + 16]
            xb = x[idx]
            if torch.rand(1, generator=gen) < 0.5:
                xb = xb.flip(-1)
            if torch.rand(1, generator=gen) < 0.5:
                xb = xb.flip(-2)
            loss = torch.nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    meta = CheckpointMeta(ARCH, len(classes), list(classes), PREPROCESS,
                          display_names=list(display_names or classes), model_kwargs=dict(KWARGS),
                          temperature=temperature, metrics={"train_accuracy": accuracy(model, x, y)})
    return model, save_checkpoint(model, stem, meta)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


@lru_cache(maxsize=1)
def _shared_demo_checkpoint() -> tuple[torch.nn.Module, Path]:
    from annotation_db.classes import GLOMERULUS_CLASSES

    root = Path(tempfile.mkdtemp(prefix="glom-demo-ckpt-"))
    atexit.register(shutil.rmtree, root, True)
    train = demo_set(root / "train", 30, seed=0)
    return train_checkpoint(train.paths, train.labels, DEMO_CLASSES, root / "ckpt" / "best", epochs=8,
                            display_names=[c.display_name for c in GLOMERULUS_CLASSES])


def demo_checkpoint(stem: Path | None = None) -> tuple[torch.nn.Module, Path]:
    """A 4-class glomerulus-schema model trained on synthetic demo images (30 per class, seed 0).

    Trained once per test session and shared (copied to ``stem`` when given), so the CAM and the
    viewer tests pay for one training run.
    """
    model, weights = _shared_demo_checkpoint()
    if stem is None:
        return model, weights
    stem.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(weights, stem.with_suffix(".safetensors"))
    shutil.copy(weights.with_suffix(".json"), stem.with_suffix(".json"))
    return model, stem.with_suffix(".safetensors")


def balanced_bueno(bueno_dir: Path, n_per_class: int, seed: int = 0) -> tuple[list[Path], list[str], list[str]]:
    """``n_per_class`` real crops per class from ../shared/data/glomeruli-bueno: (paths, labels, slides)."""
    rows = list(csv.DictReader((bueno_dir / "labels.csv").open()))
    rng = np.random.default_rng(seed)
    out: list[dict] = []
    for label in sorted({r["label"] for r in rows}):
        mine = [r for r in rows if r["label"] == label]
        out += [mine[i] for i in rng.permutation(len(mine))[:n_per_class]]
    return [bueno_dir / r["path"] for r in out], [r["label"] for r in out], [r["slide_id"] for r in out]
