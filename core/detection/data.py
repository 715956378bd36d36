"""Real training data for the detector, at the working resolution, and its augmentation.

- Tissue tiles (``glomeruli-tiles``: 1024² PAS at ≈0.5 µm/px with glomerulus masks) give the
  context and the negatives: tubules, vessels, interstitium, background.
- Masked glomerulus crops (``glomeruli-bueno`` + ``_masks``) are pasted onto those tiles at random
  places, sizes and orientations, so the model sees glomeruli anywhere in a tile, several at a
  time, touching the border, and not only the tiles' own 28.

Splits are grouped: tiles by tile (each is its own group), crops by slide. A training sample is a
random ``tile_size`` window (sometimes centred on a glomerulus) of a training tile, plus pasted
crops, rotated/flipped, stain (HED) and colour jittered, sometimes blurred.
"""

from __future__ import annotations

import csv
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from scipy import ndimage as ndi

from core.detection.config import DetectorAugmentConfig, DetectorConfig
from core.detection.model import DetectorError

log = logging.getLogger(__name__)

__all__ = [
    "DetectorSplit",
    "DetectorTrainingSet",
    "GlomerulusCrop",
    "TileImage",
    "hed_jitter",
    "load_crops",
    "load_tiles",
    "resolve_data_path",
    "split_detector_data",
]


def resolve_data_path(p: str) -> Path:
    """Expand ``$SHARED`` (``$GLOM_SHARED_DATA`` or ``../shared/data`` beside the repo), ``~``, env vars."""
    shared = os.environ.get("GLOM_SHARED_DATA") or str(Path(__file__).resolve().parents[3] / "shared" / "data")
    p = p.replace("${SHARED}", shared).replace("$SHARED", shared)
    return Path(os.path.expanduser(os.path.expandvars(p)))


@dataclass
class TileImage:
    """A tissue tile at the working resolution: HWC uint8 RGB and a bool glomerulus mask."""

    name: str
    rgb: np.ndarray
    mask: np.ndarray


@dataclass
class GlomerulusCrop:
    """A glomerulus crop and its outline mask, as stored (its scale varies: it is resized when pasted)."""

    path: Path
    slide: str
    rgb: np.ndarray
    mask: np.ndarray


def _read_mask(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).max(axis=2) > 127


def load_tiles(folder: str | Path, tiles_mpp: float, mpp: float, names: list[str] | None = None) -> list[TileImage]:
    """``folder/images/<id>.png`` + ``folder/masks/<id>.png`` resampled from ``tiles_mpp`` to ``mpp``."""
    folder = resolve_data_path(str(folder))
    images = sorted((folder / "images").glob("*.png"))
    if not images:
        raise DetectorError(f"{folder}/images holds no .png tiles")
    out = []
    for img_path in images:
        if names is not None and img_path.stem not in names:
            continue
        mask_path = folder / "masks" / img_path.name
        if not mask_path.is_file():
            raise DetectorError(f"{img_path}: no mask {mask_path}")
        rgb = Image.open(img_path).convert("RGB")
        mask = Image.fromarray(_read_mask(mask_path).astype(np.uint8) * 255)
        if rgb.size != mask.size:
            raise DetectorError(f"{img_path}: image {rgb.size} and mask {mask.size} differ in size")
        scale = tiles_mpp / mpp
        if abs(scale - 1) > 1e-3:
            size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
            rgb = rgb.resize(size, Image.Resampling.LANCZOS)
            mask = mask.resize(size, Image.Resampling.BILINEAR)
        out.append(TileImage(img_path.stem, np.asarray(rgb), np.asarray(mask) > 127))
    return out


