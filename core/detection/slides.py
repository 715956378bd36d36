"""``glom detect``: every glomerulus of a whole slide, as QuPath GeoJSON (and store proposals).

Per slide: an Otsu tissue mask on a thumbnail; tiles at the model's working µm/px, overlapping,
over tissue only, read (on a GPU: by a background thread while the model runs on the previous batch);
probabilities blended into a *strip* of the working-resolution map. Rows above the current tile
row are final: glomeruli wholly inside them are labelled, split, polygonised and emitted, and the
strip moves down. Memory is the tile batch plus one strip (the tissue's width at the working
resolution × (tile + the tallest glomerulus)), whatever the slide's height or level-0 size.

A slide whose ``<out>/<slide>.geojson`` was written by the same checkpoint with the same settings
is skipped (resumable); files are written to a temporary name and renamed, so an interrupted run
never leaves a half file that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from tqdm import tqdm

from core.detection.inference import (
    Predictor,
    blend_weights,
    mirror_edges,
    tile_origins,
)
from core.detection.instances import Instance, instances_from_labels, label_instances
from core.detection.model import DetectorError, DetectorMeta
from core.errors import GlomError

log = logging.getLogger(__name__)

__all__ = [
    "DetectSettings",
    "DetectSlideError",
    "SlideDetection",
    "checkpoint_digest",
    "detect_in_reader",
    "detect_slide",
    "geojson_features",
    "read_done",
    "result_path",
    "slide_run_info",
    "tissue_mask",
    "write_geojson",
]

GEOJSON_CLASS = "Glomerulus"
GEOJSON_COLOR = [0, 200, 0]
_EDGE_ROWS = 4  # label_instances opens with 2 iterations: a blob cut by the strip edge may end this far above it


class DetectSlideError(GlomError, RuntimeError):
    """Detection failed on one slide; the message names it."""


@dataclass
class DetectSettings:
    """How a slide is tiled and post-processed (defaults from the checkpoint's sidecar)."""

    tile_px: int = 512  # inference tile side at the working µm/px (a U-Net takes any multiple of 32)
    overlap_px: int = 64
    batch_size: int = 8
    threshold: float = 0.5
    min_area_um2: float = 1500.0
    split_min_distance_um: float = 60.0
    simplify_um: float = 1.5
    min_score: float = 0.0  # findings with a lower mean probability are dropped
    tta: bool = False  # mean of the four flips of each tile (4 forward passes)
    max_object_um: float = 600.0  # a component taller than this is emitted even if it still grows
    edge_mirror_um: float = 0.0  # where tissue reaches the slide's edge, the edge is mirrored outwards this far
    thumbnail_px: int = 1024
    tissue_min_fraction: float = 0.01  # a tile is read when this much of it is tissue on the thumbnail

    @classmethod
    def from_meta(cls, meta: DetectorMeta, **overrides: Any) -> DetectSettings:
        post = {k: v for k, v in meta.postprocess.items() if k in cls.__dataclass_fields__}
        post["threshold"] = meta.threshold
        post.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**post)


@dataclass
class SlideDetection:
    """What detecting one slide gave."""

    slide: str
    instances: list[Instance]
    slide_mpp: float
    work_mpp: float
    tiles_total: int  # of a grid over the whole slide (tissue or not)
    tiles_read: int
    seconds: float
    forward_seconds: float = 0.0
    skipped: bool = False
    timings: dict[str, float] = field(default_factory=dict)


def checkpoint_digest(stem: str | Path) -> str:
    """First 16 hex digits of the weights' SHA-256: which model found a glomerulus."""
    weights = Path(stem).with_suffix(".safetensors")
    h = hashlib.sha256()
    with weights.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def tissue_mask(thumb_rgb: np.ndarray) -> np.ndarray:
    """Bool tissue mask of a thumbnail: Otsu on grey level, small specks removed, slightly dilated."""
    from skimage.filters import threshold_otsu

    grey = thumb_rgb.astype(np.float32).mean(axis=2)
    sat = thumb_rgb.max(axis=2).astype(np.float32) - thumb_rgb.min(axis=2)
    if grey.max() - grey.min() < 8:  # a blank slide: Otsu would split noise
        return np.zeros(grey.shape, bool)
    thr = threshold_otsu(grey)
    mask = (grey < thr) & ((sat > 8) | (grey < 200))  # stained or clearly dark: not glass, not pen-free glare
    mask = ndi.binary_opening(mask, iterations=1)
    return ndi.binary_dilation(mask, iterations=2)


