"""From a probability map to glomeruli: threshold, touching-glomeruli split, specks dropped, polygons.

Touching glomeruli merge into one thresholded blob; a watershed on the distance transform, seeded
by maxima at least ``split_min_distance_um`` apart, cuts them along the neck between them. Every
instance gets a score (its mean probability) and a polygon simplified with shapely.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

__all__ = ["Instance", "filter_by_score", "instance_polygon", "instances_from_labels", "instances_from_prob",
           "label_instances"]


@dataclass
class Instance:
    """One glomerulus: polygon (level-0 or image px, as asked), box (x, y, w, h), area µm², score."""

    polygon: list[tuple[float, float]]
    box: tuple[int, int, int, int]
    area_um2: float
    score: float


def label_instances(prob: np.ndarray, threshold: float, mpp: float, min_area_um2: float,
                    split_min_distance_um: float) -> tuple[np.ndarray, int]:
    """int32 label image (0 = background) of the glomeruli in ``prob`` (at ``mpp`` µm/px)."""
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    binary = prob >= threshold
    binary = ndi.binary_fill_holes(ndi.binary_opening(binary, iterations=2))
    labels, n = ndi.label(binary)
    if n == 0:
        return labels.astype(np.int32), 0
    min_px = min_area_um2 / (mpp * mpp)
    out = np.zeros(labels.shape, np.int32)
    next_id = 1
    min_dist = max(1, round(split_min_distance_um / mpp))
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        comp = labels[sl] == i
        area = int(comp.sum())
        if area < min_px:
            continue
        parts = comp.astype(np.int32)
        if area >= 2 * min_px:  # only a blob big enough for two glomeruli can hold two
            dist = ndi.distance_transform_edt(np.pad(comp, 1))[1:-1, 1:-1]
            peaks = peak_local_max(dist, min_distance=min_dist, labels=comp.astype(np.int32),
                                   threshold_abs=0.5 * min_dist, exclude_border=False)
            if len(peaks) > 1:
                markers = np.zeros(comp.shape, np.int32)
                markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
                parts = watershed(-dist, markers, mask=comp)
        for j in range(1, int(parts.max()) + 1):
            piece = parts == j
            if piece.sum() < min_px:
                continue
            out[sl][piece] = next_id
            next_id += 1
    return out, next_id - 1


def filter_by_score(labels: np.ndarray, prob: np.ndarray, min_score: float) -> tuple[np.ndarray, list[float]]:
    """Drop the glomeruli whose score (mean probability) is below ``min_score``; the relabelled image
    (1..n again) and the kept scores. A tubule with a cast often passes the pixel threshold only in part
    and faintly: its mean probability is lower than a glomerulus's."""
    n = int(labels.max())
    if n == 0:
        return labels, []
    means = np.asarray(ndi.mean(prob, labels, index=np.arange(1, n + 1)), dtype=np.float64)
    keep = means >= min_score
    lut = np.zeros(n + 1, np.int32)
    lut[1:][keep] = np.arange(1, int(keep.sum()) + 1)
    return lut[labels], [float(m) for m in means[keep]]


def instance_polygon(mask: np.ndarray, simplify_px: float) -> list[tuple[float, float]]:
    """Outer outline of a bool mask as (x, y) pixel-corner coordinates, simplified; [] when empty."""
    from shapely.geometry import Polygon
    from skimage.measure import find_contours

    contours = find_contours(np.pad(mask, 1).astype(np.float32), 0.5)
    if not contours:
        return []
    ring = max(contours, key=len)  # the outer outline; holes were filled before
    # padded index - 1 = pixel index; + 0.5 = pixel-corner coordinates (pixel i spans [i, i + 1])
    poly = Polygon([(c - 0.5, r - 0.5) for r, c in ring])
    if not poly.is_valid:
        poly = poly.buffer(0)
        if poly.geom_type == "MultiPolygon":
            poly = max(poly.geoms, key=lambda g: g.area)
    poly = poly.simplify(simplify_px, preserve_topology=True)
    if poly.is_empty:
        return []
    return [(float(x), float(y)) for x, y in poly.exterior.coords]


def instances_from_labels(labels: np.ndarray, prob: np.ndarray, mpp: float, *, simplify_um: float = 1.5,
                          offset_xy: tuple[float, float] = (0.0, 0.0), scale: float = 1.0,
                          ids: list[int] | None = None) -> list[Instance]:
    """Polygons of the labelled glomeruli (all, or ``ids``); coordinates ``offset + scale · (x, y)``."""
    out = []
    slices = ndi.find_objects(labels)
    for i in ids if ids is not None else range(1, len(slices) + 1):
        sl = slices[i - 1]
        if sl is None:
            continue
        m = labels[sl] == i
        pts = instance_polygon(m, simplify_um / mpp)
        if len(pts) < 4:
            continue
        oy, ox = sl[0].start, sl[1].start
        poly = [(offset_xy[0] + scale * (x + ox), offset_xy[1] + scale * (y + oy)) for x, y in pts]
        xs, ys = [p[0] for p in poly], [p[1] for p in poly]
        x0, y0 = int(np.floor(min(xs))), int(np.floor(min(ys)))
        box = (x0, y0, int(np.ceil(max(xs))) - x0, int(np.ceil(max(ys))) - y0)
        out.append(Instance(poly, box, float(m.sum()) * mpp * mpp, float(prob[sl][m].mean())))
    return out


def instances_from_prob(prob: np.ndarray, mpp: float, *, threshold: float = 0.5, min_area_um2: float = 1500.0,
                        split_min_distance_um: float = 60.0, simplify_um: float = 1.5,
                        offset_xy: tuple[float, float] = (0.0, 0.0), scale: float = 1.0) -> list[Instance]:
    """Glomeruli in ``prob``; coordinates are ``offset + scale · (x, y)`` (e.g. level-0 px of a slide)."""
    labels, _ = label_instances(prob, threshold, mpp, min_area_um2, split_min_distance_um)
    return instances_from_labels(labels, prob, mpp, simplify_um=simplify_um, offset_xy=offset_xy, scale=scale)
