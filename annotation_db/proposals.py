"""Glomeruli a detector proposes on a slide: store, replace, list, accept, reject.

``glom detect --dataset D`` stores its findings as ``proposed``. Detecting the slide again
replaces the still-``proposed`` ones of that slide and dataset and never touches ``accepted`` or
``rejected`` proposals or boxes drawn by hand; a new finding that covers one of those (box IoU ≥
0.5) is not proposed again. Accepting a proposal draws a ``SlideBox`` from it (by the reviewer),
so it is cropped and registered like a drawn box (:func:`core.detection.review.accept_and_crop`);
the box carries the proposal's outline (``SlideBox.polygon``, source ``proposal``).

Functions take a session; the caller owns the transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from annotation_db import store
from annotation_db.boxes import OutlineError, add_box, list_boxes, outline_ring
from annotation_db.db import StoreError
from annotation_db.models import (
    PROPOSAL_STATUSES,
    Dataset,
    GlomerulusProposal,
    Slide,
    SlideBox,
    utcnow,
)

log = logging.getLogger(__name__)

__all__ = [
    "REPROPOSE_IOU",
    "Finding",
    "ProposalError",
    "accept_proposal",
    "box_iou",
    "list_proposals",
    "reject_proposal",
    "replace_proposals",
]

REPROPOSE_IOU = 0.5  # a finding overlapping a reviewed proposal or a drawn box this much is not proposed again


class ProposalError(StoreError):
    """A proposal that does not exist or cannot change as asked."""


class Finding(Protocol):
    """What a detector gives per glomerulus (``core.detection.instances.Instance``)."""

    polygon: Sequence[tuple[float, float]]
    box: tuple[int, int, int, int]
    score: float
    area_um2: float


def box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """IoU of two level-0 ``(x, y, w, h)`` boxes."""
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def replace_proposals(session: Session, dataset: Dataset | str, slide_name: str, findings: Sequence[Finding], *,
                      source: str, checkpoint_sha256: str = "", slide_path: str | None = None) -> int:
    """Replace the slide's still-proposed findings in ``dataset`` by ``findings``; returns how many were stored."""
    ds = dataset if isinstance(dataset, Dataset) else store.get_dataset(session, dataset)
    if not source.startswith("model:"):
        raise ProposalError(f"a proposal's source is model:<checkpoint>, not {source!r}")
    slide = store.get_or_create_slide(session, slide_name, path=slide_path)
    session.execute(delete(GlomerulusProposal).where(
        GlomerulusProposal.slide_id == slide.id, GlomerulusProposal.dataset_id == ds.id,
        GlomerulusProposal.status == "proposed"))
    kept = [p.box for p in session.scalars(select(GlomerulusProposal).where(
        GlomerulusProposal.slide_id == slide.id, GlomerulusProposal.dataset_id == ds.id))]
    kept += [b.box for b in list_boxes(session, slide)]
    n = 0
    for f in findings:
        box = tuple(int(v) for v in f.box)
        if box[2] <= 0 or box[3] <= 0:
            raise ProposalError(f"slide {slide_name}: a finding has an empty box {box}")
        if any(box_iou(box, k) >= REPROPOSE_IOU for k in kept):
            continue
        session.add(GlomerulusProposal(
            slide_id=slide.id, dataset_id=ds.id, status="proposed", source=source,
            checkpoint_sha256=checkpoint_sha256, score=float(f.score),
            polygon=[[round(float(x), 1), round(float(y), 1)] for x, y in f.polygon],
            x0=box[0], y0=box[1], box_w=box[2], box_h=box[3], area_um2=float(f.area_um2)))
        n += 1
    session.flush()
    return n


def list_proposals(session: Session, slide: Slide | str, dataset: Dataset | str | None = None,
                   status: str | None = None) -> list[GlomerulusProposal]:
    """A slide's proposals (of one dataset / status when given), best score first."""
    if status is not None and status not in PROPOSAL_STATUSES:
        raise ProposalError(f"status must be one of {', '.join(PROPOSAL_STATUSES)}, not {status!r}")
    if isinstance(slide, str):
        row = session.scalar(select(Slide).where(Slide.name == slide))
        if row is None:
            return []
        slide = row
    stmt = select(GlomerulusProposal).where(GlomerulusProposal.slide_id == slide.id)
    if dataset is not None:
        ds = dataset if isinstance(dataset, Dataset) else store.get_dataset(session, dataset)
        stmt = stmt.where(GlomerulusProposal.dataset_id == ds.id)
    if status is not None:
        stmt = stmt.where(GlomerulusProposal.status == status)
    return list(session.scalars(stmt.order_by(GlomerulusProposal.score.desc(), GlomerulusProposal.id)))


def _get(session: Session, proposal_id: int) -> GlomerulusProposal:
    row = session.get(GlomerulusProposal, proposal_id)
    if row is None:
        raise ProposalError(f"no glomerulus proposal with id {proposal_id}")
    return row


def accept_proposal(session: Session, proposal_id: int, *, reviewed_by: str, label: str | None = None) -> SlideBox:
    """Accept a proposal: a box drawn by ``reviewed_by`` over it (class key ``label`` or none).

    Accepting twice returns the same box. Crop it with :func:`core.detection.review.accept_and_crop`
    (or any path that crops drawn boxes)."""
    p = _get(session, proposal_id)
    if not reviewed_by.strip():
        raise ProposalError("accepting a proposal needs the name of who reviewed it")
    if p.status == "accepted" and p.slide_box is not None:
        return p.slide_box
    try:
        outline = outline_ring(p.polygon) if p.polygon else None
    except OutlineError as e:  # stored by an older detector: the box alone is still the glomerulus
        log.warning("proposal %d on slide %s: outline not kept on its box (%s)", p.id, p.slide.name, e)
        outline = None
    box = add_box(session, p.slide, p.box, created_by=reviewed_by, label=label, polygon=outline, source="proposal")
    p.status, p.reviewed_by, p.reviewed_at, p.slide_box_id = "accepted", reviewed_by.strip(), utcnow(), box.id
    session.flush()
    return box


def reject_proposal(session: Session, proposal_id: int, *, reviewed_by: str) -> GlomerulusProposal:
    """Reject a proposal (not a glomerulus); a box drawn from it when it was accepted is removed."""
    p = _get(session, proposal_id)
    if not reviewed_by.strip():
        raise ProposalError("rejecting a proposal needs the name of who reviewed it")
    if p.slide_box is not None and p.slide_box.image_id is None:
        session.delete(p.slide_box)  # not cropped yet: the box was only this acceptance
        p.slide_box_id = None
    p.status, p.reviewed_by, p.reviewed_at = "rejected", reviewed_by.strip(), utcnow()
    session.flush()
    return p
