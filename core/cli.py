"""The ``glom`` command: thin argument parsing over the library.

Store verbs live here; training, extraction and the rest register their sub-commands from their
own modules (``register(subparsers, parents)``), listed in ``COMMAND_MODULES``.

Sub-commands raise the library's named errors; ``main`` turns any ``GlomError`` into one
``error: ...`` line on stderr and exit status 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

from annotation_db.db import StoreError
from core.errors import GlomError

log = logging.getLogger("glom")

# Modules that add their own sub-commands: each has register(subparsers, parents).
COMMAND_MODULES = ("core.cli_train", "core.cli_extract", "core.cli_users", "core.cli_jobs", "core.cli_detect")


def _session(args: argparse.Namespace):
    from annotation_db.db import open_store

    return open_store(args.db)()


def cmd_db(args: argparse.Namespace) -> int:
    from annotation_db import db

    engine = db.create_store_engine(args.db)
    url = engine.url.render_as_string(hide_password=True)
    if args.action in ("init", "upgrade"):
        before = db.current_revision(engine) if db.has_tables(engine) else None
        db.upgrade(engine)
        print(f"{url}: schema at {db.current_revision(engine)} (was {before or 'empty'})")
    else:
        print(f"{url}: schema at {db.current_revision(engine) or 'empty'}, code expects {db.head_revision()}")
    return 0


def _default_root(fmt: str, path: Path) -> Path:
    return path if fmt == "folders" else path.parent


def cmd_import(args: argparse.Namespace) -> int:
    from annotation_db import importer

    path = Path(args.path)
    class_names, records = importer.read_records(
        args.format, path, labels_from_subfolders=args.labels_from_subfolders, exclude=args.exclude
    )
    if args.classes:
        class_names = [c.strip() for c in args.classes.split(",") if c.strip()]
    root = Path(args.root) if args.root else _default_root(args.format, path)
    # Files are read and hashed before the write transaction: clicks in the app do not wait on them.
    from sqlalchemy import select

    from annotation_db.models import Dataset

    with _session(args) as session:
        known_root = session.scalar(select(Dataset.root).where(Dataset.name == args.dataset))
    metas = importer.read_image_metas(known_root if known_root is not None else root, records, progress=True)
    from annotation_db.db import open_store

    # Rows are staged in short transactions and published in one: clicks wait for neither.
    report = importer.import_staged(
        open_store(args.db),
        args.dataset,
        records,
        class_names=class_names,
        root=root,
        multi_label=args.multi_label,
        annotator=args.annotator,
        source=f"import:{args.format}",
        skip_missing=args.skip_missing,
        skip_duplicates=args.skip_duplicates,
        stain=args.stain,
        progress=True,
        keep_last=args.keep_last,
        metas=metas,
    )
    print(report.summary())
    for line in report.missing:
        print(f"missing: {line}", file=sys.stderr)
    for new, twin in report.duplicates:
        print(f"duplicate: {new} has the same bytes as {twin}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from annotation_db import formats, store

    exporter = formats.EXPORTERS[args.format]
    kwargs = {"source": args.source}
    if args.format == "jsonl":
        kwargs["labeled_only"] = args.labeled_only
    if args.format == "folders":
        kwargs["link"] = args.link
    with _session(args) as session, session.begin():
        dataset = store.get_dataset(session, args.dataset)
        report = exporter(session, dataset, args.out, **kwargs)
    print(f"{report.path}: {report.images} images, {report.labeled} labeled ({args.source})")
    if report.undecided:
        print(f"{report.undecided} images have tied votes and no adjudication: left unlabeled", file=sys.stderr)
    return 0


def cmd_agreement(args: argparse.Namespace) -> int:
    from annotation_db import agreement, store

    names = [a.strip() for a in args.annotators.split(",")] if args.annotators else None
    with _session(args) as session, session.begin():
        dataset = store.get_dataset(session, args.dataset)
        report = agreement.agreement_report(session, dataset, names)
        bias = agreement.suggestion_report(session, dataset)
    if args.json:
        print(json.dumps({**report.to_dict(), "suggestions": bias.to_dict()}, ensure_ascii=False, indent=2))
        return 0
    fmt = lambda x: "n/a" if x != x else f"{x:.3f}"  # noqa: E731 - NaN check
    print(f"{report.dataset}: {report.method} kappa over {report.items} images, annotators {', '.join(report.annotators)}")
    print(f"overall kappa: {fmt(report.kappa)}")
    for k, v in report.per_class_kappa.items():
        print(f"  {k:30s} {fmt(v)}")
    width = max(len(k) for k in report.classes)
    print("confusion (rows: first annotator of each pair, columns: second):")
    print(" " * (width + 2) + " ".join(f"{k[:8]:>8s}" for k in report.classes))
    for k, row in zip(report.classes, report.confusion):
        print(f"  {k:{width}s}" + " ".join(f"{n:8d}" for n in row))
    print(f"{len(report.disagreements)} disagreements, worst first:")
    for d in report.disagreements[: args.top]:
        votes = "; ".join(f"{a}={'+'.join(c)}" for a, c in d.votes.items())
        print(f"  {d.agreement:.2f}  {d.path}  {votes}")
    print("\n".join(agreement.suggestion_report_lines(bias)))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from annotation_db import store
    from annotation_db.label_resolution import dataset_stats

    with _session(args) as session, session.begin():
        datasets = [store.get_dataset(session, args.dataset)] if args.dataset else store.list_datasets(session)
        stats = [dataset_stats(session, d) for d in datasets]
    if args.json:
        print(json.dumps(stats, ensure_ascii=False, indent=2))
        return 0
    for s in stats:
        print(f"{s['dataset']}: {s['images']} images on {s['slides']} slides, {s['adjudicated']} adjudicated")
        for name, n in s["labels_per_annotator"].items():
            print(f"  labels by {name}: {n}")
        print("  final labels per class: " + ", ".join(f"{k}={n}" for k, n in s["final_per_class"].items()))
    if not stats:
        print("the store holds no datasets yet: try `glom demo`")
    return 0


def cmd_patients(args: argparse.Namespace) -> int:
    """Record which patient each slide comes from (for patient-grouped splits)."""
    from annotation_db import store
    from annotation_db.formats import read_patient_csv

    rows = read_patient_csv(args.file)
    with _session(args) as session, session.begin():  # all or nothing
        for slide, patient, where in rows:
            try:
                store.set_slide_patient(session, slide, patient or None)
            except StoreError as e:
                raise StoreError(f"{where}: field 'slide': {e}") from None
    n_patients = len({p for _, p, _ in rows if p})
    print(f"{len(rows)} slides assigned to {n_patients} patients")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from annotation_db.db import open_store
    from core.demo import seed_demo_dataset

    out = Path(args.out).resolve()
    report = seed_demo_dataset(open_store(args.db), out, dataset=args.dataset, n_per_class=args.n_per_class,
                               size_px=args.size, seed=args.seed, labeled=not args.unlabeled, if_empty=args.if_empty)
    if report is None:
        print("the store already holds datasets; no demo images added")
    else:
        print(f"{report.records} synthetic images in {out}; {report.summary()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", default=argparse.SUPPRESS, help="store URL (default $GLOM_DB or sqlite:///data/glomlab.db)")
    parser = argparse.ArgumentParser(prog="glom", description="GlomLab: glomerulus crops, labels, classifiers.")
    parser.add_argument("--db", default=None, help="store URL (default $GLOM_DB or sqlite:///data/glomlab.db)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("db", parents=[common], help="create or migrate the store's schema")
    p.add_argument("action", choices=["init", "upgrade", "current"])
    p.set_defaults(func=cmd_db)

    from annotation_db.formats import FORMATS

    p = sub.add_parser("import", parents=[common], help="import images and labels from a file or folder")
    p.add_argument("format", choices=FORMATS)
    p.add_argument("path", help="label file, or the folder for 'folders'")
    p.add_argument("--dataset", required=True)
    p.add_argument("--root", help="folder the image paths are relative to (default: the file's folder)")
    p.add_argument("--annotator", default="imported", help="who the labels are attributed to when the file names no one")
    p.add_argument("--classes", help="comma-separated class names for a new dataset (default: from the file)")
    p.add_argument("--multi-label", action="store_true", help="a new dataset allows several classes per image")
    p.add_argument(
        "--labels-from-subfolders", action="store_true", help="folders: the first sub-folder of each image names its class"
    )
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="folders: leave out matching paths or folders (repeatable)")
    p.add_argument("--skip-missing", action="store_true", help="skip (and list) records whose image file is missing")
    p.add_argument("--skip-duplicates", action="store_true", help="skip images whose bytes are already registered")
    p.add_argument("--keep-last", action="store_true",
                   help="when lines label one image differently for one annotator, keep the last (default: refuse)")
    p.add_argument("--stain", choices=["HE", "PAS", "other"], help="stain of the slides the file names")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("export", parents=[common], help="export a dataset's labels")
    p.add_argument("format", choices=FORMATS)
    p.add_argument("out", help="output file, or folder for 'folders'")
    p.add_argument("--dataset", required=True)
    p.add_argument("--source", default="majority", help="majority | adjudicated | final | annotator:NAME")
    p.add_argument("--labeled-only", action="store_true", help="jsonl: leave out images without a label")
    p.add_argument("--link", action="store_true", help="folders: hard-link instead of copying where possible")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("agreement", parents=[common], help="inter-annotator agreement and disagreements")
    p.add_argument("--dataset", required=True)
    p.add_argument("--annotators", help="comma-separated names (default: all)")
    p.add_argument("--top", type=int, default=20, help="disagreements to list")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_agreement)

    p = sub.add_parser("stats", parents=[common], help="what the store holds")
    p.add_argument("--dataset")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("patients", parents=[common],
                       help="record the patient of each slide from a CSV (slide,patient), for grouped splits")
    p.add_argument("file", help="CSV with slide and patient columns; an empty patient clears it")
    p.set_defaults(func=cmd_patients)

    p = sub.add_parser("demo", parents=[common], help="generate synthetic glomerulus-like images into the store")
    p.add_argument("--out", default="data/demo")
    p.add_argument("--dataset", default="demo")
    p.add_argument("--n-per-class", type=int, default=12)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--unlabeled", action="store_true", help="register the images without labels")
    p.add_argument("--if-empty", action="store_true", help="do nothing when the store already holds a dataset")
    p.set_defaults(func=cmd_demo)

    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.register(sub, [common])
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        return args.func(args)
    except GlomError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
