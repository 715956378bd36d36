"""Real training data for the detector, at the working resolution, and its augmentation.

- Tissue tiles (``glomeruli-tiles``: 1024² PAS at ≈0.5 µm/px with glomerulus masks) give the
  context and the negatives: tubules, vessels, interstitium, background.
- Masked glomerulus crops (``glomeruli-bueno`` + ``_masks``) are pasted onto those tiles at random
  places, sizes and orientations, so the model sees glomeruli anywhere in a tile, several at a
  time, touching the border, and not only the tiles' own 28.

- Glomeruli stored on slides (``data.store``: boxes drawn in the app, imported outlines, accepted proposals) are
  read through OpenSlide at the working resolution as windows around them, around rejected
  proposals (hard negatives) and elsewhere on the tissue of fully reviewed slides; the windows
  join the tiles (:func:`load_store_windows`; the rules are in docs/DETECTION.md).

Splits are grouped: tiles by tile (each is its own group), crops and stored slides by slide. A
training sample is a random ``tile_size`` window (sometimes centred on a glomerulus) of a training
tile, plus pasted crops, rotated/flipped, stain (HED) and colour jittered, sometimes blurred. With
``train.hard_negative_p`` a share of the windows is centred instead on what the model being trained
marks wrongly on its own training tiles (mined each epoch): artery walls, tubules with casts.
"""

from __future__ import annotations

import csv
import logging
import os
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from scipy import ndimage as ndi

from core.detection.config import (
    DetectorAugmentConfig,
    DetectorConfig,
    DetectorStoreConfig,
)
from core.detection.inference import mirror_edges
from core.detection.model import DetectorError

log = logging.getLogger(__name__)

