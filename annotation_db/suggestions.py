"""Model suggestions while labeling, and the blind slice that measures what they do to people.

A dataset's ``suggestions`` setting is ``off``, ``after`` (shown once the clinician has given
their own first label of the image) or ``before`` (shown with the crop). A suggestion is the
class the dataset's model predicts and its probability; the model is the dataset's active one
(``Dataset.active_checkpoint_id``, set on the Models page), else the checkpoint whose predictions
were stored last.

The **blind slice** is a fixed share of the images (``blind_share``, default 10 %) that never
shows a suggestion to anyone. Membership depends only on the image id and the dataset's
``blind_seed`` (a hash), so it is the same on every server, in every session and after a
restart, and changing the share keeps the smaller slice inside the larger one. Comparing labels
on the blind slice with the rest is the measurement of automation bias
(``annotation_db.agreement.suggestion_report``).

Functions take a session; the caller owns the transaction.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from annotation_db.db import StoreError
from annotation_db.models import Dataset, Prediction
from annotation_db.queues import ranking_checkpoint

__all__ = [
    "SUGGESTION_MODES",
    "Suggestion",
    "SuggestionError",
    "active_checkpoint",
    "active_checkpoint_id",
    "blind_fraction",
    "is_blind",
    "prediction_for",
    "set_active_checkpoint",
    "set_suggestions",
    "suggestion_checkpoint",
    "suggestion_to_show",
]

SUGGESTION_MODES = ("off", "after", "before")
SUGGESTION_TITLES = {"off": "Off", "after": "After my own first label", "before": "Before I label"}


class SuggestionError(StoreError):
    """A suggestion setting is out of range; the message names it."""


@dataclass(frozen=True)
class Suggestion:
    key: str  # class key
    probability: float
    checkpoint_id: str


def blind_fraction(image_id: int, seed: int) -> float:
    """A number in [0, 1) fixed by (seed, image id): the image is blind when it is below the share."""
    digest = hashlib.sha256(f"glomlab-blind:{int(seed)}:{int(image_id)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_blind(image_id: int, seed: int = 0, share: float = 0.1) -> bool:
    """Whether the image belongs to the blind slice (never shows a suggestion)."""
    return blind_fraction(image_id, seed) < share


def set_suggestions(session: Session, dataset: Dataset, mode: str, *, blind_share: float | None = None,
                    blind_seed: int | None = None) -> Dataset:
    """Set when suggestions show (``off`` / ``after`` / ``before``) and the blind slice."""
    if mode not in SUGGESTION_MODES:
        raise SuggestionError(f"suggestions: {mode!r} is not one of {', '.join(SUGGESTION_MODES)}")
    if blind_share is not None:
        if not 0.0 <= float(blind_share) <= 1.0:
            raise SuggestionError(f"blind share: {blind_share} is outside 0…1")
        dataset.blind_share = float(blind_share)
    if blind_seed is not None:
        dataset.blind_seed = int(blind_seed)
    dataset.suggestions = mode
    session.flush()
    return dataset


def active_checkpoint(session: Session, dataset: Dataset) -> str | None:
    """The checkpoint file the dataset's active model lives in (what the viewer opens first), or None."""
    return dataset.active_checkpoint or None


def active_checkpoint_id(session: Session, dataset: Dataset) -> str | None:
    return dataset.active_checkpoint_id or None


def set_active_checkpoint(session: Session, dataset: Dataset, path: str | None, checkpoint_id: str | None) -> None:
    """Make the checkpoint at ``path`` (its predictions carry ``checkpoint_id``) the dataset's model;
    None for both clears it."""
    dataset.active_checkpoint, dataset.active_checkpoint_id = path, checkpoint_id
    session.flush()


def suggestion_checkpoint(session: Session, dataset: Dataset) -> str | None:
    """The checkpoint id suggestions come from: the active model, else the latest predictions."""
    return ranking_checkpoint(session, dataset.id)


def prediction_for(session: Session, image_id: int, checkpoint_id: str) -> Suggestion | None:
    """The latest prediction of ``checkpoint_id`` for the image, as a suggestion (top class)."""
    row = session.execute(
        select(Prediction.predicted, Prediction.probs)
        .where(Prediction.image_id == image_id, Prediction.checkpoint_id == checkpoint_id)
        .order_by(Prediction.id.desc())
        .limit(1)
    ).first()
    if row is None:
        return None
    predicted, probs = row
    return Suggestion(predicted, float(probs.get(predicted, 0.0)), checkpoint_id)


def suggestion_to_show(session: Session, dataset: Dataset, image_id: int, *, labeled_by_me: bool) -> Suggestion | None:
    """What the labeling page shows for ``image_id`` now: None when suggestions are off, the image
    is in the blind slice, the mode is ``after`` and the clinician has not labeled it yet, or no
    model has predicted it."""
    mode = dataset.suggestions or "off"
    if mode == "off" or (mode == "after" and not labeled_by_me):
        return None
    if is_blind(image_id, dataset.blind_seed, dataset.blind_share):
        return None
    ckpt = suggestion_checkpoint(session, dataset)
    return prediction_for(session, image_id, ckpt) if ckpt else None
