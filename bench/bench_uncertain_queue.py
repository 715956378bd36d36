"""The model-uncertain queue: next crop by keyset on (margin, image id) vs ranking every prediction.

    .venv/bin/python bench/bench_uncertain_queue.py [--images 100000] [--pg URL]

A dataset of N images (rows only; no pixels are read) with one prediction each from one
checkpoint, a tenth of them labeled by the clinician. Timed, median of repeats:

- ``keyset``: ``queues.next_image_ids`` for the uncertain queue, one crop at a time (what a key
  press asks), at the start and 100 pages in;
- baseline, measured in the same run: what the queue did before migration 0004 — read every
  prediction of the checkpoint (``image_id, probs``), compute the margins in Python and sort,
  once per browser session, then page in memory.

Prints milliseconds and the ratio baseline / keyset per backend (SQLite file; PostgreSQL with
``--pg`` or ``$GLOM_TEST_PG``).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import insert, select  # noqa: E402

from annotation_db import db, queues, store  # noqa: E402
from annotation_db.models import Image, Label, Prediction  # noqa: E402


def seed(Session, n: int) -> tuple[int, int]:  # noqa: N803
    rng = random.Random(0)
    with Session() as s, s.begin():
        ds = store.create_dataset(s, "bench", ["a", "b", "c", "d"], root="/nonexistent")
        me = store.get_or_create_annotator(s, "dr-bench")
        ds_id, me_id = ds.id, me.id
    batch = 10_000
    for start in range(0, n, batch):
        with Session() as s, s.begin():
            s.execute(insert(Image), [dict(dataset_id=ds_id, path=f"{i:07d}.png", sha256=f"{i:064d}", width=96,
                                           height=96) for i in range(start, min(n, start + batch))])
    with Session() as s, s.begin():
        ids = s.scalars(select(Image.id).where(Image.dataset_id == ds_id).order_by(Image.id)).all()
    for start in range(0, n, batch):
        rows = []
        for i in ids[start:start + batch]:
            p = [rng.random() for _ in range(4)]
            t = sum(p)
            probs = {k: v / t for k, v in zip("abcd", p)}
            rows.append(dict(image_id=i, checkpoint_id="ckpt@1", probs=probs, predicted=max(probs, key=probs.get),
                             margin=store.prediction_margin(probs)))
        with Session() as s, s.begin():
            s.execute(insert(Prediction), rows)
    with Session() as s, s.begin():
        s.execute(insert(Label), [dict(image_id=i, annotator_id=me_id, classes=["a"], uncertain=False, note="")
                                  for i in ids[::10]])
    return ds_id, me_id


def old_ranking(s, ds_id: int) -> list[int]:  # noqa: ANN001 - the pre-0004 queue, kept here as the baseline
    rows = s.execute(select(Prediction.image_id, Prediction.probs).join(Image, Image.id == Prediction.image_id)
                     .where(Image.dataset_id == ds_id, Prediction.checkpoint_id == "ckpt@1").order_by(Prediction.id))
    margin = {}
    for image_id, probs in rows:
        top = sorted((float(p) for p in probs.values()), reverse=True) + [0.0, 0.0]
        margin[image_id] = top[0] - top[1]
    return sorted(margin, key=lambda i: (margin[i], i))


def run(url: str, n: int, repeats: int) -> None:
    engine = db.create_store_engine(url)
    db.upgrade(engine)
    Session = db.make_sessionmaker(engine)  # noqa: N806
    t = time.perf_counter()
    ds_id, me_id = seed(Session, n)
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
    print(f"  seeded {n} images + predictions in {time.perf_counter() - t:.1f} s")
    spec = queues.QueueSpec("uncertain", ds_id, me_id)
    with Session() as s:
        cursor = 0
        for _ in range(100):
            cursor = queues.next_image_ids(s, spec, cursor, limit=1)[0][0]
        deep = cursor
    first, later, base = [], [], []
    for _ in range(repeats):
        with Session() as s:
            t = time.perf_counter()
            queues.next_image_ids(s, spec, 0, limit=1)
            first.append(time.perf_counter() - t)
            t = time.perf_counter()
            queues.next_image_ids(s, spec, deep, limit=1)
            later.append(time.perf_counter() - t)
            t = time.perf_counter()
            old_ranking(s, ds_id)
            base.append(time.perf_counter() - t)
    f, m, b = (1000 * statistics.median(v) for v in (first, later, base))
    print(f"  keyset next crop: {f:.2f} ms at the start, {m:.2f} ms 100 crops in")
    print(f"  baseline (rank all {n} predictions once per session): {b:.0f} ms  -> {b / max(f, m):.0f}x the keyset query")
    engine.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--pg", default=os.environ.get("GLOM_TEST_PG"), help="a throw-away PostgreSQL database URL")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"SQLite ({args.images} images)")
        run(f"sqlite:///{tmp}/bench.db", args.images, args.repeats)
    if args.pg:
        print(f"PostgreSQL ({args.images} images)")
        engine = db.create_store_engine(args.pg)
        from annotation_db.models import Base

        Base.metadata.drop_all(engine)
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
        engine.dispose()
        run(args.pg, args.images, args.repeats)


if __name__ == "__main__":
    main()