def load_crops(csv_path: str | Path, slides: set[str] | None = None) -> list[GlomerulusCrop]:
    """Crops with an outline mask from a ``path,label,slide_id,mask_path`` CSV (rows without a mask skipped)."""
    csv_path = resolve_data_path(str(csv_path))
    if not csv_path.is_file():
        raise DetectorError(f"crop list {csv_path} does not exist")
    out = []
    with csv_path.open(newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            missing = [k for k in ("path", "slide_id", "mask_path") if k not in row]
            if missing:
                raise DetectorError(f"{csv_path}:{line}: no column(s) {missing}")
            if not row["mask_path"] or (slides is not None and row["slide_id"] not in slides):
                continue
            img, mask = csv_path.parent / row["path"], csv_path.parent / row["mask_path"]
            if not img.is_file() or not mask.is_file():
                raise DetectorError(f"{csv_path}:{line}: {img if not img.is_file() else mask} does not exist")
            m = _read_mask(mask)
            if m.sum() < 100:
                continue
            out.append(GlomerulusCrop(img, row["slide_id"], np.asarray(Image.open(img).convert("RGB")), m))
    return out


@dataclass
class DetectorSplit:
    """Tile names and crop slides per part; saved as ``split.json`` and in the checkpoint."""

    train_tiles: list[str]
    val_tiles: list[str]
    test_tiles: list[str]
    train_slides: list[str]
    heldout_slides: list[str]

    def to_dict(self) -> dict[str, list[str]]:
        return dict(self.__dict__)


def split_detector_data(cfg: DetectorConfig) -> DetectorSplit:
    """Grouped split: tiles by tile, crops by slide; deterministic in ``data.seed`` (or ``data.split_file``)."""
    if cfg.data.split_file:
        import json

        path = resolve_data_path(cfg.data.split_file)
        try:
            d = json.loads(path.read_text())
            return DetectorSplit(**{k: list(d.get(k, [])) for k in DetectorSplit.__dataclass_fields__})
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise DetectorError(f"data.split_file {path}: {e}") from None
    folder = resolve_data_path(cfg.data.tiles)
    names = sorted(p.stem for p in (folder / "images").glob("*.png"))
    n_val, n_test = cfg.data.val_tiles, cfg.data.test_tiles
    if len(names) < n_val + n_test + 1:
        raise DetectorError(f"{folder}: {len(names)} tiles cannot give {n_val} validation + {n_test} test "
                            "tiles and leave any for training")
    rng = random.Random(cfg.data.seed)
    shuffled = names[:]
    rng.shuffle(shuffled)
    test, val, train = shuffled[:n_test], shuffled[n_test:n_test + n_val], shuffled[n_test + n_val:]
    slides: list[str] = []
    if cfg.data.crops_csv:
        with resolve_data_path(cfg.data.crops_csv).open(newline="") as f:
            slides = sorted({r["slide_id"] for r in csv.DictReader(f)})
        rng.shuffle(slides)
    n_train_slides = round(len(slides) * cfg.data.crop_slide_ratios[0])
    return DetectorSplit(sorted(train), sorted(val), sorted(test), sorted(slides[:n_train_slides]),
                         sorted(slides[n_train_slides:]))


# --- augmentation ---------------------------------------------------------------------------------

_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED = _RGB_FROM_HED / np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)


