"""Real-tile fixtures shared by the detector tests, the Ray test and the workspace e2e.

A tiny detector (2 µm/px, 128 px tiles, three real PAS tiles) trained with the real training code,
and a 3-level pyramidal TIFF built from the same tiles over a band of glass, with the glomerulus
positions known from the tiles' masks. ``tests/conftest.py`` makes them session fixtures
(``tiny_detector``, ``test_slide``) so the detector is trained once per test run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from core.detection.config import load_detector_config

SHARED = Path(os.environ.get("GLOM_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
TILES = SHARED / "glomeruli-tiles"
SLIDE_TILES = ["10149", "10150", "10172"]  # each holds one glomerulus well inside the tile
SPLIT = {"train_tiles": SLIDE_TILES, "val_tiles": ["10183"], "test_tiles": ["10224"], "train_slides": [],
         "heldout_slides": []}
TILES_MPP = 0.5  # µm/px of the stored tiles (data README)


def write_pyramid_tiff(path: Path, rgb: np.ndarray, mpp: float, levels: int = 3) -> Path:
    """A generic tiled TIFF pyramid (one IFD per level, 2× steps) with its µm/px, as OpenSlide reads it."""
    img = Image.fromarray(rgb)
    with tifffile.TiffWriter(path) as tw:
        for level in range(levels):
            if level:
                img = img.resize((img.width // 2, img.height // 2), Image.Resampling.BOX)
            extra = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"} if level == 0 else {}
            tw.write(np.asarray(img), tile=(256, 256), photometric="rgb", compression="zlib",
                     subfiletype=1 if level else 0, metadata=None, **extra)
    return path


def real_tile(name: str) -> tuple[np.ndarray, np.ndarray]:
    rgb = np.asarray(Image.open(TILES / "images" / f"{name}.png").convert("RGB"))
    mask = np.asarray(Image.open(TILES / "masks" / f"{name}.png").convert("RGB")).max(axis=2) > 0
    return rgb, mask


def train_tiny_detector(root: Path) -> Path:
    """A detector trained on three real tiles (the ones the test slide is made of); its checkpoint."""
    (root / "split.json").write_text(json.dumps(SPLIT))
    cfg = load_detector_config("recipes/detector/cpu.yaml", [
        f"output_dir={root}", "name=tiny", "mpp=2.0", "tile_size=128", f"data.tiles={TILES}",
        f"data.split_file={root / 'split.json'}", "data.crops_csv=", "train.epochs=5",
        "train.samples_per_epoch=40", "train.batch_size=8", "train.lr=0.003", "train.early_stopping_patience=0",
        "train.max_minutes=0", "augment.paste_p=0", "augment.blur=0", "augment.scale_jitter=0",
        "augment.centre_on_glomerulus_p=0.7", "postprocess.min_area_um2=3000",
        # the plain forward and no score filter: tests that want TTA or a min_score ask for them
        "postprocess.tune=false", "postprocess.tta=false", "postprocess.min_score=0"])
    from core.detection.train import train_detector

    return train_detector(cfg, progress=False).checkpoint


def three_tile_slide(path: Path) -> tuple[Path, np.ndarray]:
    """Three real tiles side by side over a band of glass (level 0 at 0.5 µm/px, 3 levels); the mask."""
    tiles = [real_tile(n) for n in SLIDE_TILES]
    rgb = np.full((1024 + 512, 3 * 1024, 3), 243, np.uint8)  # glass below the tissue
    mask = np.zeros(rgb.shape[:2], bool)
    for i, (t, m) in enumerate(tiles):
        rgb[:1024, i * 1024:(i + 1) * 1024] = t
        mask[:1024, i * 1024:(i + 1) * 1024] = m
    return write_pyramid_tiff(path, rgb, TILES_MPP), mask
