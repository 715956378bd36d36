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

Two more rows, same client, same tiles:

* *floor*: the least an HTTP answer costs here: a one-line async Starlette route on the same
  uvicorn settings returning prepared JPEG bytes (each tile's own, encoded beforehand), so no
  token, no lookup, no decoding. What ours adds over the bare loop can't be less than this.
* *the app*: the same requests to the real labeling app (``streamlit run app/asgi.py``, Streamlit's
  own uvicorn server and middleware around the ``st.App`` routes), in a subprocess on a free
  port, the token signed with a shared ``$GLOM_TILE_SECRET``. ``--no-app`` leaves it out.

uvicorn picks its HTTP parser (httptools when installed, else h11) and event loop (uvloop when
installed) as Streamlit's server does; the line above the table says which ran. A third floor row
adds the hop to a worker thread that a cold tile takes (``run_in_threadpool`` of a dict lookup); a
fourth waits in that thread (``time.sleep``, the GIL released as openslide and PIL release it) as
long as the bare loop took on the same tile, then answers its prepared bytes: about the least a
cold tile can cost over HTTP on this machine whatever the server does. On the 2-core VM a request that makes the client wait a few ms costs ~2-3 ms more than one
answered at once (measured with a route that only sleeps 3 ms: 5.9 ms), a wake-up cost of the
waiting side that the bare loop, which never waits, does not pay.
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
    ap.add_argument("--no-app", action="store_true", help="skip the rows of the real app (streamlit run app/asgi.py)")
    args = ap.parse_args()

    import httpx
    import openslide
    import uvicorn
    from openslide.deepzoom import DeepZoomGenerator
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

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
    os.environ["GLOM_TILE_SECRET"] = "bench-" + os.urandom(8).hex()  # the app subprocess checks our tokens
    from app import slide_api

    dz = DeepZoomGenerator(openslide.OpenSlide(str(root / name)), tile_size=TILE_SIZE, overlap=TILE_OVERLAP,
                           limit_bounds=True)
    coords = [(lv, c, r) for lv in range(dz.level_count - 3, dz.level_count)
              for c in range(dz.level_tiles[lv][0]) for r in range(dz.level_tiles[lv][1])]
    random.Random(0).shuffle(coords)
    coords = coords[: args.tiles]

    bare = []
    prepared, took = {}, {}
    for lv, c, r in coords:
        t0 = time.perf_counter()
        prepared[lv, c, r] = encode_jpeg(dz.get_tile(lv, (c, r)), JPEG_QUALITY)
        bare.append(time.perf_counter() - t0)
        took[lv, c, r] = bare[-1]

    async def floor_tile(request):  # the overhead floor: prepared bytes, nothing else
        p = request.path_params
        return Response(prepared[p["level"], p["col"], p["row"]], media_type="image/jpeg")

    async def floor_hop_tile(request):  # the floor plus the worker-thread hop a cold tile takes
        from starlette.concurrency import run_in_threadpool

        p = request.path_params
        data = await run_in_threadpool(prepared.__getitem__, (p["level"], p["col"], p["row"]))
        return Response(data, media_type="image/jpeg")

    def spin(key):  # as long as the bare loop took on this tile (GIL released, as in openslide/PIL), then its bytes
        time.sleep(took[key])
        return prepared[key]

    async def floor_work_tile(request):  # the floor of a cold tile: the bare time, spent in a worker thread
        from starlette.concurrency import run_in_threadpool

        p = request.path_params
        return Response(await run_in_threadpool(spin, (p["level"], p["col"], p["row"])), media_type="image/jpeg")

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def serve(app) -> tuple[uvicorn.Server, int]:
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        return server, port

    server_loop = []

    async def which_loop(request):
        import asyncio

        server_loop.append(asyncio.get_running_loop())
        return Response(b"")

    server, port = serve(Starlette(routes=[*slide_api.routes(), Route("/loop", which_loop)]))
    httpx.get(f"http://127.0.0.1:{port}/loop")  # which event loop uvicorn runs (uvloop when installed)
    floor, floor_port = serve(Starlette(routes=[
        Route("/api/slides/tile/{level:int}/{col:int}_{row:int}.jpeg", floor_tile)]))
    hop, hop_port = serve(Starlette(routes=[
        Route("/api/slides/tile/{level:int}/{col:int}_{row:int}.jpeg", floor_hop_tile)]))
    work, work_port = serve(Starlette(routes=[
        Route("/api/slides/tile/{level:int}/{col:int}_{row:int}.jpeg", floor_work_tile)]))
    token = sign_token("bench", name)
    slide_api.tile_service().slide(name)  # open the handle (once per process) outside the timing

    def run(port: int) -> list[float]:
        out = []
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            client.get("/api/slides/dzi", params={"slide": name, "t": token})  # connect, open the slide
            for lv, c, r in coords:
                t0 = time.perf_counter()
                resp = client.get(f"/api/slides/tile/{lv}/{c}_{r}.jpeg", params={"slide": name, "t": token})
                resp.raise_for_status()
                out.append(time.perf_counter() - t0)
        return out

    rows = [("bare get_tile + JPEG", bare), ("HTTP floor: async route, prepared bytes", run(floor_port)),
            ("HTTP floor + worker-thread hop (run_in_threadpool)", run(hop_port)),
            ("HTTP floor of a cold tile: the tile's bare time waited in the worker thread", run(work_port))]
    rows += [("HTTP, cold (first request)", run(port)), ("HTTP, warm (LRU)", run(port))]
    server.should_exit = floor.should_exit = hop.should_exit = work.should_exit = True
    if not args.no_app:
        rows += app_rows(root, run)
    shutil.rmtree(root, ignore_errors=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"openslide {openslide.__library_version__}; slide {name}, {len(coords)} tiles of the 3 finest levels; "
          f"uvicorn {uvicorn.__version__}, HTTP parser {server.config.http_protocol_class.__name__}, "
          f"event loop {type(server_loop[0]).__module__.split('.')[0]}; load average {os.getloadavg()[0]:.2f}")
    print("| path | p50 ms | p95 ms | p50 ratio to bare | p95 ratio to bare |")
    print("| --- | ---: | ---: | ---: | ---: |")
    b50, b95 = pct(bare, .5), pct(bare, .95)
    for label, xs in rows:
        print(f"| {label} | {pct(xs, .5):.2f} | {pct(xs, .95):.2f} | {pct(xs, .5) / b50:.2f}× | {pct(xs, .95) / b95:.2f}× |")


def app_rows(root: Path, run) -> list[tuple[str, list[float]]]:
    """Cold and warm tiles from the real app: ``streamlit run app/asgi.py`` on the same slides folder."""
    import subprocess
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (root / "app.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(REPO / "app" / "asgi.py"),
                             "--server.port", str(port), "--server.headless", "true",
                             "--browser.gatherUsageStats", "false"], cwd=REPO, env=dict(os.environ),
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    raise SystemExit(f"the app stopped: see {root / 'app.log'}") from None
                time.sleep(0.25)
        return [("app (streamlit run app/asgi.py), cold", run(port)), ("app, warm (LRU)", run(port))]
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


if __name__ == "__main__":
    main()