def _tile_tasks(reader: Any, settings: DetectSettings, work_mpp: float) -> tuple[list[int], list[int],
                                                                                   list[tuple[int, int]], int, int,
                                                                                   tuple[int, int, int, int]]:
    """Tile rows, columns and the (y, x) origins over tissue, in working px of the tissue bounding box.
    Where the tissue reaches an edge of the slide (a region cut from a larger field, a tile) and
    ``edge_mirror_um`` is set, the box reaches that far beyond the edge: :func:`detect_in_reader` fills
    it with the slide's border mirrored, as :func:`core.detection.inference.predict_image` does."""
    slide_mpp = reader.require_mpp()
    f = work_mpp / slide_mpp  # level-0 px per working px
    w0, h0 = reader.dimensions
    thumb = reader.thumbnail(settings.thumbnail_px)
    tissue = tissue_mask(thumb)
    th, tw = tissue.shape
    sx, sy = tw / w0, th / h0  # thumbnail px per level-0 px
    if not tissue.any():
        return [], [], [], 0, 0, (0, 0, 0, 0)
    ys, xs = np.nonzero(tissue)
    bx0 = max(0, int(xs.min() / sx) - 1)
    by0 = max(0, int(ys.min() / sy) - 1)
    bx1 = min(w0, int(np.ceil((xs.max() + 1) / sx)) + 1)
    by1 = min(h0, int(np.ceil((ys.max() + 1) / sy)) + 1)
    m0 = round(settings.edge_mirror_um / slide_mpp)  # level-0 px
    if m0 > 0:
        bx0, by0 = (-m0 if bx0 == 0 else bx0), (-m0 if by0 == 0 else by0)
        bx1, by1 = (w0 + m0 if bx1 == w0 else bx1), (h0 + m0 if by1 == h0 else by1)
    wb, hb = max(1, int(np.ceil((bx1 - bx0) / f))), max(1, int(np.ceil((by1 - by0) / f)))
    t = settings.tile_px
    rows, cols = tile_origins(hb, t, settings.overlap_px), tile_origins(wb, t, settings.overlap_px)
    tasks = []
    for y in rows:
        for x in cols:
            tx0, ty0 = int((bx0 + x * f) * sx), int((by0 + y * f) * sy)
            tx1, ty1 = int(np.ceil((bx0 + (x + t) * f) * sx)), int(np.ceil((by0 + (y + t) * f) * sy))
            tx0, ty0 = max(tx0, 0), max(ty0, 0)  # a tile reaching into the mirrored margin
            window = tissue[ty0:max(ty1, ty0 + 1), tx0:max(tx1, tx0 + 1)]
            if window.size and window.mean() >= settings.tissue_min_fraction:
                tasks.append((y, x))
    return rows, cols, tasks, wb, hb, (bx0, by0, bx1 - bx0, by1 - by0)


