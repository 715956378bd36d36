"""Import/export throughput of the annotation store at 10,000 and 100,000 labels (synthetic).

Figures are ratios to baselines measured in the same run (these machines are noisy):

- import: our JSONL import into a fresh store vs. the *floor* every import must pay: parsing the
  JSONL lines plus reading, hashing and header-decoding each image file (no database at all);
- export: our JSONL export vs. ``json.dumps`` of the same objects written to a file;
- growth: cost per label of importing 10,000 labels into a store that already holds N images,
  divided by the same into an empty store (1.0 = flat; the issue asks it not to grow).

    .venv/bin/python bench/bench_store.py [--sizes 10000 100000] [--db-dir DIR] [--pg URL]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

from PIL import Image as PILImage

from annotation_db import formats, importer, store
from annotation_db.classes import GLOMERULUS_CLASSES
from annotation_db.db import create_store_engine, make_sessionmaker, upgrade

CLASSES = [c.display_name for c in GLOMERULUS_CLASSES]
CACHE = Path(__file__).resolve().parents[1] / ".bench" / "store"


def make_images(n: int) -> Path:
    """``n`` distinct tiny PNGs (cached between runs) and their seed-format JSONL."""
    folder = CACHE / f"imgs_{n}"
    jsonl = folder / "labels.jsonl"
    if jsonl.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        name = f"{i // 1000:03d}/crop_{i:06d}.png"
        (folder / name).parent.mkdir(exist_ok=True)
        buf = io.BytesIO()
        PILImage.new("RGB", (8, 8), (i % 256, (i // 256) % 256, (i // 65536) % 256)).save(buf, "PNG")
        (folder / name).write_bytes(buf.getvalue())
        onehot = [0, 0, 0, 0]
        onehot[i % 4] = 1
        lines.append(json.dumps({"image_name": name, **dict(zip(CLASSES, onehot))}, ensure_ascii=False) + "\n")
    jsonl.write_text("".join(lines), encoding="utf-8")
    return folder


def floor_import(folder: Path) -> float:
    """The database-free work of an import: parse lines, read + hash + header-decode each file."""
    t = time.perf_counter()
    for line in (folder / "labels.jsonl").read_text(encoding="utf-8").splitlines():
        obj = json.loads(line)
        data = (folder / obj["image_name"]).read_bytes()
        hashlib.sha256(data).hexdigest()
        with PILImage.open(io.BytesIO(data)) as im:
            im.size  # noqa: B018 - header decode, as the importer does
    return time.perf_counter() - t


def fresh_store(url: str):
    engine = create_store_engine(url)
    upgrade(engine)
    return engine, make_sessionmaker(engine)


def import_file(Session, folder: Path, dataset: str, records=None) -> float:  # noqa: N803
    t = time.perf_counter()
    class_names, recs = formats.read_jsonl(folder / "labels.jsonl") if records is None else (CLASSES, records)
    with Session() as s, s.begin():
        ds = importer.ensure_dataset(s, dataset, class_names=class_names, root=folder)
        importer.import_records(s, ds, recs, annotator="bench", source="bench")
    return time.perf_counter() - t


def export_file(Session, dataset: str, out: Path) -> float:  # noqa: N803
    t = time.perf_counter()
    with Session() as s, s.begin():
        formats.export_jsonl(s, store.get_dataset(s, dataset), out)
    return time.perf_counter() - t


def floor_export(folder: Path, out: Path) -> float:
    objs = [json.loads(line) for line in (folder / "labels.jsonl").read_text(encoding="utf-8").splitlines()]
    t = time.perf_counter()
    out.write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs), encoding="utf-8")
    return time.perf_counter() - t


def store_url(kind: str, workdir: Path, tag: str) -> str:
    if kind.startswith("postgresql"):
        import sqlalchemy as sa

        admin = sa.create_engine(kind, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.exec_driver_sql(f'DROP DATABASE IF EXISTS "glombench_{tag}" WITH (FORCE)')
            c.exec_driver_sql(f'CREATE DATABASE "glombench_{tag}"')
        admin.dispose()
        return sa.engine.make_url(kind).set(database=f"glombench_{tag}").render_as_string(hide_password=False)
    return f"sqlite:///{workdir / f'{tag}.db'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--pg", help="also run against this PostgreSQL server URL")
    ap.add_argument("--db-dir", type=Path, help="where SQLite files go (default: a temp dir)")
    ap.add_argument("--no-sqlite", action="store_true", help="only the PostgreSQL server given by --pg")
    args = ap.parse_args()
    workdir = args.db_dir or Path(tempfile.mkdtemp(prefix="glombench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    backends = ([] if args.no_sqlite else ["sqlite"]) + ([args.pg] if args.pg else [])
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, python {platform.python_version()}")
    probe = make_images(10_000)
    probe_records = formats.read_jsonl(probe / "labels.jsonl")[1]
    for backend in backends:
        name = "sqlite" if backend == "sqlite" else "postgresql"
        for n in args.sizes:
            folder = make_images(n)
            t_floor = floor_import(folder)
            engine, Session = fresh_store(store_url(backend, workdir, f"s{n}"))
            t_imp = import_file(Session, folder, "bench")
            out = workdir / f"out_{n}.jsonl"
            t_exp = export_file(Session, "bench", out)
            assert out.read_bytes() == (folder / "labels.jsonl").read_bytes(), "export differs from the import"
            t_exp_floor = floor_export(folder, workdir / "floor.jsonl")
            # Growth: 10k more labels into this store (holding n) vs into an empty one; the two
            # alternate twice and the faster of each counts, to keep background noise out.
            engine0, Session0 = fresh_store(store_url(backend, workdir, f"e{n}"))
            t_full, t_empty = [], []
            for rep in range(2):
                t_full.append(import_file(Session, probe, f"probe-full-{rep}", probe_records))
                t_empty.append(import_file(Session0, probe, f"probe-empty-{rep}", probe_records))
                with Session0() as s, s.begin():  # back to empty
                    s.delete(store.get_dataset(s, f"probe-empty-{rep}"))
            t_full, t_empty = min(t_full), min(t_empty)
            engine.dispose()
            engine0.dispose()
            print(
                f"{name:10s} n={n:>7,d}  import {n / t_imp:8,.0f} labels/s = {t_imp / t_floor:4.2f}x floor "
                f"(file read+hash+parse {n / t_floor:8,.0f}/s) | export {n / t_exp:8,.0f} labels/s = "
                f"{t_exp / t_exp_floor:4.2f}x json.dumps | per-label cost with {n:,} stored vs empty: "
                f"{(t_full / 10_000) / (t_empty / 10_000):4.2f}x ({t_full * 1e2:.1f} vs {t_empty * 1e2:.1f} µs/label)"
            )
    if not args.db_dir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
