"""``glom extract``: glomerulus crops from whole-slide images and their annotations.

Wiring: ``core.cli`` lists this module in ``COMMAND_MODULES`` and calls
``register(subparsers, parents)``; ``args.func(args)`` returns the exit code (0 ok, 1 some
slides failed); bad input raises a named error, which ``glom`` prints as one line, status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from annotation_db.classes import ClassKeys
from core.annotations import (
    AnnotationFormatError,
    annotations_for_slide,
    read_annotations,
)
from core.extract import CropSettings, ExtractError, SlideTask, extract_crops
from core.slide_crops import (
    StoreRegistrar,
    check_outlines,
    prepare_dataset,
    with_class_keys,
)

log = logging.getLogger(__name__)

ANNOTATION_SUFFIXES = (".geojson", ".json", ".xml", ".csv", ".tsv")


def register(subparsers: argparse._SubParsersAction, parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "extract",
        parents=list(parents),
        help="cut one crop per annotated glomerulus out of whole-slide images",
        description=(
            "Cut one crop per annotation (QuPath GeoJSON, ImageScope XML, ASAP XML, CSV) out of slides "
            "OpenSlide reads, write PNG/JPEG files and register them in the store (--dataset), each "
            "outline also as a box of its slide (source import:<file>; the Slide workspace shows it, the "
            "detector trains on it). Re-running skips crops already written with the same slide, box and "
            "settings, and stores no box twice."
        ),
    )
    p.add_argument("slides", nargs="+", metavar="SLIDE", help="slide files (svs, ndpi, mrxs, scn, tiled TIFF, ...)")
    p.add_argument(
        "--annotations",
        nargs="+",
        required=True,
        metavar="FILE",
        help="one file per slide (same order), one file for all (CSV with a 'slide' column), "
        "or a folder holding <slide name>.geojson/.xml/.csv",
    )
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="crops go to DIR/<slide>/")
    res = p.add_mutually_exclusive_group()
    res.add_argument("--mpp", type=float, help="target resolution in µm per output pixel (e.g. 0.5)")
    res.add_argument("--level", type=int, help="pyramid level to read at (default 0)")
    p.add_argument("--slide-mpp", type=float, help="µm per level-0 pixel for slides that do not record it (others keep their own)")
    p.add_argument("--pad", type=int, default=0, metavar="PX", help="level-0 px of margin around each box")
    p.add_argument("--pad-frac", type=float, default=0.0, metavar="F", help="margin as a fraction of the box size")
    p.add_argument("--point-size", type=int, metavar="PX", help="side (level-0 px) of the square cut around points")
    p.add_argument("--point-size-um", type=float, metavar="UM", help="side in µm of the square cut around points")
    p.add_argument("--format", choices=("png", "jpeg"), default="png")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--max-box", type=int, default=4096, metavar="PX", help="refuse boxes with a longer level-0 side")
    p.add_argument(
        "--tissue-mask",
        type=float,
        nargs="?",
        const=0.05,
        metavar="MIN_FRACTION",
        help="skip boxes with less tissue than this fraction (thumbnail Otsu mask; default 0.05)",
    )
    p.add_argument("--workers", type=int, default=1, help="worker processes (one slide handle each)")
    p.add_argument("--dataset", help="register the crops in this dataset (created with root --out if missing)")
    p.add_argument("--classes", help="comma-separated class keys when the dataset is created (default: the labels)")
    if "--db" not in p._option_string_actions:  # the shared parent parser usually brings it
        p.add_argument("--db", help="store URL (default $GLOM_DB or sqlite:///data/glomlab.db)")
    p.add_argument("--stain", choices=("HE", "PAS", "other"), help="stain of the slides, stored with them")
    p.add_argument("--annotator", default="wsi-import", help="who the annotation classes and outlines are recorded as")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_extract)
    return p


def _find_in_folder(folder: Path, slide: Path) -> Path:
    for suffix in ANNOTATION_SUFFIXES:
        candidate = folder / f"{slide.stem}{suffix}"
        if candidate.is_file():
            return candidate
    raise AnnotationFormatError(
        f"{folder}: no annotation file for slide {slide.name} (looked for {slide.stem}{{{','.join(ANNOTATION_SUFFIXES)}}})"
    )


def pair_annotations(slides: list[Path], annotations: list[Path]) -> list[tuple[Path, Path]]:
    """Which annotation file belongs to which slide (see ``--annotations``)."""
    if len(annotations) == 1 and annotations[0].is_dir():
        return [(s, _find_in_folder(annotations[0], s)) for s in slides]
    if len(annotations) == len(slides):
        return list(zip(slides, annotations, strict=True))
    if len(annotations) == 1:
        return [(s, annotations[0]) for s in slides]
    raise ExtractError(
        f"{len(slides)} slides but {len(annotations)} annotation files: give one per slide (same order), "
        "one for all, or a folder"
    )


def build_tasks(slides: list[Path], annotations: list[Path], slide_mpp: float | None) -> list[SlideTask]:
    cache: dict[Path, list] = {}
    tasks = []
    shared = len(annotations) == 1 and not annotations[0].is_dir() and len(slides) > 1
    for slide, ann_path in pair_annotations(slides, annotations):
        if ann_path not in cache:
            cache[ann_path] = read_annotations(ann_path)
        anns = cache[ann_path]
        if shared:
            anns = annotations_for_slide(anns, slide)
            if any(a.slide is None for a in anns):
                raise ExtractError(
                    f"{ann_path}: one annotation file for {len(slides)} slides needs a 'slide' column (CSV)"
                )
        else:
            anns = annotations_for_slide(anns, slide)
        tasks.append(SlideTask(slide, anns, slide_mpp))
    return tasks


def run_extract(args: argparse.Namespace) -> int:
    """Cut the crops; 0 ok, 1 some slides failed. Bad input raises a named error (``glom`` prints it, status 2)."""
    settings = CropSettings(
        level=args.level,
        mpp=args.mpp,
        pad_px=args.pad,
        pad_frac=args.pad_frac,
        point_size_px=args.point_size,
        point_size_um=args.point_size_um,
        image_format=args.format,
        jpeg_quality=args.quality,
        max_box_px=args.max_box,
        tissue_min_fraction=args.tissue_mask,
    )
    tasks = build_tasks([Path(s) for s in args.slides], [Path(a) for a in args.annotations], args.slide_mpp)
    register = None
    if args.dataset:
        from annotation_db.db import open_store

        check_outlines(a for t in tasks for a in t.annotations)  # a bad polygon stops the run before any crop
        Session = open_store(getattr(args, "db", None))  # noqa: N806
        classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
        args.out.mkdir(parents=True, exist_ok=True)
        with Session() as s, s.begin():
            dataset = prepare_dataset(s, args.dataset, args.out, [a for t in tasks for a in t.annotations],
                                      classes=classes)
            class_keys = ClassKeys.of(dataset)
        # Classes named by key or display name, in any case, are stored as keys.
        tasks = [replace(t, annotations=with_class_keys(t.annotations, class_keys)[0]) for t in tasks]
        # Each outline (polygon, rectangle, ellipse) becomes a box of its slide, with its crop.
        outlines = {a.source: a for t in tasks for a in t.annotations if a.kind != "point"}
        register = StoreRegistrar(Session, args.dataset, annotator=args.annotator, stain=args.stain,
                                  outlines=outlines)
    else:
        log.warning("no --dataset: crops are written but not registered in the store")
    report = extract_crops(
        tasks, args.out, settings, workers=args.workers, register=register, progress=not args.no_progress
    )
    # Refused and clipped boxes were logged as warnings while planning.
    for slide, message in report.failed.items():
        print(f"FAILED {slide}: {message}", file=sys.stderr)
    print(report.summary())
    return 1 if report.failed else 0