def _prefetch(read: Callable[[tuple[int, int]], np.ndarray], tasks: list[tuple[int, int]],
              depth: int) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
    """Read tiles on one background thread (OpenSlide and PIL release the GIL) ``depth`` ahead."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def worker() -> None:
        try:
            for task in tasks:
                if stop.is_set():
                    return
                q.put((task, read(task)))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            q.put(e)
            return
        q.put(None)

    thread = threading.Thread(target=worker, daemon=True, name="tile-reader")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)


class _Strip:
    """The working-resolution probability map between ``top`` and ``top + height`` rows, bounded."""

    def __init__(self, width: int, height: int) -> None:
        self.top = 0
        self.acc = np.zeros((height, width), np.float32)
        self.wsum = np.zeros((height, width), np.float16)
        self.done = np.zeros((height, width), bool)  # pixels of glomeruli already emitted

    def add(self, y: int, x: int, prob: np.ndarray, weight: np.ndarray) -> None:
        h, w = prob.shape
        r = y - self.top
        if r < 0 or r + h > self.acc.shape[0]:
            raise DetectorError(f"internal: tile row {y} outside the strip {self.top}..{self.top + self.acc.shape[0]}")
        ww = min(w, self.acc.shape[1] - x)
        hh = h
        self.acc[r:r + hh, x:x + ww] += (prob * weight)[:hh, :ww]
        self.wsum[r:r + hh, x:x + ww] += weight[:hh, :ww]

    def shift(self, new_top: int) -> None:
        d = new_top - self.top
        if d <= 0:
            return
        for a in (self.acc, self.wsum, self.done):
            a[:-d] = a[d:]
            a[-d:] = 0
        self.top = new_top


def detect_in_reader(reader: Any, predictor: Predictor, settings: DetectSettings, *,
                     progress: bool = False, position: int = 0) -> SlideDetection:
    """Detect glomeruli in an open slide (any :class:`core.wsi.SlideReader`); polygons in level-0 px."""
    t_start = time.perf_counter()
    work_mpp = predictor.meta.mpp
    slide_mpp = reader.require_mpp()
    f = work_mpp / slide_mpp
    _, _, tasks, wb, hb, bbox = _tile_tasks(reader, settings, work_mpp)
    t_mask = time.perf_counter() - t_start
    bx0, by0 = bbox[0], bbox[1]
    t, stride = settings.tile_px, settings.tile_px - settings.overlap_px
    max_obj = int(np.ceil(settings.max_object_um / work_mpp))
    strip = _Strip(wb, t + stride + max_obj) if tasks else None
    weight = blend_weights(t, settings.overlap_px)
    found: list[Instance] = []
    forward_s = 0.0
    t_post = 0.0

    w0, h0 = reader.dimensions
    mirrored = settings.edge_mirror_um > 0

    def read(task: tuple[int, int]) -> np.ndarray:
        y, x = task
        lx, ly = bx0 + x * f, by0 + y * f  # level-0 top-left
        if mirrored:  # the part outside the slide: its border mirrored (working px on each side)
            left, top = min(t - 1, int(np.ceil(max(0.0, -lx) / f))), min(t - 1, int(np.ceil(max(0.0, -ly) / f)))
            right = min(t - 1 - left, int(np.ceil(max(0.0, lx + t * f - w0) / f)))
            bottom = min(t - 1 - top, int(np.ceil(max(0.0, ly + t * f - h0) / f)))
            if left or top or right or bottom:
                inner = reader.read_region((round(lx + left * f), round(ly + top * f)),
                                           (t - left - right, t - top - bottom), mpp=work_mpp)
                return mirror_edges(inner, (top, bottom, left, right))
        return reader.read_region((round(lx), round(ly)), (t, t), mpp=work_mpp)

    # canvas columns outside the slide (the mirrored margin): never part of a finding
    col_x0 = bx0 + np.arange(wb) * f  # level-0 x of each canvas column
    outside_cols = ((col_x0 < 0) | (col_x0 >= w0)) if mirrored else None

    def finalise(fin: int, final: bool) -> None:
        nonlocal t_post
        t0 = time.perf_counter()
        assert strip is not None
        h = min(fin - strip.top, hb - strip.top)
        if h <= 0:
            return
        wsum = strip.wsum[:h].astype(np.float32)
        prob = np.where(wsum > 0, strip.acc[:h] / np.maximum(wsum, 1e-6), 0.0)
        prob[strip.done[:h]] = 0.0
        if outside_cols is not None:
            prob[:, outside_cols] = 0.0
            rows_y0 = by0 + (strip.top + np.arange(h)) * f
            prob[(rows_y0 < 0) | (rows_y0 >= h0)] = 0.0
        labels, _ = label_instances(prob, settings.threshold, work_mpp, settings.min_area_um2,
                                    settings.split_min_distance_um)
        emit, new_top = [], fin
        growing = np.zeros(labels.shape, bool)
        if not final:
            # anything above threshold that reaches the strip's lower edge may continue below it,
            # even a piece still too small to count: keep it (and what it touches) for the next row
            raw, _ = ndi.label(prob >= settings.threshold)
            for j, sl in enumerate(ndi.find_objects(raw), start=1):
                if sl is not None and sl[0].stop >= h - _EDGE_ROWS and h - sl[0].start <= max_obj:
                    growing[sl] |= raw[sl] == j
                    new_top = min(new_top, strip.top + sl[0].start)
        for i, sl in enumerate(ndi.find_objects(labels), start=1):
            if sl is None:
                continue
            if growing[sl][labels[sl] == i].any():
                continue
            emit.append(i)
            strip.done[:h][sl] |= labels[sl] == i
        found.extend(i for i in instances_from_labels(labels, prob, work_mpp, simplify_um=settings.simplify_um,
                                                      offset_xy=(bx0, by0 + strip.top * f), scale=f, ids=emit)
                     if i.score >= settings.min_score)
        strip.shift(max(strip.top, min(new_top, fin)))
        t_post += time.perf_counter() - t0

    bar = tqdm(total=len(tasks), desc=reader.name, unit="tile", leave=False, disable=not progress,
               position=position)
    batch: list[tuple[tuple[int, int], np.ndarray]] = []
    last_fin = 0
    try:
        # A reading thread pays off when the model runs on a GPU; on a CPU it takes cores from torch's
        # own threads (measured on 2 cores: 1.4x slower than reading inline, which costs ~3 % of a forward).
        stream = (_prefetch(read, tasks, depth=2 * settings.batch_size) if getattr(predictor, "cuda", False)
                  else ((task, read(task)) for task in tasks))
        for k, item in enumerate(stream):
            batch.append(item)
            if len(batch) < settings.batch_size and k < len(tasks) - 1:
                continue
            t0 = time.perf_counter()
            probs = predictor(np.stack([rgb for _, rgb in batch]))
            forward_s += time.perf_counter() - t0
            assert strip is not None
            for ((y, x), _), p in zip(batch, probs):
                # tasks come row by row: every row above this tile's is final
                if y + t - strip.top > strip.acc.shape[0]:
                    finalise(y, final=False)
                    last_fin = y
                strip.add(y, x, p, weight)
            bar.update(len(batch))
            batch = []
            if k < len(tasks) - 1 and tasks[k + 1][0] > last_fin:
                last_fin = tasks[k + 1][0]
                finalise(last_fin, final=False)
        if strip is not None:
            finalise(hb, final=True)
    finally:
        bar.close()
    # tiles a whole-slide grid would have read, for comparison (with the same mirrored margins)
    mx = (max(0.0, -bbox[0]) + max(0.0, bbox[0] + bbox[2] - w0)) / f
    my = (max(0.0, -bbox[1]) + max(0.0, bbox[1] + bbox[3] - h0)) / f
    grid = (len(tile_origins(int((w0 / f) + mx), t, settings.overlap_px))
            * len(tile_origins(int((h0 / f) + my), t, settings.overlap_px)))
    return SlideDetection(reader.name, found, slide_mpp, work_mpp, grid, len(tasks),
                          time.perf_counter() - t_start, forward_s,
                          timings={"tissue_mask_s": round(t_mask, 3), "postprocess_s": round(t_post, 3)})


# --- output ---------------------------------------------------------------------------------------


def geojson_features(instances: list[Instance]) -> list[dict[str, Any]]:
    """QuPath annotations: polygon (level-0 px), class "Glomerulus", score in properties and measurements."""
    feats = []
    for inst in instances:
        ring = [[round(x, 1), round(y, 1)] for x, y in inst.polygon]
        if ring[0] != ring[-1]:
            ring.append(ring[0])
        feats.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {
                "objectType": "annotation",
                "classification": {"name": GEOJSON_CLASS, "color": GEOJSON_COLOR},
                "score": round(inst.score, 4),
                "measurements": {"score": round(inst.score, 4), "area_um2": round(inst.area_um2, 1)},
            },
        })
    return feats


def write_geojson(path: Path, det: SlideDetection, run_info: dict[str, Any]) -> Path:
    """Write the FeatureCollection atomically; ``glomlab`` (ignored by QuPath) records how it was made."""
    doc = {"type": "FeatureCollection", "features": geojson_features(det.instances),
           "glomlab": {**run_info, "slide": det.slide, "n": len(det.instances), "slide_mpp": det.slide_mpp,
                       "work_mpp": det.work_mpp, "tiles_read": det.tiles_read, "tiles_total": det.tiles_total,
                       "seconds": round(det.seconds, 2)}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)
    return path


def read_done(path: Path, run_info: dict[str, Any]) -> bool:
    """Whether ``path`` is a finished result of the same checkpoint and settings."""
    if not path.is_file():
        return False
    try:
        info = json.loads(path.read_text()).get("glomlab", {})
    except (OSError, json.JSONDecodeError):
        return False
    return all(info.get(k) == v for k, v in run_info.items())


def result_path(out_dir: str | Path, slide: str | Path) -> Path:
    """Where ``glom detect`` writes a slide's findings: ``<out_dir>/<slide name>.geojson``."""
    from core.wsi import slide_name

    return Path(out_dir) / f"{slide_name(slide)}.geojson"


