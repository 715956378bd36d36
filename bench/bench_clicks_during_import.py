"""Labeling clicks while a large import runs: click latency during ``glom import`` vs without it.

A few annotators (processes, the store's real write path, as in
``bench/bench_concurrent_annotators.py``) label one dataset, first alone for ``--seconds`` (the
baseline, same run, same store), then while ``glom import jsonl`` brings in ``--labels`` labels over
synthetic 8×8 PNG crops (``bench/bench_store.py``'s, cached under ``.bench/store``) into another
dataset of the same store. Reports p50 / p95 / max of the clicks that started during the import,
as ratios to the baseline, the clicks over 1 s, each annotator's longest wait, and how the import's
time splits between reading + hashing files (no lock held), staging its rows (short transactions of
1,000 rows) and publishing them (one transaction).

    .venv/bin/python bench/bench_clicks_during_import.py [--labels 100000] [--annotators 4]
        [--think-ms 250] [--seconds 20] [--pg postgresql+psycopg://postgres@127.0.0.1:55432/postgres]

Writes the samples to ``.bench/clicks_during_import.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_concurrent_annotators import Annotators, bench_store, load_note
from bench_label_latency import percentile
from bench_store import make_images

# `glom import` reads and hashes every file first ("check images" bar), then stages its rows in
# short transactions ("stage" bar), then publishes them in one transaction.
WRITE_PHASE_MARK = b"check images: 100%"
PUBLISH_MARK = b"stage imported: 100%"


def click_stats(per_writer: list[dict], t_from: float = float("-inf"), t_to: float = float("inf")) -> dict:
    """Percentiles of the clicks that started in [t_from, t_to) (``time.time()`` seconds)."""
    lat = [ms for w in per_writer for t, ms in zip(w["starts_s"], w["latencies_ms"]) if t_from <= t < t_to]
    if not lat:
        return {"clicks": 0}
    return {
        "clicks": len(lat),
        "p50_ms": round(statistics.median(lat), 1),
        "p95_ms": round(percentile(lat, 0.95), 1),
        "max_ms": round(max(lat), 1),
        "over_1s": sum(x > 1000 for x in lat),
        "longest_per_annotator_ms": [
            round(max((ms for t, ms in zip(w["starts_s"], w["latencies_ms"]) if t_from <= t < t_to), default=0), 1)
            for w in per_writer
        ],
        "errors": [e for w in per_writer for e in w["errors"]],
    }


def run_import(url: str, folder: Path) -> dict:
    """``glom import jsonl`` of ``folder/labels.jsonl`` into dataset ``imported``; wall-clock marks."""
    cmd = [str(REPO / ".venv" / "bin" / "glom"), "--db", url, "import", "jsonl", str(folder / "labels.jsonl"),
           "--dataset", "imported", "--root", str(folder)]
    marks = {"start": time.time()}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    tail = bytearray()

    def watch() -> None:
        while chunk := os.read(proc.stderr.fileno(), 65536):
            tail.extend(chunk)
            if "write_phase" not in marks and WRITE_PHASE_MARK in tail:
                marks["write_phase"] = time.time()
            if "publish" not in marks and PUBLISH_MARK in tail:
                marks["publish"] = time.time()
            del tail[:-4096]

    reader = threading.Thread(target=watch, daemon=True)
    reader.start()
    out = proc.stdout.read().decode()
    proc.wait()
    reader.join(10)
    marks["end"] = time.time()
    if proc.returncode != 0:
        raise SystemExit(f"glom import failed ({proc.returncode}): {bytes(tail).decode(errors='replace')[-2000:]}")
    return marks | {"report": out.strip().splitlines()[-1] if out.strip() else ""}


def measure(kind: str, pg: str | None, folder: Path, annotators: int, think_ms: float, seconds: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="glom-bench-") as tmp, bench_store(kind, pg, Path(tmp)) as url:
        print(f"{kind}: baseline, {annotators} annotators for {seconds:.0f} s ({load_note()}) ...", flush=True)
        team = Annotators(url, annotators, think_ms, seed=0)
        team.go(seconds)
        baseline = click_stats(team.results())
        print(f"  {baseline}", flush=True)
        print(f"{kind}: the same annotators during the import ({load_note()}) ...", flush=True)
        team = Annotators(url, annotators, think_ms, seed=1)
        team.go(3600)
        time.sleep(1.0)
        marks = run_import(url, folder)
        time.sleep(1.0)
        team.stop()
        clicks = team.results()
    during = click_stats(clicks, marks["start"], marks["end"])
    publishing = click_stats(clicks, marks.get("publish", marks["end"]), marks["end"])
    row = {
        "backend": kind,
        "import_s": round(marks["end"] - marks["start"], 1),
        "read_and_hash_s": round(marks.get("write_phase", marks["end"]) - marks["start"], 1),
        "stage_s": round(marks.get("publish", marks["end"]) - marks.get("write_phase", marks["end"]), 1),
        "publish_s": round(marks["end"] - marks.get("publish", marks["end"]), 1),
        "import_report": marks["report"],
        "baseline": baseline,
        "during_import": during,
        "during_publish": publishing,
        # when the import's phases began and when each click over 0.5 s started (s from the start)
        "phase_starts_s": {k: round(v - marks["start"], 2) for k, v in marks.items() if isinstance(v, float)},
        "slow_clicks": sorted((round(t - marks["start"], 2), ms) for w in clicks
                              for t, ms in zip(w["starts_s"], w["latencies_ms"])
                              if ms > 500 and marks["start"] <= t < marks["end"]),
    }
    print(f"  import {row['import_s']} s (read + hash {row['read_and_hash_s']} s, stage {row['stage_s']} s, "
          f"publish + exit {row['publish_s']} s): {row['import_report']}", flush=True)
    print(f"  during the import: {during}", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, default=100_000)
    parser.add_argument("--annotators", type=int, default=4)
    parser.add_argument("--think-ms", type=float, default=250.0, help="pause after each click")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the baseline")
    parser.add_argument("--pg", help="PostgreSQL server URL (a throw-away database is created on it)")
    parser.add_argument("--no-sqlite", action="store_true")
    parser.add_argument("--out", default=str(REPO / ".bench" / "clicks_during_import.json"))
    args = parser.parse_args(argv)

    folder = make_images(args.labels)
    kinds = ([] if args.no_sqlite else ["sqlite"]) + (["postgresql"] if args.pg else [])
    rows = [measure(k, args.pg, folder, args.annotators, args.think_ms, args.seconds) for k in kinds]

    print(f"\n{args.annotators} annotators (think {args.think_ms:g} ms) while `glom import` brings in "
          f"{args.labels:,} labels; ratios to the same annotators without the import, same run:")
    print(f"{'backend':<11}{'phase':<15}{'clicks':>7}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}{'p95 x':>8}{'max x':>8}"
          f"{'>1 s':>6}")
    for r in rows:
        base = r["baseline"]
        for phase in ("baseline", "during_import", "during_publish"):
            st = r[phase]
            if not st["clicks"]:
                print(f"{r['backend']:<11}{phase:<15}{0:>7}")
                continue
            print(f"{r['backend']:<11}{phase:<15}{st['clicks']:>7}{st['p50_ms']:>9}{st['p95_ms']:>9}{st['max_ms']:>9}"
                  f"{st['p95_ms'] / base['p95_ms']:>8.2f}{st['max_ms'] / base['max_ms']:>8.2f}{st['over_1s']:>6}")
        print(f"{'':<11}import {r['import_s']} s: read + hash {r['read_and_hash_s']} s, stage {r['stage_s']} s, "
              f"publish + exit {r['publish_s']} s; longest wait per annotator during it (ms): "
              f"{r['during_import']['longest_per_annotator_ms']}")
        p95 = r["during_import"].get("p95_ms")
        print(f"{'':<11}goal (p95 <= 1 s during the import): {'met' if p95 is not None and p95 <= 1000 else 'NOT met'}")
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "labels": args.labels, "annotators": args.annotators,
                               "think_ms": args.think_ms, "results": rows}, indent=1))
    print(f"{machine}; {load_note()}; samples in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
