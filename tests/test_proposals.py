"""Detector proposals in the store (SQLite and PostgreSQL): replaced on re-detection, reviewed
ones and drawn boxes untouched, accepting one crops it like a drawn box (a real slide)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image as PILImage
from sqlalchemy import select

from annotation_db import store
from annotation_db.boxes import add_box, list_boxes
from annotation_db.models import GlomerulusProposal, Image, SlideBox
from annotation_db.proposals import (
    ProposalError,
    accept_proposal,
    list_proposals,
    reject_proposal,
    replace_proposals,
)


@dataclass
class F:
    """A finding as the detector gives it."""

    box: tuple[int, int, int, int]
    score: float = 0.9
    area_um2: float = 20000.0

    @property
    def polygon(self) -> list[tuple[float, float]]:
        x, y, w, h = self.box
        return [(x, y), (x + w, y), (x + w, y + h), (x, y + h), (x, y)]


@pytest.fixture
def dataset(Session, tmp_path: Path) -> str:
    with Session() as s, s.begin():
        store.get_or_create_dataset(s, "biopsies", ["globally_sclerotic", "non_globally_sclerotic"],
                                    root=tmp_path / "biopsies")
    return "biopsies"


def _statuses(Session, slide: str = "s1") -> list[tuple[str, tuple[int, int, int, int]]]:
    with Session() as s:
        return sorted((p.status, p.box) for p in list_proposals(s, slide))


def test_detecting_again_replaces_only_what_is_still_proposed(Session, dataset: str) -> None:
    with Session() as s, s.begin():
        n = replace_proposals(s, dataset, "s1", [F((0, 0, 100, 100)), F((500, 500, 100, 100)), F((900, 0, 80, 80))],
                              source="model:det-a", checkpoint_sha256="aa")
        assert n == 3
    with Session() as s, s.begin():
        a, b, _ = sorted(list_proposals(s, "s1", dataset), key=lambda p: p.x0)
        accept_proposal(s, a.id, reviewed_by="dr_a", label="non_globally_sclerotic")
        reject_proposal(s, b.id, reviewed_by="dr_a")
        slide = a.slide
        add_box(s, slide, (2000, 2000, 150, 150), created_by="dr_b")  # drawn by hand
    with Session() as s, s.begin():
        # the new model finds the accepted one again (shifted), the hand-drawn one, and a new one
        n = replace_proposals(s, dataset, "s1", [F((5, 5, 100, 100)), F((2010, 2000, 150, 150)),
                                                 F((3000, 3000, 90, 90), score=0.7)],
                              source="model:det-b", checkpoint_sha256="bb")
        assert n == 1
    assert _statuses(Session) == [("accepted", (0, 0, 100, 100)), ("proposed", (3000, 3000, 90, 90)),
                                  ("rejected", (500, 500, 100, 100))]
    with Session() as s:
        (new,) = list_proposals(s, "s1", dataset, status="proposed")
        assert (new.source, new.checkpoint_sha256, new.score) == ("model:det-b", "bb", pytest.approx(0.7))
        assert new.polygon[0] == [3000.0, 3000.0]
        boxes = list_boxes(s, new.slide)
        assert sorted((b.box, b.created_by, b.label) for b in boxes) == [
            ((0, 0, 100, 100), "dr_a", "non_globally_sclerotic"), ((2000, 2000, 150, 150), "dr_b", None)]


def test_rejecting_an_accepted_uncropped_proposal_removes_its_box(Session, dataset: str) -> None:
    with Session() as s, s.begin():
        replace_proposals(s, dataset, "s1", [F((0, 0, 100, 100))], source="model:x")
        (p,) = list_proposals(s, "s1")
        box = accept_proposal(s, p.id, reviewed_by="dr_a")
        assert accept_proposal(s, p.id, reviewed_by="dr_a").id == box.id  # twice: the same box
        reject_proposal(s, p.id, reviewed_by="dr_a")
    with Session() as s:
        assert s.scalars(select(SlideBox)).all() == []
        assert list_proposals(s, "s1")[0].status == "rejected"


def test_bad_proposals_are_refused_with_a_reason(Session, dataset: str) -> None:
    with Session() as s, s.begin():
        with pytest.raises(ProposalError, match="model:<checkpoint>"):
            replace_proposals(s, dataset, "s1", [F((0, 0, 10, 10))], source="someone")
        with pytest.raises(ProposalError, match="empty box"):
            replace_proposals(s, dataset, "s1", [F((0, 0, 0, 10))], source="model:x")
        with pytest.raises(ProposalError, match="no glomerulus proposal with id 999"):
            accept_proposal(s, 999, reviewed_by="dr_a")
        with pytest.raises(ProposalError, match="status must be one of"):
            list_proposals(s, "s1", status="maybe")
    with Session() as s, s.begin():
        from annotation_db.store import DatasetNotFoundError

        with pytest.raises(DatasetNotFoundError):
            replace_proposals(s, "nope", "s1", [], source="model:x")


def test_accepting_a_proposal_crops_it_like_a_drawn_box(SqliteSession, tmp_path: Path, wsi_dir: Path) -> None:
    from core.detection.review import accept_and_crop

    slide_path = wsi_dir / "cmu-1-small-region.svs"
    with SqliteSession() as s, s.begin():
        store.get_or_create_dataset(s, "biopsies", ["globally_sclerotic", "non_globally_sclerotic"],
                                    root=tmp_path / "biopsies")
        replace_proposals(s, "biopsies", slide_path.stem, [F((400, 600, 300, 260))], source="model:det",
                          slide_path=str(slide_path))
        (p,) = list_proposals(s, slide_path.stem)
        crops = accept_and_crop(s, p.id, reviewed_by="dr_a", label="globally_sclerotic")
    (crop,) = crops.crops
    assert crop.path.is_file() and crop.label == "globally_sclerotic"
    with SqliteSession() as s:
        img = s.get(Image, crop.image_id)
        assert (img.slide.name, (img.x0, img.y0, img.box_w, img.box_h)) == (slide_path.stem, crop.box)
        p = s.scalars(select(GlomerulusProposal)).one()
        assert p.status == "accepted" and p.slide_box.image_id == crop.image_id and p.reviewed_by == "dr_a"
    with PILImage.open(crop.path) as im:  # 0.5 µm/px crop of a 0.499 µm/px slide: about the box's size
        assert abs(im.width - 300) < 40 and abs(im.height - 260) < 40
