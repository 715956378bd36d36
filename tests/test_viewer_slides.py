"""The viewer's whole-slide input in the core: a slide and its annotations become crops of the
``viewer-slides`` dataset (with slide and level-0 box), on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image
from sqlalchemy import func, select

from annotation_db import store
from annotation_db.boxes import add_box
from annotation_db.classes import GLOMERULUS_CLASSES
from annotation_db.models import Image as ImageRow
from annotation_db.models import Label, Slide, SlideBox
from core.annotations import Annotation, AnnotationFormatError, write_geojson
from core.extract import CropSettings, ExtractError
from core.slide_crops import SLIDE_CROP_SETTINGS, slide_annotations
from core.viewer_store import SLIDES_DATASET, crop_slide_for_viewer
from core.wsi import SlideError

CMU = "cmu-1-small-region.svs"
CLASSES = [c.key for c in GLOMERULUS_CLASSES]
NAMES = {c.key: c.display_name for c in GLOMERULUS_CLASSES}
SETTINGS = CropSettings(mpp=0.5, pad_px=16)
assert SETTINGS == SLIDE_CROP_SETTINGS  # the apps' crops; the expected boxes below are worked out for it


def _geojson(path: Path, boxes: list[tuple[int, int, int, int, str | None]]) -> Path:
    """A QuPath GeoJSON of (x, y, w, h, class) boxes."""
    return write_geojson([Annotation.rectangle(*b) for b in boxes], path)


def test_a_slide_with_its_annotation_file_becomes_stored_crops(tmp_path: Path, wsi_dir: Path, Session) -> None:  # noqa: N803
    ann = _geojson(tmp_path / "cmu.geojson", [(100, 200, 300, 260, "crescent"), (900, 1200, 280, 240, "Glomerulus"),
                                               (2100, 2800, 300, 260, "新月体形成"), (1200, 1600, 250, 250, "Normal")])
    slide = wsi_dir / CMU
    for run in range(2):  # the second run reuses the crops and adds no rows
        with Session() as s, s.begin():
            anns, origin = slide_annotations(s, slide, ann)
            cut = crop_slide_for_viewer(s, slide, anns, CLASSES, NAMES, tmp_path / "data", settings=SETTINGS)
        assert origin == "cmu.geojson" and cut.n_annotations == 4
        assert (cut.report.written, cut.report.skipped_existing) == ((4, 0) if run == 0 else (0, 4))
        # keys and display names match in any case; "Glomerulus" is not a class
        assert [c.label for c in cut.crops] == ["crescent", None, "crescent", "normal"]
        assert cut.ignored_labels == {"Glomerulus": 1}
        assert [p.source for p in cut.report.clipped] == [f"{ann}#2"]
    with Session() as s:
        ds = store.get_dataset(s, SLIDES_DATASET)
        assert ds.class_keys == CLASSES and Path(ds.root) == (tmp_path / "data" / SLIDES_DATASET).resolve()
        rows = s.scalars(select(ImageRow).order_by(ImageRow.id)).all()
        assert [(r.x0, r.y0, r.box_w, r.box_h) for r in rows] == [(84, 184, 332, 292), (884, 1184, 312, 272),
                                                                  (2084, 2784, 136, 183), (1184, 1584, 282, 282)]
        assert {r.slide.name for r in rows} == {"cmu-1-small-region"}
        assert [r.id for r in rows] == [c.image_id for c in cut.crops]
        # Shown beside the prediction, never stored as a label: the viewer is not an importer.
        assert s.scalar(select(func.count()).select_from(Label)) == 0
        first = rows[0]
        with openslide.OpenSlide(str(slide)) as osr:  # level 0 is ~0.499 µm/px: resampled to 0.5
            ref = osr.read_region((84, 184), 0, (332, 292)).convert("RGB")
        got = np.asarray(Image.open(Path(ds.root) / first.path).convert("RGB"))
        assert abs(got.shape[1] - 332 * 0.499 / 0.5) <= 1 and abs(got.shape[0] - 292 * 0.499 / 0.5) <= 1
        ref = np.asarray(ref.resize((got.shape[1], got.shape[0]), Image.BILINEAR))
        assert np.abs(got.astype(int) - ref.astype(int)).mean() < 4  # the same tissue, not some other region


def test_without_a_file_the_boxes_drawn_in_the_labeling_app_are_used(tmp_path: Path, wsi_dir: Path, Session) -> None:  # noqa: N803
    slide = wsi_dir / CMU
    with Session() as s, s.begin():
        with pytest.raises(AnnotationFormatError, match=r"cmu-1-small-region\.svs has no annotations: upload"):
            slide_annotations(s, slide, None)
        row = store.get_or_create_slide(s, "cmu-1-small-region", path=str(slide))
        add_box(s, row, (300, 300, 200, 180), created_by="dr-a", label="normal")
        add_box(s, row, (1200, 600, 220, 200), created_by="dr-a")
    with Session() as s, s.begin():
        anns, origin = slide_annotations(s, slide, None)
        assert origin == "2 boxes drawn in the labeling app"
        cut = crop_slide_for_viewer(s, slide, anns, CLASSES, NAMES, tmp_path / "data", settings=SETTINGS)
        assert [c.label for c in cut.crops] == ["normal", None]
        assert [c.source for c in cut.crops] == ["slide_box:1", "slide_box:2"]
    with Session() as s:  # the drawn boxes still count as not cropped in the labeling app
        assert s.scalars(select(SlideBox.image_id)).all() == [None, None]


def test_annotations_for_another_slide_or_none_are_named(tmp_path: Path, wsi_dir: Path, SqliteSession) -> None:  # noqa: N803
    csv = tmp_path / "boxes.csv"
    csv.write_text("slide,x,y,w,h,label\nother-slide.svs,10,10,50,50,normal\nthird.svs,5,5,20,20,\n")
    with SqliteSession() as s:
        with pytest.raises(AnnotationFormatError,
                           match=r"boxes\.csv: none of its 2 annotations is for slide cmu-1-small-region\.svs "
                                 r"\(they name other-slide\.svs, third\.svs\)"):
            slide_annotations(s, wsi_dir / CMU, csv)
        empty = _geojson(tmp_path / "empty.geojson", [])
        with pytest.raises(AnnotationFormatError, match=r"empty\.geojson: no annotations in the file"):
            slide_annotations(s, wsi_dir / CMU, empty)


def test_a_bad_slide_or_uncroppable_annotations_store_nothing(tmp_path: Path, wsi_dir: Path, SqliteSession) -> None:  # noqa: N803
    bad = tmp_path / "truncated.svs"
    bad.write_bytes((wsi_dir / CMU).read_bytes()[:500_000])
    anns, _ = slide_annotations(None, bad, _geojson(tmp_path / "a.geojson", [(100, 100, 200, 200, None)]))
    with SqliteSession() as s, s.begin():
        with pytest.raises(SlideError, match=r"truncated\.svs"):
            crop_slide_for_viewer(s, bad, anns, CLASSES, NAMES, tmp_path / "data", settings=SETTINGS)
        assert s.scalar(select(func.count()).select_from(ImageRow)) == 0
        outside, _ = slide_annotations(s, wsi_dir / CMU, _geojson(tmp_path / "b.geojson", [(9000, 9000, 50, 50, None)]))
        with pytest.raises(ExtractError, match=r"none of the 1 annotations of cmu-1-small-region\.svs could be cropped"):
            crop_slide_for_viewer(s, wsi_dir / CMU, outside, CLASSES, NAMES, tmp_path / "data", settings=SETTINGS)
        assert s.scalar(select(func.count()).select_from(Slide)) <= 1
    assert not list((tmp_path / "data").rglob("*.png"))
