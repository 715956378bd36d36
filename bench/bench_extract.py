"""Crop extraction throughput (crops/s) against a bare single-process OpenSlide loop.

Baseline, measured in the same run on the same boxes: one ``openslide.OpenSlide`` per slide,
``read_region(...).convert("RGB").save(png, compress_level=6)`` per box, in one process — what a
hand-written script does, with the same PNG settings as ours. Ours: ``extract_crops`` with 1 and
2 worker processes into a fresh folder (so nothing is skipped), plus a resumed re-run where all
crops exist. For reference: the read-only loop (``read_region`` + RGB, no PNG), and the
baseline loop split over two forked processes, which shows how much a second core is worth
on this (shared) machine at the time of the run.

Boxes: glomerulus-sized (300-500 level-0 px, i.e. 150-250 µm at 0.5 µm/px), seeded random
positions, on the two real slides in ``../shared/data/wsi`` (Aperio JPEG tiles; JPEG 2000).

    .venv/bin/python bench/bench_extract.py [--boxes 60] [--repeats 5]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import openslide

from core.annotations import Annotation
from core.extract import CropSettings, SlideTask, extract_crops

REPO = Path(__file__).resolve().parents[1]
WSI = Path(os.environ.get("GLOM_SHARED_DATA", REPO.parent / "shared" / "data")) / "wsi"
SLIDES = ("cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs")


def make_boxes(path: Path, n: int, seed: int, margin: int = 0) -> list[tuple[int, int, int, int]]:
    """``n`` glomerulus-sized (300-500 px) level-0 boxes at seeded positions, ``margin`` px inside the slide."""
    rng = np.random.default_rng(seed)
    with openslide.OpenSlide(str(path)) as osr:
        w0, h0 = osr.dimensions
    out = []
    for _ in range(n):
        w, h = (int(v) for v in rng.integers(300, 501, 2))
        out.append((int(rng.integers(margin, w0 - w - margin)), int(rng.integers(margin, h0 - h - margin)), w, h))
    return out


def bare_loop(work: dict[Path, list], out: Path, save: bool) -> float:
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    for path, boxes in work.items():
        with openslide.OpenSlide(str(path)) as osr:
            for i, (x, y, w, h) in enumerate(boxes):
                img = osr.read_region((x, y), 0, (w, h)).convert("RGB")
                if save:
                    img.save(out / f"{path.stem}_{i}.png", format="PNG", compress_level=6)
    return time.perf_counter() - t


def _half(args: tuple[dict[Path, list], Path, int]) -> float:
    work, out, part = args
    return bare_loop({p: b[part::2] for p, b in work.items()}, out / f"part{part}", save=True)


def bare_two_processes(work: dict[Path, list], out: Path) -> float:
    """The baseline loop split over two forked processes: what this machine's cores allow."""
    t = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool.map(_half, [(work, out, 0), (work, out, 1)])
    return time.perf_counter() - t


def ours(work: dict[Path, list], out: Path, workers: int) -> float:
    tasks = [SlideTask(p, [Annotation.rectangle(*b) for b in boxes]) for p, boxes in work.items()]
    t = time.perf_counter()
    report = extract_crops(tasks, out, CropSettings(png_compress_level=6), workers=workers, progress=False)
    elapsed = time.perf_counter() - t
    n = sum(len(b) for b in work.values())
    assert report.written + report.skipped_existing == n and not report.failed, report.summary()
    return elapsed


def measure(fn, *args) -> tuple[float, float]:  # noqa: ANN001
    """(wall seconds, CPU seconds of this process and its reaped children) of ``fn(*args)``."""
    t0, c0 = time.perf_counter(), os.times()
    fn(*args)
    t1, c1 = time.perf_counter(), os.times()
    cpu = sum(getattr(c1, f) - getattr(c0, f) for f in ("user", "system", "children_user", "children_system"))
    return t1 - t0, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--boxes", type=int, default=60, help="boxes per slide")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    work = {WSI / s: make_boxes(WSI / s, args.boxes, args.seed + i) for i, s in enumerate(SLIDES)}
    n = sum(len(b) for b in work.values())
    load_before = os.getloadavg()[0]
    names = ("read-only", "baseline", "bare-2proc", "ours-1", "ours-2", "resume")
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    tmp = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    try:
        bare_loop(work, tmp / "warm", save=False)  # page cache, libraries
        for r in range(args.repeats):  # interleaved, so drift on a shared machine hits all alike
            runs = {
                "read-only": (bare_loop, work, tmp / f"ro{r}", False),
                "baseline": (bare_loop, work, tmp / f"base{r}", True),
                "bare-2proc": (bare_two_processes, work, tmp / f"bare2{r}"),
                "ours-1": (ours, work, tmp / f"one{r}", 1),
                "ours-2": (ours, work, tmp / f"two{r}", 2),
                "resume": (ours, work, tmp / f"one{r}", 1),  # everything exists now
            }
            for k, (fn, *a) in runs.items():
                w, c = measure(fn, *a)
                wall[k].append(w)
                cpu[k].append(c)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = os.getloadavg()[0]

    def paired(a: str, b: str) -> float:
        """Median over repeats of rate(a) / rate(b), each pair measured back to back."""
        return statistics.median(wb / wa for wa, wb in zip(wall[a], wall[b], strict=True))

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, no GPU, Python {platform.python_version()}, "
          f"OpenSlide {openslide.__library_version__}; load average {load_before:.2f} before, {load_after:.2f} after")
    print(f"{n} crops ({args.boxes} per slide, 300-500 px, level 0, PNG) on {', '.join(SLIDES)}; "
          f"median of {args.repeats} interleaved runs")
    for k in names:
        w, c = statistics.median(wall[k]), statistics.median(cpu[k])
        print(f"  {k:10s} {n / w:8.1f} crops/s   ({w:.3f} s wall, {1000 * c / n:6.2f} ms CPU per crop)")
    cpu_ratio = statistics.median(cpu["baseline"]) / statistics.median(cpu["ours-1"])
    print(f"ratio ours-1 / baseline (bare openslide loop), crops/s   = {paired('ours-1', 'baseline'):.2f}")
    print(f"ratio ours-1 / baseline, by CPU per crop                 = {cpu_ratio:.2f}")
    print(f"ratio ours-2 / baseline, crops/s                         = {paired('ours-2', 'baseline'):.2f}")
    print(f"scaling ours-2 / ours-1                                  = {paired('ours-2', 'ours-1'):.2f}")
    print(f"scaling bare 2 processes / bare loop (what the machine gave) = {paired('bare-2proc', 'baseline'):.2f}")
    print(f"ratio ours-2 / bare 2 processes                          = {paired('ours-2', 'bare-2proc'):.2f}")
    print(f"resume (all crops exist) / baseline                      = {paired('resume', 'baseline'):.0f}")


if __name__ == "__main__":
    main()
