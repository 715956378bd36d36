"""Boxes drawn on slides in the labeling app: store, list, delete.

Every function takes a session; the caller owns the transaction. Boxes are level-0 pixels
``(x, y, w, h)``. Exporting them as QuPath GeoJSON and cropping them into a dataset is
:mod:`core.slide_crops` (``export_boxes_geojson``, ``crop_into_dataset``).
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from annotation_db.db import StoreError
from annotation_db.models import Slide, SlideBox


class BoxError(StoreError):
    """A box that cannot be stored: empty, negative or malformed."""


def add_box(
    session: Session,
    slide: Slide,
    box: tuple[int, int, int, int],
    *,
    created_by: str,
    label: str | None = None,
) -> SlideBox:
    """Store one drawn level-0 box ``(x, y, w, h)`` on ``slide`` (label = class key or None)."""
    try:
        x0, y0, w, h = (int(round(v)) for v in box)
    except (TypeError, ValueError):
        raise BoxError(f"slide {slide.name}: a box is (x, y, w, h) in level-0 pixels, got {box!r}") from None
    if w <= 0 or h <= 0:
        raise BoxError(f"slide {slide.name}: empty box {box} (width and height must be > 0)")
    if x0 + w <= 0 or y0 + h <= 0:
        raise BoxError(f"slide {slide.name}: box {box} lies wholly left of or above the slide")
    if not created_by.strip():
        raise BoxError("a box needs the name of who drew it (created_by)")
    row = SlideBox(slide_id=slide.id, x0=x0, y0=y0, box_w=w, box_h=h, label=label or None, created_by=created_by.strip())
    session.add(row)
    session.flush()
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
