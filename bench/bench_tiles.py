"""Deep Zoom tile latency over HTTP (the workspace's routes) against a bare DeepZoomGenerator loop.

    .venv/bin/python bench/bench_tiles.py [--slide ../shared/data/wsi/cmu-1-small-region.svs] [--tiles 120]

Baseline, in the same run: ``DeepZoomGenerator.get_tile`` + JPEG encoding (quality 85, as served)
on one ``openslide.OpenSlide`` handle, the least any tile server does. Ours: ``GET
/api/slides/tile/...`` on a real uvicorn server on 127.0.0.1 serving :mod:`app.slide_api` (token
check, name confinement, LRU, Cache-Control), through one keep-alive ``httpx`` client: *cold* is
the first request for each tile (fresh server cache), *warm* the same tiles again (served from the
LRU; a browser would not even ask, thanks to Cache-Control). The tiles: every tile of the three
finest levels, up to ``--tiles``, in a seeded random order. Figures: p50/p95 in ms and the ratio
ours / baseline (goals: cold ≤ 1.3×, warm ≤ 0.2×).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slide", default=str(REPO.parent / "shared" / "data" / "wsi" / "cmu-1-small-region.svs"))
    ap.add_argument("--tiles", type=int, default=120)
    args = ap.parse_args()

    import httpx
    import openslide
    import uvicorn
    from openslide.deepzoom import DeepZoomGenerator
    from starlette.applications import Starlette

    from core.tile_service import (
        JPEG_QUALITY,
        TILE_OVERLAP,
        TILE_SIZE,
        encode_jpeg,
        sign_token,
    )

    root = Path(tempfile.mkdtemp())
    name = Path(args.slide).name
    shutil.copy(args.slide, root / name)
    os.environ["GLOM_SLIDES_DIR"] = str(root)
    os.environ["GLOM_DB"] = f"sqlite:///{root / 'bench.db'}"
    from app import slide_api

    dz = DeepZoomGenerator(openslide.OpenSlide(str(root / name)), tile_size=TILE_SIZE, overlap=TILE_OVERLAP,
                           limit_bounds=True)
    coords = [(lv, c, r) for lv in range(dz.level_count - 3, dz.level_count)
              for c in range(dz.level_tiles[lv][0]) for r in range(dz.level_tiles[lv][1])]
    random.Random(0).shuffle(coords)
    coords = coords[: args.tiles]

    bare = []
    for lv, c, r in coords:
        t0 = time.perf_counter()
        encode_jpeg(dz.get_tile(lv, (c, r)), JPEG_QUALITY)
        bare.append(time.perf_counter() - t0)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(Starlette(routes=slide_api.routes()), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    token = sign_token("bench", name)
    slide_api.tile_service().slide(name)  # open the handle (once per process) outside the timing

    def run() -> list[float]:
        out = []
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            for lv, c, r in coords:
                t0 = time.perf_counter()
                resp = client.get(f"/api/slides/tile/{lv}/{c}_{r}.jpeg", params={"slide": name, "t": token})
                resp.raise_for_status()
                out.append(time.perf_counter() - t0)
        return out

    cold = run()
    warm = run()
    server.should_exit = True
    shutil.rmtree(root, ignore_errors=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"openslide {openslide.__library_version__}; slide {name}, {len(coords)} tiles of the 3 finest levels")
    print("| path | p50 ms | p95 ms | p50 ratio to bare | p95 ratio to bare |")
    print("| --- | ---: | ---: | ---: | ---: |")
    b50, b95 = pct(bare, .5), pct(bare, .95)
    for label, xs in [("bare get_tile + JPEG", bare), ("HTTP, cold (first request)", cold), ("HTTP, warm (LRU)", warm)]:
        print(f"| {label} | {pct(xs, .5):.2f} | {pct(xs, .95):.2f} | {pct(xs, .5) / b50:.2f}× | {pct(xs, .95) / b95:.2f}× |")


if __name__ == "__main__":
    main()
