"""Click latency and fairness with several annotators labeling at once, one process each.

Every annotator is its own process and clicks through the store's real write path: the
transaction ``app/labeling_page.py`` opens when a clinician presses a class key (read the image and
the annotator's current label, then ``store.set_label``: upsert of the current label + one history
row). Annotators label random crops of one dataset, each click changing the label, for
``--seconds`` each, all starting together. The baseline is one annotator alone on the same store,
measured in the same run; 4 and 16 annotators are reported as ratios to it, and fairness as the
fewest commits of one annotator ÷ the most.

    .venv/bin/python bench/bench_concurrent_annotators.py [--annotators 4 16] [--seconds 20]
        [--think-ms 0]                                      # pause between an annotator's clicks
        [--pg postgresql+psycopg://postgres@127.0.0.1:55432/postgres]   # also PostgreSQL (.ci/postgres.sh)

SQLite runs with the store's own settings (WAL, synchronous=NORMAL, BEGIN IMMEDIATE, 30 s busy
timeout); PostgreSQL in a throw-away database created on that server and dropped afterwards.
Writes the samples to ``.bench/concurrent_annotators.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_label_latency import build_store, percentile

N_IMAGES = 2000


# --- one annotator (runs in its own process) ----------------------------------------------------


def click(Session, image_id: int, annotator_id: int, classes: list[str]) -> None:
    """One class-key press, as ``app/labeling_page._save`` writes it: its own transaction."""
    from annotation_db import queues, store
    from annotation_db.models import Annotator, Image

    with Session() as s, s.begin():
        image = s.get(Image, image_id)
        queues.label_of(s, image_id, annotator_id)
        store.set_label(s, image, s.get(Annotator, annotator_id), classes, uncertain=False, note="")


def annotator_main(url: str, name: str, seed: int, think_s: float) -> int:
    """Print ``ready`` after one warm-up click, wait for ``go SECONDS`` on stdin, click until then
    or until ``stop`` arrives, and print one JSON line: click start times (``time.time()``, to
    line up with other processes) and latencies, errors."""
    from sqlalchemy import select
    from sqlalchemy.exc import SQLAlchemyError

    from annotation_db import store
    from annotation_db.db import open_store
    from annotation_db.models import Image

    Session = open_store(url, create=False)
    with Session() as s, s.begin():
        dataset = store.get_dataset(s, "bench")
        image_ids = list(s.scalars(select(Image.id).where(Image.dataset_id == dataset.id)))
        classes = dataset.class_keys
        me = store.get_or_create_annotator(s, name).id
    rng = random.Random(seed)
    click(Session, rng.choice(image_ids), me, [classes[0]])
    print("ready", flush=True)
    seconds = float(sys.stdin.readline().split()[1])
    stop = threading.Event()
    # The driver closes stdin when it collects the results: only an explicit "stop" ends early.
    threading.Thread(target=lambda: sys.stdin.readline().strip() == "stop" and stop.set(), daemon=True).start()
    t0 = time.perf_counter()
    end = t0 + seconds
    starts, latencies, errors = [], [], []
    k = 0
    while not stop.is_set() and time.perf_counter() < end:
        k += 1
        t = time.perf_counter()
        try:
            click(Session, rng.choice(image_ids), me, [classes[k % len(classes)]])
        except SQLAlchemyError as e:  # e.g. "database is locked" past the busy timeout
            errors.append(f"{time.perf_counter() - t0:.1f}s: {str(e).splitlines()[0][:200]}")
            continue
        starts.append(round(time.time() - (time.perf_counter() - t), 4))
        latencies.append(round((time.perf_counter() - t) * 1000, 2))
        if think_s:
            time.sleep(think_s)
    print(json.dumps({"name": name, "starts_s": starts, "latencies_ms": latencies, "errors": errors}), flush=True)
    return 0


# --- the driver ---------------------------------------------------------------------------------


class Annotators:
    """``n`` annotator processes on the store at ``url``, started together."""

    def __init__(self, url: str, n: int, think_ms: float, seed: int = 0) -> None:
        self.procs = [
            subprocess.Popen(
                [sys.executable, __file__, "--worker", url, f"annotator_{seed}_{k:02d}", str(seed * 1000 + k),
                 str(think_ms / 1000)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
            )
            for k in range(n)
        ]
        for p in self.procs:
            line = p.stdout.readline().strip()
            if line != "ready":
                raise SystemExit(f"an annotator did not start: {line} {p.stderr.read()[-2000:]}")

    def go(self, seconds: float) -> None:
        for p in self.procs:
            p.stdin.write(f"go {seconds}\n")
            p.stdin.flush()

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.stdin.write("stop\n")
                p.stdin.flush()

    def results(self, timeout_s: float = 600) -> list[dict]:
        out = []
        for p in self.procs:
            stdout, stderr = p.communicate(timeout=timeout_s)
            if p.returncode != 0:
                raise SystemExit(f"an annotator failed: {stderr[-2000:]}")
            out.append(json.loads(stdout.strip().splitlines()[-1]))
        return out


def summarize(per_writer: list[dict], seconds: float) -> dict:
    """Latency percentiles over every click, commits per annotator, fairness (fewest ÷ most)."""
    lat = [x for w in per_writer for x in w["latencies_ms"]]
    commits = [len(w["latencies_ms"]) for w in per_writer]
    return {
        "annotators": len(per_writer),
        "clicks": len(lat),
        "clicks_per_s": round(len(lat) / seconds, 1),
        "p50_ms": round(statistics.median(lat), 1) if lat else None,
        "p95_ms": round(percentile(lat, 0.95), 1) if lat else None,
        "max_ms": round(max(lat), 1) if lat else None,
        "over_1s": sum(x > 1000 for x in lat),
        "commits": commits,
        "fairness": round(min(commits) / max(commits), 2) if max(commits) else 0.0,
        "errors": [e for w in per_writer for e in w["errors"]],
    }


def run_annotators(url: str, n: int, seconds: float, think_ms: float, seed: int) -> dict:
    team = Annotators(url, n, think_ms, seed)
    team.go(seconds)
    return summarize(team.results(timeout_s=seconds + 600), seconds)


@contextmanager
def bench_store(kind: str, pg_server: str | None, tmp: Path, n_images: int = N_IMAGES):
    """A fresh store with the ``bench`` dataset: an SQLite file under ``tmp``, or a throw-away
    database on the PostgreSQL server (dropped afterwards); yields its URL."""
    if kind == "sqlite":
        url = f"sqlite:///{tmp}/store.db"
        build_store(url, tmp / "crops", n_images)
        yield url
        return
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    from annotation_db.db import open_store

    name = f"glom_bench_{os.getpid()}"
    admin = create_engine(pg_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    url = make_url(pg_server).set(database=name).render_as_string(hide_password=False)
    try:
        build_store(url, tmp / "crops", n_images)
        yield url
    finally:
        open_store(url, create=False).kw["bind"].dispose()
        open_store.cache_clear()
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


def load_note() -> str:
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average unknown"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        url, name, seed, think_s = argv[1:5]
        return annotator_main(url, name, int(seed), float(think_s))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotators", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--think-ms", type=float, default=0.0, help="pause after each click (0: click again at once)")
    parser.add_argument("--pg", help="PostgreSQL server URL (a throw-away database is created on it)")
    parser.add_argument("--no-sqlite", action="store_true")
    parser.add_argument("--out", default=str(REPO / ".bench" / "concurrent_annotators.json"))
    args = parser.parse_args(argv)

    kinds = ([] if args.no_sqlite else ["sqlite"]) + (["postgresql"] if args.pg else [])
    results = []
    for kind in kinds:
        with tempfile.TemporaryDirectory(prefix="glom-bench-") as tmp, bench_store(kind, args.pg, Path(tmp)) as url:
            rows = []
            for seed, n in enumerate([1, *args.annotators]):
                print(f"{kind}: {n} annotator(s) for {args.seconds:.0f} s ({load_note()}) ...", flush=True)
                row = run_annotators(url, n, args.seconds, args.think_ms, seed) | {"backend": kind}
                rows.append(row)
                print(f"  p50 {row['p50_ms']} ms  p95 {row['p95_ms']} ms  max {row['max_ms']} ms  "
                      f"{row['clicks_per_s']} clicks/s  commits {row['commits']}  errors {len(row['errors'])}",
                      flush=True)
            results += rows
    print(f"\nratios to one annotator alone on the same backend, same run (think time {args.think_ms:g} ms):")
    print(f"{'backend':<11}{'n':>4}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}{'p50 x':>8}{'p95 x':>8}{'max x':>8}"
          f"{'clicks/s x':>12}{'fairness':>10}{'>1 s':>6}{'errors':>8}")
    for kind in kinds:
        rows = [r for r in results if r["backend"] == kind]
        base = rows[0]
        for r in rows:
            print(f"{kind:<11}{r['annotators']:>4}{r['p50_ms']:>9}{r['p95_ms']:>9}{r['max_ms']:>9}"
                  f"{r['p50_ms'] / base['p50_ms']:>8.2f}{r['p95_ms'] / base['p95_ms']:>8.2f}"
                  f"{r['max_ms'] / base['max_ms']:>8.2f}{r['clicks_per_s'] / base['clicks_per_s']:>12.2f}"
                  f"{r['fairness']:>10.2f}{r['over_1s']:>6}{len(r['errors']):>8}")
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "think_ms": args.think_ms, "seconds": args.seconds,
                               "results": results}, indent=1))
    print(f"{machine}; {load_note()}; per-run figures in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
