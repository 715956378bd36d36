"""``glom detect --ray``: slides/hour with 1 and 2 Ray workers, against the local ``--workers 1`` path.

Eight pyramidal TIFFs (3 levels, 0.5 µm/px) made of the 24 real PAS tiles of glomeruli-tiles (six
tiles each, 3 × 2, plus a band of glass; the tiles repeat from the fifth slide on). Three configurations over the very same slides,
in the same run, each a whole ``glom detect`` command (start-up, model loading and storing
included, ``--no-resume``):

- **local**: ``glom detect --workers 1 --threads 1`` (the baseline);
- **ray-1**: a loopback Ray cluster of one node with one CPU, ``--ray ADDRESS --threads 1``;
- **ray-2**: the same with two such nodes (two workers, one torch thread per task).

Prints slides/hour of each (wall time of the command, the cluster already started), the seconds
each slide's detection took inside it, the 1-minute load average after each, and the ratios
ray-1 / local and ray-2 / ray-1. The checkpoint is
``runs/detector/best.safetensors`` when it exists, else a tiny detector trained on three real
tiles (``tests/detector_fixtures.py``). Run it with ``nice``: it uses both cores.

    nice -n 15 python bench/bench_detect_ray.py [--checkpoint runs/detector/best.safetensors] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.detector_fixtures import (
    TILES,
    TILES_MPP,
    train_tiny_detector,
    write_pyramid_tiff,
)
from tests.ray_local import local_ray_cluster

GLOM = Path(sys.executable).parent / "glom"


def build_slides(root: Path, n: int = 4) -> list[Path]:
    """``n`` slides of six different real tiles each (3 × 2 grid over a band of glass)."""
    tiles = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((TILES / "images").glob("*.png"))]
    slides = []
    for k in range(n):
        six = [tiles[(6 * k + i) % len(tiles)] for i in range(6)]
        rgb = np.full((2 * 1024 + 512, 3 * 1024, 3), 243, np.uint8)
        for i, t in enumerate(six):
            rgb[(i // 3) * 1024:(i // 3 + 1) * 1024, (i % 3) * 1024:(i % 3 + 1) * 1024] = t
        slides.append(write_pyramid_tiff(root / f"bench_{k}.tif", rgb, TILES_MPP))
    return slides


def run_detect(slides: list[Path], ckpt: Path, out: Path, extra: list[str]) -> dict:
    cmd = [str(GLOM), "detect", *map(str, slides), "--checkpoint", str(ckpt), "--out", str(out), "--threads", "1",
           "--no-resume", "--no-progress", *extra]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if " glomeruli (" in ln]
    per_slide = [float(ln.split(" tiles, ")[1].split(" s)")[0]) for ln in lines]
    nodes = sorted({ln.rsplit("[", 1)[1].rstrip("]") for ln in lines if ln.endswith("]")})
    n = sum(len(json.loads((out / f"{s.stem}.geojson").read_text())["features"]) for s in slides)
    return {"wall_s": round(wall, 1), "slides_per_hour": round(len(slides) * 3600 / wall, 1),
            "detect_s_per_slide": round(statistics.mean(per_slide), 2), "detect_s_sum": round(sum(per_slide), 1),
            "glomeruli": n, "nodes": len(nodes), "load1": round(os.getloadavg()[0], 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=REPO / "runs" / "detector" / "best.safetensors")
    ap.add_argument("--slides", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=1, help="each configuration this many times (median)")
    args = ap.parse_args(argv)

    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True, check=False).stdout.strip()}")
    with tempfile.TemporaryDirectory(prefix="bench_ray_") as tmp:
        root = Path(tmp)
        ckpt = args.checkpoint
        if not ckpt.is_file():
            print(f"{ckpt} not found: training the tiny test detector")
            ckpt = train_tiny_detector(root / "det")
        slides = build_slides(root, args.slides)
        results: dict[str, list[dict]] = {"local": [], "ray-1": [], "ray-2": []}
        for r in range(args.rounds):
            results["local"].append(run_detect(slides, ckpt, root / f"local{r}", ["--workers", "1"]))
            print("local", results["local"][-1], flush=True)
            for nodes in (1, 2):
                with local_ray_cluster(nodes=nodes, cpus_per_node=1) as address:
                    res = run_detect(slides, ckpt, root / f"ray{nodes}-{r}", ["--ray", address])
                results[f"ray-{nodes}"].append(res)
                print(f"ray-{nodes}", res, flush=True)
        med = {k: statistics.median(x["slides_per_hour"] for x in v) for k, v in results.items()}
        same = len({x["glomeruli"] for v in results.values() for x in v}) == 1
    print(json.dumps({"checkpoint": str(args.checkpoint if args.checkpoint.is_file() else "tiny"),
                      "slides": args.slides, "rounds": args.rounds, "slides_per_hour": med,
                      "ratio_ray1_over_local": round(med["ray-1"] / med["local"], 3),
                      "ratio_ray2_over_ray1": round(med["ray-2"] / med["ray-1"], 3),
                      "ratio_ray2_over_local": round(med["ray-2"] / med["local"], 3),
                      "same_glomeruli_everywhere": same}, indent=1))
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True, check=False).stdout.strip()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