def hed_jitter(rgb01: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Per-stain concentration ``c·α + β`` (α ∈ 1±σ, β ∈ ±σ) in optical density (Tellez et al. 2018)."""
    od = -np.log(np.clip(rgb01, 1e-6, 1))
    hed = od @ _HED_FROM_RGB
    hed = hed * (1 + rng.uniform(-sigma, sigma, 3)) + rng.uniform(-sigma, sigma, 3)
    return np.clip(np.exp(-(hed @ _RGB_FROM_HED)), 0, 1)


def _paste(rgb: np.ndarray, mask: np.ndarray, crop: GlomerulusCrop, diameter_px: float,
           rng: np.random.Generator) -> None:
    """Paste the crop's glomerulus (soft-edged) at a random place, scaled to ``diameter_px`` (in place)."""
    eq_diam = 2 * np.sqrt(crop.mask.sum() / np.pi)
    scale = diameter_px / max(eq_diam, 1.0)
    side = max(8, round(crop.rgb.shape[0] * scale))
    src = Image.fromarray(crop.rgb).resize((side, side), Image.Resampling.BILINEAR)
    m = Image.fromarray(crop.mask.astype(np.uint8) * 255).resize((side, side), Image.Resampling.BILINEAR)
    k = int(rng.integers(4))
    src_a, m_a = np.rot90(np.asarray(src), k), np.rot90(np.asarray(m), k)
    if rng.random() < 0.5:
        src_a, m_a = src_a[:, ::-1], m_a[:, ::-1]
    h, w = mask.shape
    # anywhere, including partly outside the window (glomeruli cut by a tile border)
    y0 = int(rng.integers(-side // 3, h - 2 * side // 3))
    x0 = int(rng.integers(-side // 3, w - 2 * side // 3))
    ys, xs = slice(max(0, y0), min(h, y0 + side)), slice(max(0, x0), min(w, x0 + side))
    sy, sx = slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0)
    hard = m_a[sy, sx] > 127
    alpha = ndi.gaussian_filter(hard.astype(np.float32), 1.5)[..., None]  # no sharp seam to learn
    region = rgb[ys, xs].astype(np.float32)
    rgb[ys, xs] = (region * (1 - alpha) + src_a[sy, sx].astype(np.float32) * alpha).round().astype(np.uint8)
    mask[ys, xs] |= hard


class DetectorTrainingSet(torch.utils.data.Dataset):
    """Endless random samples (``length`` per epoch): tile windows with pasted crops, augmented.

    Returns ``(image tensor 3×S×S normalised, mask tensor 1×S×S float)``.
    """

    def __init__(self, tiles: list[TileImage], crops: list[GlomerulusCrop], size_px: int, mpp: float,
                 aug: DetectorAugmentConfig, length: int, mean: tuple[float, ...], std: tuple[float, ...],
                 seed: int = 0) -> None:
        if not tiles:
            raise DetectorError("no training tiles")
        self.tiles, self.crops, self.size, self.mpp, self.aug = tiles, crops, size_px, mpp, aug
        self.length, self.seed = length, seed
        self.mean, self.std = np.array(mean, np.float32), np.array(std, np.float32)
        self._centres = [np.argwhere(t.mask) for t in tiles]
        self._epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def __len__(self) -> int:
        return self.length

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """One augmented (HWC uint8 RGB, bool mask) pair; deterministic in (seed, epoch, index)."""
        rng = np.random.default_rng([self.seed, self._epoch, index])
        a, s = self.aug, self.size
        ti = int(rng.integers(len(self.tiles)))
        tile = self.tiles[ti]
        zoom = 1 + rng.uniform(-a.scale_jitter, a.scale_jitter) if a.scale_jitter else 1.0
        win = min(round(s * zoom), tile.rgb.shape[0], tile.rgb.shape[1])
        h, w = tile.mask.shape
        if len(self._centres[ti]) and rng.random() < a.centre_on_glomerulus_p:
            cy, cx = self._centres[ti][int(rng.integers(len(self._centres[ti])))]
            y0 = int(np.clip(cy - rng.integers(win), 0, h - win))
            x0 = int(np.clip(cx - rng.integers(win), 0, w - win))
        else:
            y0, x0 = int(rng.integers(h - win + 1)), int(rng.integers(w - win + 1))
        rgb = tile.rgb[y0:y0 + win, x0:x0 + win].copy()
        mask = tile.mask[y0:y0 + win, x0:x0 + win].copy()
        if win != s:
            rgb = np.asarray(Image.fromarray(rgb).resize((s, s), Image.Resampling.BILINEAR))
            mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((s, s), Image.Resampling.BILINEAR)) > 127
            rgb, mask = rgb.copy(), mask.copy()
        if self.crops and rng.random() < a.paste_p:
            for _ in range(int(rng.integers(1, a.paste_max + 1))):
                crop = self.crops[int(rng.integers(len(self.crops)))]
                _paste(rgb, mask, crop, rng.uniform(*a.paste_diameter_um) / self.mpp, rng)
        if a.rotate90:
            k = int(rng.integers(4))
            rgb, mask = np.rot90(rgb, k), np.rot90(mask, k)
        if a.flip and rng.random() < 0.5:
            rgb, mask = rgb[:, ::-1], mask[:, ::-1]
        x = rgb.astype(np.float32) / 255
        if a.hed_jitter:
            x = hed_jitter(x, a.hed_jitter, rng)
        if a.color_jitter:
            c = a.color_jitter
            x = x * rng.uniform(1 - c, 1 + c)  # brightness
            mean = x.mean()
            x = (x - mean) * rng.uniform(1 - c, 1 + c) + mean  # contrast
            grey = x.mean(axis=2, keepdims=True)
            x = (x - grey) * rng.uniform(1 - c, 1 + c) + grey  # saturation
        x = np.clip(x, 0, 1)
        out = (x * 255).round().astype(np.uint8)
        if a.blur and rng.random() < a.blur:
            out = np.asarray(Image.fromarray(out).filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5))))
        return np.ascontiguousarray(out), np.ascontiguousarray(mask)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rgb, mask = self.sample(index)
        x = (rgb.astype(np.float32) / 255 - self.mean) / self.std
        return torch.from_numpy(x.transpose(2, 0, 1).copy()), torch.from_numpy(mask[None].astype(np.float32))