__all__ = [
    "DetectorSplit",
    "DetectorTrainingSet",
    "GlomerulusCrop",
    "HardPoint",
    "StoreWindow",
    "StoredGlomerulus",
    "StoredSlide",
    "TileImage",
    "TrainingSampler",
    "hed_jitter",
    "load_crops",
    "load_store_windows",
    "load_tiles",
    "rasterise_glomeruli",
    "read_slide_windows",
    "read_stored_slides",
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


def load_crops(csv_path: str | Path, slides: set[str] | None = None,
               labels: list[str] | None = None) -> list[GlomerulusCrop]:
    """Crops with an outline mask from a ``path,label,slide_id,mask_path`` CSV (rows without a mask skipped),
    of the ``slides`` and with a ``label`` among ``labels`` when given (a label no row has is an error)."""
    csv_path = resolve_data_path(str(csv_path))
    if not csv_path.is_file():
        raise DetectorError(f"crop list {csv_path} does not exist")
    out = []
    wanted = set(labels or ())
    seen: set[str] = set()
    with csv_path.open(newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            missing = [k for k in ("path", "slide_id", "mask_path", *(("label",) if wanted else ())) if k not in row]
            if missing:
                raise DetectorError(f"{csv_path}:{line}: no column(s) {missing}")
            seen.add(row.get("label") or "")
            if not row["mask_path"] or (slides is not None and row["slide_id"] not in slides):
                continue
            if wanted and row["label"] not in wanted:
                continue
            img, mask = csv_path.parent / row["path"], csv_path.parent / row["mask_path"]
            if not img.is_file() or not mask.is_file():
                raise DetectorError(f"{csv_path}:{line}: {img if not img.is_file() else mask} does not exist")
            m = _read_mask(mask)
            if m.sum() < 100:
                continue
            out.append(GlomerulusCrop(img, row["slide_id"], np.asarray(Image.open(img).convert("RGB")), m))
    if wanted - seen:
        raise DetectorError(f"{csv_path}: data.crop_labels {sorted(wanted - seen)} match no row's label "
                            f"(the labels there: {sorted(seen)})")
    return out


@dataclass
class DetectorSplit:
    """Tile names and crop slides per part; saved as ``split.json`` and in the checkpoint."""

    train_tiles: list[str]
    val_tiles: list[str]
    test_tiles: list[str]
    train_slides: list[str]
    heldout_slides: list[str]
    store_train_slides: list[str] = field(default_factory=list)  # slides of ``data.store``, grouped by slide
    store_val_slides: list[str] = field(default_factory=list)
    store_test_slides: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, list[str]]:
        return dict(self.__dict__)


def split_detector_data(cfg: DetectorConfig) -> DetectorSplit:
    """Grouped split: tiles by tile, crops by slide; deterministic in ``data.seed`` (or ``data.split_file``)."""
    if cfg.data.split_file:
        import json

        path = resolve_data_path(cfg.data.split_file)
        try:
            d = json.loads(path.read_text())
            split = DetectorSplit(**{k: list(d.get(k, [])) for k in DetectorSplit.__dataclass_fields__})
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise DetectorError(f"data.split_file {path}: {e}") from None
        if cfg.data.store.db and not any(k in d for k in _STORE_SPLIT_KEYS):
            raise DetectorError(f"data.split_file {path} has no {', '.join(_STORE_SPLIT_KEYS)} lists, yet "
                                "data.store.db is set: add them (slide names) or drop data.split_file")
        return split
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
    split = DetectorSplit(sorted(train), sorted(val), sorted(test), sorted(slides[:n_train_slides]),
                          sorted(slides[n_train_slides:]))
    if cfg.data.store.db:
        split.store_train_slides, split.store_val_slides, split.store_test_slides = _split_store_slides(
            [sl.name for sl in read_stored_slides(cfg.data.store)], cfg.data.store.slide_ratios, cfg.data.seed)
    return split


def _split_store_slides(names: list[str], ratios: list[float], seed: int) -> tuple[list[str], list[str], list[str]]:
    """Stored slides into train/val/test by ``ratios`` (each slide on one side only), deterministic in ``seed``."""
    shuffled = sorted(names)
    random.Random(f"store:{seed}").shuffle(shuffled)  # its own stream: the tile and crop split stay as they were
    n_test, n_val = round(len(shuffled) * ratios[2]), round(len(shuffled) * ratios[1])
    if shuffled and n_test + n_val >= len(shuffled):
        raise DetectorError(f"data.store.slide_ratios {ratios} leave none of the {len(shuffled)} stored slides "
                            "for training")
    test, val, train = shuffled[:n_test], shuffled[n_test:n_test + n_val], shuffled[n_test + n_val:]
    return sorted(train), sorted(val), sorted(test)


# --- glomeruli stored on slides ------------------------------------------------------------------

_STORE_SPLIT_KEYS = ("store_train_slides", "store_val_slides", "store_test_slides")
Box = tuple[int, int, int, int]


@dataclass
class StoredGlomerulus:
    """A glomerulus stored on a slide, in level-0 pixels: its box, and its outline when the store has one."""

    box: Box
    polygon: list[tuple[float, float]] | None  # None: a drawn box only (rasterised as its inscribed ellipse)
    source: str  # "box:<id>" or "proposal:<id>"


@dataclass
class StoredSlide:
    """What the store knows of one slide's glomeruli (level-0 boxes)."""

    name: str
    path: str | None
    mpp: float | None
    glomeruli: list[StoredGlomerulus]
    rejected: list[Box]  # rejected proposals: not glomeruli
    undecided: list[Box]  # proposals still ``proposed``: nobody said yet
    detected: bool  # a detector ran over it (it has proposals, in the datasets asked for)

    @property
    def fully_reviewed(self) -> bool:
        """A detector ran over it and every one of its findings was accepted or rejected."""
        return self.detected and not self.undecided


@dataclass
class StoreWindow:
    """A window read from a stored slide at the working resolution, as a tile (its mask rasterised)."""

    slide: str
    kind: str  # "glomerulus" (around a stored one), "rejected" (around a rejected proposal), "tissue"
    box: Box  # level-0 box read
    tile: TileImage


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for messages: never print what may hold a password
        return "data.store.db"


def read_stored_slides(st: DetectorStoreConfig) -> list[StoredSlide]:
    """Slides of the store at ``st.db`` with a stored glomerulus or a rejected proposal, by name.

    Glomeruli are the slide's boxes (drawn, imported from annotation files, or drawn by accepting a
    proposal), each with its outline when it has one (``SlideBox.polygon``: drawn as an outline,
    imported, or the accepted proposal's), and accepted proposals whose box is gone. ``st.datasets``
    restricts the proposals (boxes belong to no dataset); ``st.slides`` the slides.
    """
    from sqlalchemy import select
    from sqlalchemy.engine import make_url

    from annotation_db.db import StoreError, open_store
    from annotation_db.models import Dataset, GlomerulusProposal, Slide, SlideBox

    where = _safe_url(st.db)
    try:
        url = make_url(st.db)
    except Exception:  # noqa: BLE001 - sqlalchemy raises ArgumentError, ValueError...
        raise DetectorError(f"data.store.db {st.db!r} is not a database URL (sqlite:///path, postgresql://...)") from None
    if url.drivername.startswith("sqlite") and url.database not in (None, "", ":memory:") \
            and not Path(url.database).is_file():  # opening would leave an empty file behind
        raise DetectorError(f"data.store.db {where}: no store file {url.database}")
    try:
        Session = open_store(st.db, create=False)
    except StoreError as e:
        raise DetectorError(f"data.store.db {where}: {e}") from None
    out = []
    with Session() as s:
        ds_ids = None
        if st.datasets:
            found = {d.name: d.id for d in s.scalars(select(Dataset).where(Dataset.name.in_(st.datasets)))}
            if missing := sorted(set(st.datasets) - set(found)):
                raise DetectorError(f"data.store.datasets: no dataset {', '.join(missing)} in {where}")
            ds_ids = list(found.values())
        slides = list(s.scalars(select(Slide).order_by(Slide.name)))
        if st.slides:
            if missing := sorted(set(st.slides) - {sl.name for sl in slides}):
                raise DetectorError(f"data.store.slides: no slide {', '.join(missing)} in {where}")
            slides = [sl for sl in slides if sl.name in set(st.slides)]
        for sl in slides:
            q = select(GlomerulusProposal).where(GlomerulusProposal.slide_id == sl.id)
            if ds_ids is not None:
                q = q.where(GlomerulusProposal.dataset_id.in_(ds_ids))
            props = list(s.scalars(q.order_by(GlomerulusProposal.id)))
            boxes = list(s.scalars(select(SlideBox).where(SlideBox.slide_id == sl.id).order_by(SlideBox.id)))
            accepted = [p for p in props if p.status == "accepted"]
            glomeruli = []
            for b in boxes:  # an outline when there is one; a plain rectangle becomes its inscribed ellipse
                poly = [(float(x), float(y)) for x, y in b.polygon] if len(b.polygon or []) >= 3 else None
                glomeruli.append(StoredGlomerulus(b.box, poly, f"box:{b.id}"))
            box_ids = {b.id for b in boxes}
            for p in accepted:
                if p.slide_box_id not in box_ids:  # accepted, its box since deleted or never drawn
                    poly = [(float(x), float(y)) for x, y in p.polygon] if len(p.polygon or []) >= 3 else None
                    glomeruli.append(StoredGlomerulus(p.box, poly, f"proposal:{p.id}"))
            rejected = [p.box for p in props if p.status == "rejected"]
            if not glomeruli and not rejected:
                continue
            out.append(StoredSlide(sl.name, sl.path, sl.mpp, glomeruli, rejected,
                                   [p.box for p in props if p.status == "proposed"], bool(props)))
    if not out:
        raise DetectorError(f"data.store.db {where}: no slide has a stored glomerulus or a rejected proposal"
                            + (f" (slides {st.slides})" if st.slides else "")
                            + (f" (datasets {st.datasets})" if st.datasets else ""))
    return out


def _slide_file(slide: StoredSlide, root: str) -> Path:
    """The slide's file: its stored path, else ``<root>/<file name>`` or ``<root>/<slide name>.*``."""
    from core.wsi import is_slide_file

    if slide.path and Path(slide.path).is_file():
        return Path(slide.path)
    if root:
        r = resolve_data_path(root)
        candidates = [r / Path(slide.path).name] if slide.path else []
        candidates += sorted(p for p in r.glob("*") if p.stem == slide.name)
        for c in candidates:
            if is_slide_file(c):
                return c
    raise DetectorError(f"slide {slide.name}: its file {slide.path or '(no path stored)'} does not exist"
                        + (f" and {root} holds no {slide.name}.*" if root else "; set data.store.slides_root"))


def rasterise_glomeruli(glomeruli: list[StoredGlomerulus], box: Box, scale: float, side: int) -> np.ndarray:
    """Bool ``side``² mask of the glomeruli in the level-0 ``box``, ``scale`` = working px per level-0 px.

    An outline is filled as drawn; a box alone becomes the ellipse inscribed in it (an
    approximation: a glomerulus is roughly elliptical, its box corners are not glomerulus).
    """
    from PIL import ImageDraw

    x0, y0, bw, bh = box
    img = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(img)
    for g in glomeruli:
        gx, gy, gw, gh = g.box
        if gx >= x0 + bw or gy >= y0 + bh or gx + gw <= x0 or gy + gh <= y0:
            continue
        if g.polygon is not None:
            draw.polygon([((x - x0) * scale, (y - y0) * scale) for x, y in g.polygon], fill=255)
        else:
            draw.ellipse([(gx - x0) * scale, (gy - y0) * scale, (gx + gw - x0) * scale - 1,
                          (gy + gh - y0) * scale - 1], fill=255)
    return np.asarray(img) > 127


def _overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def read_slide_windows(slide: StoredSlide, path: str | Path, mpp: float, tile_size: int, st: DetectorStoreConfig,
                       rng: np.random.Generator) -> list[StoreWindow]:
    """Windows of ``tile_size × st.window_scale`` working px read from the slide at ``mpp``.

    Around each stored glomerulus (``st.positives_per_glomerulus``, offset at random by up to a
    quarter window), around each rejected proposal (``st.hard_negatives``), and, on a fully
    reviewed slide only, centred on random tissue (``st.negatives_per_slide``, Otsu on a thumbnail).
    A window touching a still-proposed finding is dropped: nobody has said what it is.
    """
    from core.detection.slides import tissue_mask
    from core.wsi import SlideError, open_slide

    side = round(tile_size * st.window_scale)
    try:
        reader = open_slide(path, fallback_mpp=slide.mpp)
    except SlideError as e:
        raise DetectorError(f"slide {slide.name}: {e}") from None
    with reader:
        try:
            base = reader.require_mpp()
        except SlideError as e:
            raise DetectorError(f"slide {slide.name}: {e}") from None
        side0 = side * mpp / base  # level-0 px
        jitter = side0 / 4
        centres: list[tuple[str, float, float]] = []
        for g in slide.glomeruli:
            for _ in range(st.positives_per_glomerulus):
                dx, dy = rng.uniform(-jitter, jitter, 2)
                centres.append(("glomerulus", g.box[0] + g.box[2] / 2 + dx, g.box[1] + g.box[3] / 2 + dy))
        if st.hard_negatives:
            for b in slide.rejected:
                dx, dy = rng.uniform(-jitter, jitter, 2)
                centres.append(("rejected", b[0] + b[2] / 2 + dx, b[1] + b[3] / 2 + dy))
        if st.negatives_per_slide and slide.fully_reviewed:
            thumb = reader.thumbnail(1024)
            ys, xs = np.nonzero(tissue_mask(thumb))
            if len(ys):
                fx, fy = reader.dimensions[0] / thumb.shape[1], reader.dimensions[1] / thumb.shape[0]
                n, tries = 0, 0
                while n < st.negatives_per_slide and tries < 20 * st.negatives_per_slide:
                    tries += 1
                    i = int(rng.integers(len(ys)))
                    cx, cy = (xs[i] + rng.random()) * fx, (ys[i] + rng.random()) * fy
                    if not any(_overlaps(_window_box(cx, cy, side0), u) for u in slide.undecided):
                        centres.append(("tissue", cx, cy))
                        n += 1
        windows = []
        for kind, cx, cy in centres:
            box = _window_box(cx, cy, side0)
            if any(_overlaps(box, u) for u in slide.undecided):
                continue
            windows.append((kind, box))
        if len(windows) > st.max_windows_per_slide:
            keep = sorted(rng.choice(len(windows), st.max_windows_per_slide, replace=False))
            windows = [windows[i] for i in keep]
        out = []
        for i, (kind, box) in enumerate(windows):
            try:
                rgb = reader.read_region(box[:2], (side, side), mpp=mpp)
            except SlideError as e:
                raise DetectorError(f"slide {slide.name}: window {box}: {e}") from None
            mask = rasterise_glomeruli(slide.glomeruli, box, base / mpp, side)
            out.append(StoreWindow(slide.name, kind, box, TileImage(f"{slide.name}#{kind}{i}", rgb, mask)))
    return out


def _window_box(cx: float, cy: float, side0: float) -> Box:
    s = max(1, round(side0))
    return (round(cx - side0 / 2), round(cy - side0 / 2), s, s)


def load_store_windows(cfg: DetectorConfig, split: DetectorSplit) -> dict[str, list[StoreWindow]]:
    """The windows of the split's stored slides, per part (``train``, ``val``, ``test``).

    Deterministic in ``data.seed`` and the slide name. Every slide of the split must still have
    stored glomeruli (or rejected proposals): an error names the one that has none.
    """
    st = cfg.data.store
    if not st.db:
        return {"train": [], "val": [], "test": []}
    slides = {sl.name: sl for sl in read_stored_slides(st)}
    out: dict[str, list[StoreWindow]] = {}
    for part, names in (("train", split.store_train_slides), ("val", split.store_val_slides),
                        ("test", split.store_test_slides)):
        out[part] = []
        for name in names:
            if name not in slides:
                raise DetectorError(f"slide {name} (split, {part}) has no stored glomerulus or rejected proposal "
                                    f"in {_safe_url(st.db)}")
            sl = slides[name]
            rng = np.random.default_rng([cfg.data.seed, zlib.crc32(name.encode())])
            out[part] += read_slide_windows(sl, _slide_file(sl, st.slides_root), cfg.mpp, cfg.tile_size, st, rng)
        log.info("store %s: %d windows from %d slides (%s)", part, len(out[part]), len(names),
                 ", ".join(f"{k} {sum(w.kind == k for w in out[part])}" for k in ("glomerulus", "rejected", "tissue")))
    return out


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


HardPoint = tuple[int, int, int]  # (training tile index, y, x) of a mined false finding, tile px


class TrainingSampler(torch.utils.data.Sampler):
    """The keys of one epoch of :class:`DetectorTrainingSet`: ``(epoch, index, hard point or None)``.

    A sampler is iterated in the main process every epoch, also when the loader keeps persistent
    worker processes, so the epoch (and the hard negatives mined by the current model) reach the
    workers through the keys; state set on the dataset object would stay behind in their copies and
    every epoch would replay the first one's samples. ``hard_negative_p`` of the keys carry a point
    drawn from :meth:`set_hard_negatives` (none until the first mining), deterministically in
    (seed, epoch, index).
    """

    def __init__(self, length: int, seed: int = 0, hard_negative_p: float = 0.0) -> None:
        self.length, self.seed, self.hard_negative_p = length, seed, hard_negative_p
        self.epoch = 0
        self.hard: list[HardPoint] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_hard_negatives(self, points: list[HardPoint]) -> None:
        self.hard = list(points)

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch, 0x4E45])  # its own stream: samples are unchanged
        for i in range(self.length):
            hard = None
            if self.hard and rng.random() < self.hard_negative_p:
                hard = self.hard[int(rng.integers(len(self.hard)))]
            yield (self.epoch, i, hard)