def slide_run_info(checkpoint: str, digest: str, settings: DetectSettings) -> dict[str, Any]:
    """What makes two runs over a slide the same (the resume key, kept in the GeoJSON's ``glomlab``)."""
    return {"checkpoint": checkpoint, "checkpoint_sha256": digest, "settings": asdict(settings)}


def detect_slide(path: str | Path, predictor: Predictor, settings: DetectSettings, out_dir: Path, *,
                 checkpoint: str, digest: str, slide_mpp: float | None = None, resume: bool = True,
                 progress: bool = False, position: int = 0) -> tuple[SlideDetection, Path]:
    """Detect one slide file into ``out_dir/<slide>.geojson``; skipped when already done the same way."""
    from core.wsi import SlideError, open_slide, slide_name

    name = slide_name(path)
    out = result_path(out_dir, path)
    run_info = slide_run_info(checkpoint, digest, settings)
    if resume and read_done(out, run_info):
        doc = json.loads(out.read_text())
        log.info("%s: already detected by this checkpoint (%s), skipped", name, out)
        return SlideDetection(name, _instances_from_doc(doc), doc["glomlab"].get("slide_mpp", 0.0),
                              predictor.meta.mpp, doc["glomlab"].get("tiles_total", 0), 0, 0.0, skipped=True), out
    try:
        with open_slide(path, fallback_mpp=slide_mpp) as reader:
            det = detect_in_reader(reader, predictor, settings, progress=progress, position=position)
    except (SlideError, DetectorError, OSError, ValueError, RuntimeError) as e:
        from core.wsi import MissingMppError

        msg = str(e) if str(path) in str(e) else f"{path}: {e}"
        if isinstance(e, MissingMppError):
            msg += " For glom detect: --mpp 0.25 (µm per level-0 pixel of slides that record none)."
        raise DetectSlideError(msg) from e
    write_geojson(out, det, run_info)
    return det, out


def _instances_from_doc(doc: dict[str, Any]) -> list[Instance]:
    out = []
    for feat in doc.get("features", []):
        ring = [(float(x), float(y)) for x, y in feat["geometry"]["coordinates"][0]]
        xs, ys = [p[0] for p in ring], [p[1] for p in ring]
        x0, y0 = int(np.floor(min(xs))), int(np.floor(min(ys)))
        props = feat.get("properties", {})
        out.append(Instance(ring, (x0, y0, int(np.ceil(max(xs))) - x0, int(np.ceil(max(ys))) - y0),
                            float(props.get("measurements", {}).get("area_um2", 0.0)), float(props.get("score", 0.0))))
    return out
