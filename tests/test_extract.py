"""Crop extraction: pixel-exact crops, resumption, clipping/refusals, bad slides, the store."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image
from sqlalchemy import func, select

from annotation_db import store
from annotation_db.boxes import add_box, list_boxes
from annotation_db.classes import UnknownClassError
from annotation_db.label_resolution import labeled_items
from annotation_db.models import Image as ImageRow
from annotation_db.models import LabelEvent, Slide
from core import cli_extract
from core.cli import main as glom
from core.annotations import Annotation, AnnotationFormatError, annotations_from_geojson, write_geojson
from core.extract import CropSettings, ExtractError, SlideTask, extract_crops, plan_slide
from core.slide_crops import StoreRegistrar, crop_into_dataset, export_boxes_geojson, prepare_dataset
from core.wsi import NumpySlideReader, SlideError, SlideReader, open_slide
from tests.test_wsi import synthetic_rgb, write_pyramid_tiff

CMU = "cmu-1-small-region.svs"
TCGA = "tcga-cr-7395-01a-01-ts1.svs"


@pytest.fixture
def tiff(tmp_path: Path) -> Path:
    return write_pyramid_tiff(tmp_path / "synthetic.tif", synthetic_rgb())


def boxes(*xywh: tuple[int, int, int, int], label: str | None = None) -> list[Annotation]:
    return [Annotation.rectangle(*b, label, source=f"test#{i}") for i, b in enumerate(xywh)]


def rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def openslide_rgb(path: Path, location, level: int, size) -> np.ndarray:
    with openslide.OpenSlide(str(path)) as osr:
        return np.asarray(osr.read_region(location, level, size).convert("RGB"))


# --- pixels -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("slide", "settings", "slide_mpp", "level", "scale"),
    [
        ("tiff", CropSettings(), None, 0, 1),
        ("tiff", CropSettings(level=1), None, 1, 2),
        ("tiff", CropSettings(mpp=1.0), None, 1, 2),  # 1.0 µm/px is level 1: no resampling
        (CMU, CropSettings(), None, 0, 1),
        (TCGA, CropSettings(level=1), None, 1, 2.0005055500659967),
        (TCGA, CropSettings(mpp=0.5), 0.25, 1, 2.0005055500659967),  # the user supplies µm/px
    ],
)
def test_crops_match_openslide_read_region_pixel_for_pixel(
    tmp_path: Path, tiff: Path, wsi_dir: Path, slide, settings, slide_mpp, level, scale
) -> None:
    path = tiff if slide == "tiff" else wsi_dir / slide
    anns = boxes((100, 60, 200, 150), (517, 301, 121, 87))
    report = extract_crops([SlideTask(path, anns, slide_mpp)], tmp_path / "out", settings, progress=False)
    assert report.written == 2 and not report.failed
    for job in report.jobs:
        x, y, w, h = job.box
        expected = openslide_rgb(path, (x, y), level, (round(w / scale), round(h / scale)))
        np.testing.assert_array_equal(rgb(job.path), expected)


def test_resampled_crops_match_the_reader(tmp_path: Path, tiff: Path) -> None:
    settings = CropSettings(mpp=0.8, pad_px=5)
    report = extract_crops([SlideTask(tiff, boxes((200, 100, 160, 120)))], tmp_path, settings, progress=False)
    (job,) = report.jobs
    assert job.box == (195, 95, 170, 130)
    with open_slide(tiff) as slide:
        expected = slide.read_box(job.box, mpp=0.8)
    assert expected.shape == (81, 106, 3)  # 130 * 0.5 / 0.8 = 81.25, 170 * 0.625 = 106.25
    np.testing.assert_array_equal(rgb(job.path), expected)
    assert job.path.name == "synthetic_x195_y95_w170_h130_mpp0.8.png"


def test_two_workers_write_identical_crops(tmp_path: Path, tiff: Path, wsi_dir: Path) -> None:
    anns = boxes(*[(40 + 90 * i, 30 + 60 * i, 80, 70) for i in range(6)])
    tasks = [SlideTask(tiff, anns), SlideTask(wsi_dir / CMU, anns)]
    one = extract_crops(tasks, tmp_path / "one", CropSettings(), workers=1, progress=False)
    two = extract_crops(tasks, tmp_path / "two", CropSettings(), workers=2, progress=False, chunk_size=2)
    assert one.written == two.written == 12
    for a, b in zip(sorted(j.path for j in one.jobs), sorted(j.path for j in two.jobs), strict=True):
        assert a.name == b.name and a.read_bytes() == b.read_bytes()


def test_workers_share_the_work_and_open_each_slide_once(
    tmp_path: Path, tiff: Path, wsi_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import core.extract as extract

    log = tmp_path / "calls.log"
    real_open, real_save = extract.open_slide, extract.save_atomic

    def logged_open(path, **kw):  # noqa: ANN001, ANN202 - runs in the forked workers too
        with log.open("a") as f:
            f.write(f"open {os.getpid()} {Path(path).name}\n")
        return real_open(path, **kw)

    def logged_save(img, path, settings):  # noqa: ANN001, ANN202
        with log.open("a") as f:
            f.write(f"save {os.getpid()} {path.name}\n")
        return real_save(img, path, settings)

    monkeypatch.setattr(extract, "open_slide", logged_open)
    monkeypatch.setattr(extract, "save_atomic", logged_save)
    anns = boxes(*[(40 + 90 * i, 30 + 60 * i, 80, 70) for i in range(8)])
    tasks = [SlideTask(tiff, anns), SlideTask(wsi_dir / CMU, anns)]
    report = extract_crops(tasks, tmp_path / "out", CropSettings(), workers=2, chunk_size=2, progress=False)
    assert report.written == 16
    calls = [line.split() for line in log.read_text().splitlines()]
    savers = {pid for kind, pid, _ in calls if kind == "save"}
    assert len(savers) == 2 and os.getpid() not in savers  # both workers cut crops, not the parent
    worker_opens = [(pid, name) for kind, pid, name in calls if kind == "open" and pid in savers]
    assert len(worker_opens) == len(set(worker_opens))  # a worker keeps its slide handle open


def test_jpeg_crops(tmp_path: Path, tiff: Path) -> None:
    settings = CropSettings(image_format="jpeg", jpeg_quality=80)
    (job,) = extract_crops([SlideTask(tiff, boxes((0, 0, 64, 48)))], tmp_path, settings, progress=False).jobs
    assert job.path.suffix == ".jpg" and job.path.name.endswith("_L0-q80.jpg")
    with Image.open(job.path) as im:
        assert im.format == "JPEG" and im.size == (64, 48)


# --- resumption and crashes -------------------------------------------------------------------


def test_rerun_skips_finished_crops(tmp_path: Path, tiff: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    anns = boxes((10, 10, 50, 50), (100, 100, 60, 40), (300, 200, 30, 30))
    first = extract_crops([SlideTask(tiff, anns)], tmp_path, CropSettings(), progress=False)
    assert first.written == 3
    stamps = {j.path: j.path.stat().st_mtime_ns for j in first.jobs}

    reads = []
    original = SlideReader.read_box_image

    def counting(self, box, **kw):  # noqa: ANN001, ANN202
        reads.append(box)
        return original(self, box, **kw)

    monkeypatch.setattr(SlideReader, "read_box_image", counting)
    again = extract_crops([SlideTask(tiff, anns)], tmp_path, CropSettings(), progress=False)
    assert (again.written, again.skipped_existing, reads) == (0, 3, [])
    assert {j.path: j.path.stat().st_mtime_ns for j in again.jobs} == stamps

    first.jobs[1].path.unlink()
    partial = extract_crops([SlideTask(tiff, anns)], tmp_path, CropSettings(), progress=False)
    assert (partial.written, partial.skipped_existing, reads) == (1, 2, [first.jobs[1].box])

    other = extract_crops([SlideTask(tiff, anns)], tmp_path, CropSettings(level=1), progress=False)
    assert other.written == 3  # other settings, other crops


def test_crash_mid_run_leaves_no_partial_files_or_rows(
    tmp_path: Path, tiff: Path, SqliteSession, monkeypatch: pytest.MonkeyPatch  # noqa: N803
) -> None:
    out = tmp_path / "crops"
    anns = boxes((10, 10, 50, 50), (100, 100, 60, 40), (300, 200, 30, 30), label="normal")
    with SqliteSession() as s, s.begin():
        prepare_dataset(s, "glom", out, anns)
    register = StoreRegistrar(SqliteSession, "glom", annotator="tester")
    real_save = Image.Image.save
    calls = []

    def dying_save(self, fp, *a, **kw):  # noqa: ANN001, ANN202
        calls.append(fp)
        if len(calls) == 2:
            Path(fp).write_bytes(b"\x89PNG half")  # a partly written file, then the crash
            raise OSError("No space left on device")
        return real_save(self, fp, *a, **kw)

    monkeypatch.setattr(Image.Image, "save", dying_save)
    with pytest.raises(OSError, match="No space"):
        extract_crops([SlideTask(tiff, anns)], out, CropSettings(), register=register, progress=False)
    monkeypatch.setattr(Image.Image, "save", real_save)

    files = sorted(p.name for p in (out / "synthetic").iterdir())
    assert files == ["synthetic_x10_y10_w50_h50_L0.png"]  # the finished one; no temp, no half file
    rgb(out / "synthetic" / files[0])  # and it decodes
    with SqliteSession() as s:
        assert s.scalar(select(func.count()).select_from(ImageRow)) == 0  # the slide never finished

    (out / "synthetic" / ".synthetic_x1_y1_w1_h1_L0.png.999.tmp").write_bytes(b"junk")  # a killed run's leftover
    report = extract_crops([SlideTask(tiff, anns)], out, CropSettings(), register=register, progress=False)
    assert (report.written, report.skipped_existing, report.registered) == (2, 1, 3)
    assert not list((out / "synthetic").glob(".*"))


# --- boxes: clipping, refusals, tissue --------------------------------------------------------


def test_boxes_are_padded_clipped_or_refused() -> None:
    slide = NumpySlideReader(synthetic_rgb(400, 300), mpp=0.5)
    anns = [
        Annotation.rectangle(100, 100, 50, 40, "a", source="inside"),
        Annotation.rectangle(380, 280, 50, 50, "a", source="edge"),
        Annotation.rectangle(500, 500, 20, 20, source="outside"),
        Annotation.rectangle(10, 10, 0, 30, source="empty"),
        Annotation.rectangle(0, 0, 399, 200, source="huge"),
        Annotation.point(200, 150, "b", source="point"),
        Annotation.rectangle(100, 100, 50, 40, "a", source="again"),
    ]
    settings = CropSettings(pad_px=4, point_size_um=20, max_box_px=300)
    plan = plan_slide(slide, anns, settings, Path("/out"))
    assert [(j.sources, j.box) for j in plan.jobs] == [
        (("inside", "again"), (96, 96, 58, 48)),
        (("edge",), (376, 276, 24, 24)),
        (("point",), (180, 130, 40, 40)),  # 20 µm at 0.5 µm/px
    ]
    assert [(p.source, p.box) for p in plan.clipped] == [("edge", (376, 276, 58, 58))]
    assert {p.source: p.reason.split(" (")[0] for p in plan.refused} == {
        "outside": "box wholly outside the slide",
        "empty": "empty box",
        "huge": "box larger than the limit of 300 level-0 px",
    }
    with pytest.raises(ExtractError, match="point annotations need a crop size"):
        plan_slide(slide, [Annotation.point(5, 5)], CropSettings(), Path("/out"))


def test_tissue_mask_skips_boxes_on_empty_glass() -> None:
    glass = np.full((600, 800, 3), 242, np.uint8)
    glass[100:400, 100:500] = (190, 90, 160)  # stained tissue
    slide = NumpySlideReader(glass, mpp=0.5)
    anns = [Annotation.rectangle(200, 200, 80, 80, source="tissue"), Annotation.rectangle(600, 450, 80, 80, source="glass")]
    plan = plan_slide(slide, anns, CropSettings(tissue_min_fraction=0.05), Path("/out"))
    assert [j.sources for j in plan.jobs] == [("tissue",)]
    assert [p.source for p in plan.no_tissue] == ["glass"]


def test_tissue_mask_on_a_real_slide(wsi_dir: Path) -> None:
    anns = [Annotation.rectangle(100, 300, 300, 300, source="glass"), Annotation.rectangle(1000, 2000, 300, 300, source="tissue")]
    with open_slide(wsi_dir / CMU) as slide:
        plan = plan_slide(slide, anns, CropSettings(tissue_min_fraction=0.05), Path("/out"))
    assert [j.sources for j in plan.jobs] == [("tissue",)]
    assert [p.source for p in plan.no_tissue] == ["glass"]


# --- bad slides -------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_slides_fail_alone_and_register_nothing(
    tmp_path: Path, tiff: Path, wsi_dir: Path, SqliteSession, workers: int  # noqa: N803
) -> None:
    data = (wsi_dir / CMU).read_bytes()
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(data[: len(data) // 2])
    zeroed = tmp_path / "zeroed.svs"
    zeroed.write_bytes(data[:300_000] + bytes(600_000) + data[900_000:])  # tiles gone, directory intact
    out = tmp_path / "crops"
    with SqliteSession() as s, s.begin():
        prepare_dataset(s, "glom", out, [])
    anns = boxes((0, 0, 40, 40), (1000, 1500, 64, 64), (50, 50, 30, 30))
    tasks = [SlideTask(truncated, anns), SlideTask(zeroed, anns), SlideTask(tiff, anns)]
    report = extract_crops(
        tasks, out, CropSettings(), workers=workers, chunk_size=1, progress=False,
        register=StoreRegistrar(SqliteSession, "glom", annotator="tester"),
    )
    assert set(report.failed) == {str(truncated), str(zeroed)}
    assert "truncated.svs" in report.failed[str(truncated)] and "zeroed.svs" in report.failed[str(zeroed)]
    assert not (out / "truncated").exists()
    assert not [p for p in (out / "zeroed").iterdir()]  # no crops of the failing slide stay
    assert report.written == report.registered == 2  # the good slide: (1000, 1500) is outside it
    with SqliteSession() as s:
        assert s.scalars(select(Slide.name)).all() == ["synthetic"]


# --- the store --------------------------------------------------------------------------------


def test_crops_are_registered_with_slide_box_and_label(tmp_path: Path, wsi_dir: Path, Session) -> None:  # noqa: N803
    """On SQLite and (with GLOM_TEST_PG) PostgreSQL."""
    out = tmp_path / "crops"
    anns = boxes((100, 200, 90, 80), label="crescent") + boxes((900, 900, 70, 60))
    with Session() as s, s.begin():
        prepare_dataset(s, "glom", out, anns, classes=["normal", "crescent"])
    register = StoreRegistrar(Session, "glom", annotator="dr-a", stain="PAS")
    for _ in range(2):  # the second run must add nothing
        extract_crops([SlideTask(wsi_dir / CMU, anns)], out, CropSettings(mpp=0.499), register=register, progress=False)
    with Session() as s:
        rows = s.scalars(select(ImageRow).order_by(ImageRow.x0)).all()
        assert [(r.x0, r.y0, r.box_w, r.box_h, r.width, r.height) for r in rows] == [
            (100, 200, 90, 80, 90, 80),
            (900, 900, 70, 60, 70, 60),
        ]
        assert rows[0].slide.name == "cmu-1-small-region" and rows[0].slide.mpp == pytest.approx(0.499)
        assert rows[0].slide.stain.value == "PAS"
        assert rows[0].path == "cmu-1-small-region/cmu-1-small-region_x100_y200_w90_h80_mpp0.499.png"
        items = labeled_items(s, "glom", "annotator:dr-a")
        assert [(i.rel_path, i.classes, i.slide) for i in items] == [(rows[0].path, ["crescent"], "cmu-1-small-region")]
        assert s.scalar(select(func.count()).select_from(LabelEvent)) == 1


def test_unknown_labels_are_refused_before_cropping(tmp_path: Path, SqliteSession) -> None:  # noqa: N803
    with SqliteSession() as s, s.begin():
        prepare_dataset(s, "glom", tmp_path, [], classes=["normal"])
    anns = boxes((0, 0, 10, 10), label="NORMAL") + boxes((20, 20, 10, 10), label="Glomerulus")
    with SqliteSession() as s, pytest.raises(UnknownClassError, match=r"test#0: unknown class 'Glomerulus' for dataset 'glom'"):
        prepare_dataset(s, "glom", tmp_path, anns)
    with SqliteSession() as s, pytest.raises(ExtractError, match="outside the root"):
        prepare_dataset(s, "glom", tmp_path.parent / "elsewhere", [])


def test_drawn_boxes_round_trip_through_geojson_and_crop_into_dataset(
    tmp_path: Path, tiff: Path, Session  # noqa: N803
) -> None:
    root = tmp_path / "dataset"
    with Session() as s, s.begin():
        store.create_dataset(s, "glom", ["normal", "crescent"], root=root)
        slide = store.get_or_create_slide(s, "synthetic", path=str(tiff))
        add_box(s, slide, (120, 80, 96, 72), created_by="dr-a", label="crescent")
        add_box(s, slide, (980, 700, 100, 100), created_by="dr-a")  # partly outside 1024x768
        exported = export_boxes_geojson(s, slide)
    anns = annotations_from_geojson(json.loads(json.dumps(exported)))
    assert [(a.bounds, a.label) for a in anns] == [((120, 80, 216, 152), "crescent"), ((980, 700, 1080, 800), None)]
    write_geojson(anns, tmp_path / "boxes.geojson")  # and QuPath's file reads back the same
    assert [a.bounds for a in annotations_from_geojson(json.loads((tmp_path / "boxes.geojson").read_text()))] == [
        a.bounds for a in anns
    ]

    with Session() as s, s.begin():
        slide = s.scalar(select(Slide))
        report = crop_into_dataset(
            s, "glom", tiff, list_boxes(s, slide, uncropped_only=True), annotator="dr-a", stain="HE",
            settings=CropSettings(),
        ).report
        assert report.written == 2 and [p.source for p in report.clipped] == ["slide_box:2"]
        drawn = list_boxes(s, slide)
        assert all(b.image_id for b in drawn) and not list_boxes(s, slide, uncropped_only=True)
        first = drawn[0].image
        assert (first.x0, first.y0, first.box_w, first.box_h) == (120, 80, 96, 72)
        np.testing.assert_array_equal(rgb(root / first.path), openslide_rgb(tiff, (120, 80), 0, (96, 72)))
        assert drawn[1].image.box_w == 44 and drawn[1].image.box_h == 68  # clipped to the slide
        queue = labeled_items(s, "glom", "annotator:dr-a")
        assert [i.classes for i in queue] == [["crescent"]]


def test_crop_into_dataset_raises_for_an_unreadable_slide(tmp_path: Path, SqliteSession) -> None:  # noqa: N803
    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"II*\x00garbage")
    with SqliteSession() as s, s.begin():
        store.create_dataset(s, "glom", ["normal"], root=tmp_path / "ds")
        with pytest.raises(SlideError, match=r"bad\.svs"):
            crop_into_dataset(s, "glom", bad, [(0, 0, 10, 10)], annotator="dr-a")
        assert s.scalar(select(func.count()).select_from(ImageRow)) == 0


# --- command line -----------------------------------------------------------------------------


def _cli(argv: list[str]) -> int:
    """``glom ARGV`` in this process: the exit status, named errors turned into one ``error:`` line."""
    return glom(argv)


def test_cli_extract(tmp_path: Path, tiff: Path, wsi_dir: Path, capsys: pytest.CaptureFixture) -> None:
    geo = write_geojson(boxes((10, 10, 40, 40), (60, 70, 30, 20), label="normal"), tmp_path / "synthetic.geojson")
    db = f"sqlite:///{tmp_path / 'store.db'}"
    out = tmp_path / "crops"
    argv = [str(tiff), "--annotations", str(geo), "--out", str(out), "--dataset", "glom", "--db", db, "--no-progress"]
    assert _cli(["extract", *argv, "--level", "1", "--pad", "2"]) == 0
    assert "2 crops written" in capsys.readouterr().out
    assert _cli(["extract", *argv, "--level", "1", "--pad", "2"]) == 0
    assert "0 crops written, 2 already there" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "synthetic").iterdir()) == [
        "synthetic_x58_y68_w34_h24_L1.png",
        "synthetic_x8_y8_w44_h44_L1.png",
    ]
    assert _cli(["extract", str(wsi_dir / TCGA), "--annotations", str(geo), "--out", str(out), "--mpp", "0.5", "--no-progress"]) == 1
    assert "no µm/px" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("x,y,w,h\n1,2,x,4\n")
    assert _cli(["extract", str(tiff), "--annotations", str(bad), "--out", str(out), "--no-progress"]) == 2
    assert "bad.csv: line 2, column 'w'" in capsys.readouterr().err


def test_annotation_files_are_paired_with_slides(tmp_path: Path) -> None:
    folder = tmp_path / "ann"
    folder.mkdir()
    write_geojson(boxes((1, 2, 3, 4)), folder / "a.geojson")
    (folder / "b.csv").write_text("x,y,w,h\n5,6,7,8\n")
    tasks = cli_extract.build_tasks([tmp_path / "a.svs", tmp_path / "b.ndpi"], [folder], 0.25)
    assert [(t.name, [a.bounds for a in t.annotations], t.mpp) for t in tasks] == [
        ("a", [(1, 2, 4, 6)], 0.25),
        ("b", [(5, 6, 12, 14)], 0.25),
    ]
    shared = tmp_path / "all.csv"
    shared.write_text("slide,x,y,w,h\nb.ndpi,1,1,2,2\na,3,3,2,2\n")
    tasks = cli_extract.build_tasks([tmp_path / "a.svs", tmp_path / "b.ndpi"], [shared], None)
    assert [[a.bounds for a in t.annotations] for t in tasks] == [[(3, 3, 5, 5)], [(1, 1, 3, 3)]]
    with pytest.raises(AnnotationFormatError, match=r"no annotation file for slide c\.svs"):
        cli_extract.build_tasks([tmp_path / "c.svs"], [folder], None)
    with pytest.raises(ExtractError, match="2 slides but 3 annotation files"):
        cli_extract.build_tasks([tmp_path / "a.svs", tmp_path / "b.ndpi"], [shared, shared, shared], None)