class DetectorTrainingSet(torch.utils.data.Dataset):
    """Endless random samples (``length`` per epoch): tile windows with pasted crops, augmented.

    Indexed by :class:`TrainingSampler` keys ``(epoch, index, hard point)`` (a bare index: epoch 0, no hard
    point). Returns ``(image tensor 3×S×S normalised, mask tensor 1×S×S float)``.
    """

    def __init__(self, tiles: list[TileImage], crops: list[GlomerulusCrop], size_px: int, mpp: float,
                 aug: DetectorAugmentConfig, length: int, mean: tuple[float, ...], std: tuple[float, ...],
                 seed: int = 0, edge_mirror_px: int = 0) -> None:
        if not tiles:
            raise DetectorError("no training tiles")
        self.tiles, self.crops, self.size, self.mpp, self.aug = tiles, crops, size_px, mpp, aug
        self.length, self.seed, self.margin = length, seed, max(0, int(edge_mirror_px))
        self._mirrored: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.mean, self.std = np.array(mean, np.float32), np.array(std, np.float32)
        self._centres = [np.argwhere(t.mask) for t in tiles]

    def __len__(self) -> int:
        return self.length

    def sample(self, index: int, epoch: int = 0, hard: HardPoint | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One augmented (HWC uint8 RGB, bool mask) pair; deterministic in (seed, epoch, index, hard).

        ``hard``: a window of that training tile holding that point (a false finding of the model
        being trained, mined by :func:`core.detection.train.mine_hard_negatives`) instead of a random one.
        """
        rng = np.random.default_rng([self.seed, epoch, index])
        a, s = self.aug, self.size
        ti = int(rng.integers(len(self.tiles)))
        if hard is not None:
            ti = hard[0]
        tile = self.tiles[ti]
        zoom = 1 + rng.uniform(-a.scale_jitter, a.scale_jitter) if a.scale_jitter else 1.0
        win = min(round(s * zoom), tile.rgb.shape[0], tile.rgb.shape[1])
        src_rgb, src_mask, m = tile.rgb, tile.mask, 0
        if self.margin and a.edge_mirror_p and rng.random() < a.edge_mirror_p:
            # the window may reach past the tile's edge into its mirror image, as prediction sees an edge
            src_rgb, src_mask = self._mirrored_tile(ti)
            m = self.margin
        h, w = src_mask.shape
        centre = None  # a window holding this point, at a random offset, else a random window
        if hard is not None:
            centre = (hard[1] + m, hard[2] + m)
        elif len(self._centres[ti]) and rng.random() < a.centre_on_glomerulus_p:
            centre = self._centres[ti][int(rng.integers(len(self._centres[ti])))] + m
        if centre is not None:
            cy, cx = centre
            y0 = int(np.clip(cy - rng.integers(win), 0, h - win))
            x0 = int(np.clip(cx - rng.integers(win), 0, w - win))
        else:
            y0, x0 = int(rng.integers(h - win + 1)), int(rng.integers(w - win + 1))
        rgb = src_rgb[y0:y0 + win, x0:x0 + win].copy()
        mask = src_mask[y0:y0 + win, x0:x0 + win].copy()
        if win != s:
            rgb = np.asarray(Image.fromarray(rgb).resize((s, s), Image.Resampling.BILINEAR))
            mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((s, s), Image.Resampling.BILINEAR)) > 127
            rgb, mask = rgb.copy(), mask.copy()
        if self.crops and rng.random() < a.paste_p and hard is None:  # no glomerulus pasted over the hard negative
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

    def _mirrored_tile(self, ti: int) -> tuple[np.ndarray, np.ndarray]:
        """Tile ``ti`` (RGB, mask) extended by ``margin`` px of its border mirrored outwards on every side,
        as :func:`core.detection.inference.mirror_edges` extends an image before prediction."""
        if ti not in self._mirrored:
            t, m = self.tiles[ti], self.margin
            self._mirrored[ti] = (mirror_edges(t.rgb, (m, m, m, m)), mirror_edges(t.mask, (m, m, m, m)))
        return self._mirrored[ti]

    def __getitem__(self, key: int | tuple[int, int, HardPoint | None]) -> tuple[torch.Tensor, torch.Tensor]:
        rgb, mask = self.sample(key) if isinstance(key, int) else self.sample(key[1], key[0], key[2])
        x = (rgb.astype(np.float32) / 255 - self.mean) / self.std
        return torch.from_numpy(x.transpose(2, 0, 1).copy()), torch.from_numpy(mask[None].astype(np.float32))
