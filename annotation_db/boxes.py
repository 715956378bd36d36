"""Glomeruli marked on slides (boxes, with their outline when there is one): store, list, move, delete.

Every function takes a session; the caller owns the transaction. Boxes are level-0 pixels
``(x, y, w, h)``; an outline (``SlideBox.polygon``) is a level-0 exterior ring ``[[x, y], ...]``
stored open (no repeated closing vertex), and the box is its bounds. Moving a box's corners
(:func:`move_box`, the workspace's handle drag) scales its outline into the new box, so the
outline keeps its shape and stays inside the box. Exporting them as QuPath GeoJSON and cropping
them into a dataset is :mod:`core.slide_crops` (``export_boxes_geojson``, ``crop_into_dataset``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from annotation_db.db import StoreError
from annotation_db.errors import GlomError
from annotation_db.models import Slide, SlideBox

BOX_SOURCES = ("drawn", "proposal")  # and import:<file name>


class BoxError(StoreError):
    """A box that cannot be stored: empty, negative or malformed."""


class OutlineError(GlomError, ValueError):
    """An outline that is no simple polygon; the message says what is wrong (no place: the caller adds it)."""


def outline_ring(points: Sequence[Sequence[float]]) -> list[list[float]]:
    """``points`` as a stored outline: an open ring of finite level-0 ``[x, y]`` (rounded to 0.1 px),
    a closing vertex that repeats the first dropped. Raises :class:`OutlineError` for fewer than 3
    distinct points, a non-number, an outline without area or one that crosses itself."""
    from shapely.geometry import Polygon
    from shapely.validation import explain_validity

    if isinstance(points, (str, bytes)) or not isinstance(points, Sequence):
        raise OutlineError(f"an outline is a list of [x, y] points, got {points!r:.80}")
    ring = []
    for i, p in enumerate(points):
        try:
            x, y = (float(v) for v in p)
        except (TypeError, ValueError):
            raise OutlineError(f"point {i} is not [x, y] numbers: {p!r:.60}") from None
        if not (math.isfinite(x) and math.isfinite(y)):
            raise OutlineError(f"point {i} is not finite: {[x, y]}")
        ring.append([round(x, 1), round(y, 1)])
    if len(ring) > 1 and ring[0] == ring[-1]:
        ring.pop()
    if len({tuple(p) for p in ring}) < 3:
        raise OutlineError(f"an outline needs at least 3 distinct points, got {len({tuple(p) for p in ring})}")
    poly = Polygon(ring)
    if not poly.is_valid:
        raise OutlineError(f"the outline is no simple polygon ({explain_validity(poly)})")
    if poly.area <= 0:
        raise OutlineError("the outline encloses no area")
    return ring


def outline_box(ring: Sequence[Sequence[float]]) -> tuple[int, int, int, int]:
    """The level-0 box ``(x, y, w, h)`` of an outline: its bounds, out to whole pixels."""
    x0, y0 = math.floor(min(p[0] for p in ring)), math.floor(min(p[1] for p in ring))
    return (x0, y0, math.ceil(max(p[0] for p in ring)) - x0, math.ceil(max(p[1] for p in ring)) - y0)


def scale_outline(ring: Sequence[Sequence[float]], old: tuple[int, int, int, int],
                  new: tuple[int, int, int, int]) -> list[list[float]]:
    """``ring`` mapped from box ``old`` into box ``new`` (each axis scaled about the box corner)."""
    sx, sy = new[2] / old[2], new[3] / old[3]
    return [[round(new[0] + (x - old[0]) * sx, 1), round(new[1] + (y - old[1]) * sy, 1)] for x, y in ring]


def _same_bounds(box: Sequence[float], bounds: tuple[int, int, int, int]) -> bool:
    """Whether ``box`` is ``bounds`` up to a pixel per edge (outlines are rounded to 0.1 px)."""
    try:
        x, y, w, h = (float(v) for v in box)
    except (TypeError, ValueError):
        return False
    bx, by, bw, bh = bounds
    return max(abs(x - bx), abs(y - by), abs(x + w - bx - bw), abs(y + h - by - bh)) <= 1


def add_box(
    session: Session,
    slide: Slide,
    box: tuple[int, int, int, int] | None,
    *,
    created_by: str,
    label: str | None = None,
    polygon: Sequence[Sequence[float]] | None = None,
    source: str = "drawn",
) -> SlideBox:
    """Store one glomerulus on ``slide``: a level-0 box ``(x, y, w, h)``, or an outline ``polygon``
    (``[[x, y], ...]``; the box is then its bounds and ``box`` may be None; a ``box`` given with
    it must be those bounds up to a pixel per edge). ``label``: class key or None; ``source``: drawn, proposal or
    import:<file>."""
    if polygon is not None:
        try:
            ring = outline_ring(polygon)
        except OutlineError as e:
            raise BoxError(f"slide {slide.name}: {e}") from None
        bounds = outline_box(ring)
        if box is None:
            box = bounds
        elif not _same_bounds(box, bounds):
            raise BoxError(f"slide {slide.name}: box {tuple(box)} is not the bounds {bounds} of its outline")
    else:
        ring = None
    if not (source in BOX_SOURCES or (source.startswith("import:") and len(source) > len("import:"))):
        raise BoxError(f"slide {slide.name}: a box's source is drawn, proposal or import:<file>, not {source!r}")
    try:
        x0, y0, w, h = (round(v) for v in box)
    except (TypeError, ValueError):
        raise BoxError(f"slide {slide.name}: a box is (x, y, w, h) in level-0 pixels, got {box!r}") from None
    if w <= 0 or h <= 0:
        raise BoxError(f"slide {slide.name}: empty box {box} (width and height must be > 0)")
    if x0 + w <= 0 or y0 + h <= 0:
        raise BoxError(f"slide {slide.name}: box {box} lies wholly left of or above the slide")
    if not created_by.strip():
        raise BoxError("a box needs the name of who drew it (created_by)")
    row = SlideBox(slide_id=slide.id, x0=x0, y0=y0, box_w=w, box_h=h, label=label or None,
                   created_by=created_by.strip(), polygon=ring, source=source[:300])
    session.add(row)
    session.flush()
    return row


def move_box(row: SlideBox, box: tuple[int, int, int, int]) -> SlideBox:
    """Set ``row``'s box to level-0 ``box`` (its corners dragged); its outline, if any, is scaled
    from the old box into the new one. A box already cropped is refused (its crop is final)."""
    x, y, w, h = (round(v) for v in box)
    if w <= 0 or h <= 0:
        raise BoxError(f"box {row.id}: empty box {[x, y, w, h]} (width and height must be > 0)")
    if row.image_id is not None:
        raise BoxError(f"box {row.id} was cropped into the dataset already (image {row.image_id}): its box is final")
    if row.polygon:
        row.polygon = scale_outline(row.polygon, row.box, (x, y, w, h))
    row.x0, row.y0, row.box_w, row.box_h = x, y, w, h
    return row


def list_boxes(session: Session, slide: Slide, *, uncropped_only: bool = False) -> list[SlideBox]:
    """The boxes of ``slide`` in drawing order; ``uncropped_only``: those not cropped yet."""
    stmt = select(SlideBox).where(SlideBox.slide_id == slide.id)
    if uncropped_only:
        stmt = stmt.where(SlideBox.image_id.is_(None))
    return list(session.scalars(stmt.order_by(SlideBox.id)))


def delete_box(session: Session, box_id: int) -> bool:
    """Delete a drawn box (its crop, if any, stays in the dataset). True if it existed."""
    row = session.get(SlideBox, box_id)
    if row is None:
        return False
    session.delete(row)
    session.flush()
    return True
