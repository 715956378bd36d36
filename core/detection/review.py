"""Accepting a detector's proposal crops it into its dataset exactly like a box drawn by hand.

:func:`annotation_db.proposals.accept_proposal` turns the proposal into a ``SlideBox``;
:func:`core.slide_crops.crop_into_dataset` (the Slide workspace's crop path) cuts and registers it.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import Session

from annotation_db.models import Dataset
from annotation_db.proposals import ProposalError, accept_proposal
from core.slide_crops import SlideCrops, crop_into_dataset

__all__ = ["accept_and_crop"]


def accept_and_crop(session: Session, proposal_id: int, *, reviewed_by: str, label: str | None = None,
                    mpp: float | None = None, out_dir: str | Path | None = None) -> SlideCrops:
    """Accept the proposal (a box drawn by ``reviewed_by``) and crop it into the proposal's dataset."""
    box = accept_proposal(session, proposal_id, reviewed_by=reviewed_by, label=label)
    from annotation_db.models import GlomerulusProposal

    p = session.get(GlomerulusProposal, proposal_id)
    if not p.slide.path:
        raise ProposalError(f"slide {p.slide.name} has no file path in the store: it cannot be cropped")
    dataset = session.get(Dataset, p.dataset_id)
    return crop_into_dataset(session, dataset, p.slide.path, [box], annotator=reviewed_by if label else None,
                             mpp=mpp, out_dir=out_dir, source="app:slides")
