"""Labeling latency in a real browser: from a class hotkey to the next crop painted.

For each store size (default 1,000, 10,000 and 100,000 images) this builds a temporary SQLite
store whose images are the real crops in ``../shared/data/glomeruli-bueno`` seen through folder
symlinks (nothing copied), half of them already labeled by another annotator, starts ``streamlit run app/label.py``
on 127.0.0.1, signs in, and presses class hotkeys in Debian Chromium through Playwright. Each
sample is the time from just before the key press until the browser has painted the next crop
(its new ``<img>`` loaded, decoded, and one animation frame later).

    .venv/bin/python bench/bench_label_latency.py [--sizes 1000 10000 100000] [--presses 100]
        [--pg postgresql+psycopg://...]   # the store on PostgreSQL (the database is emptied first)
        [--queue uncertain]                # the model-uncertain queue (every image gets a prediction)

Prints p50 / p95 per size and the ratio against the smallest store (the baseline); writes the
samples to ``.bench/label_latency.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BUENO = Path(os.environ.get("GLOM_SHARED_DATA", REPO.parent / "shared" / "data")) / "glomeruli-bueno"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
CROP_IMG = ".st-key-crop img"

# Resolves with ms from now until a crop other than the current one is loaded, decoded and painted.
WAIT_NEXT_PAINT = """() => {
  const t0 = performance.now();
  const before = document.querySelector('%s')?.src;
  window.__painted = new Promise((resolve) => {
    const check = () => {
      const img = document.querySelector('%s');
      if (img && img.src !== before && img.complete && img.naturalWidth > 0) {
        img.decode().then(() => requestAnimationFrame(() => resolve(performance.now() - t0)));
      } else {
        requestAnimationFrame(check);
      }
    };
    requestAnimationFrame(check);
  });
}""" % (CROP_IMG, CROP_IMG)


# The keyboard layer (app/hotkeys.py) sends the id in the crop's alt text; wait once for it to
# be listening (a second after the page loads), not timed.
KEYS_READY = """() => {
  const s = window.__glomHotkeys;
  const img = document.querySelector('.st-key-crop img');
  return !!(s && s.el && s.el.isConnected && img && /#\\d+/.test(img.alt));
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_store(url: str, root: Path, n_images: int, predictions: bool = False) -> None:
    """A dataset ``bench`` of ``n_images`` symlinked crops on 24 slides, every other one labeled
    (and, with ``predictions``, one prediction per image with a seeded random margin)."""
    import random

    from sqlalchemy import insert

    from annotation_db.db import open_store
    from annotation_db.models import Image, Prediction
    from annotation_db.store import prediction_margin
    from annotation_db.store import create_dataset, get_or_create_annotator, get_or_create_slide, set_labels_bulk

    # Folder symlinks, one per pass over the real crops: distinct paths, no copies, and few
    # filesystem operations (one symlink per file would take minutes at 100,000).
    folders = [f for f in sorted(BUENO.iterdir()) if f.is_dir() and not f.name.startswith("_")]
    names = [(f.name, p.name) for f in folders for p in sorted(f.glob("*.png"))]
    if not names:
        raise SystemExit(f"no crops under {BUENO}: ../shared/data must sit beside the checkout")
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_images):
        rep, (folder, name) = divmod(i, len(names))[0], names[i % len(names)]
        link = root / f"pass{rep:04d}_{folder}"
        if not link.exists():
            link.symlink_to(BUENO / folder, target_is_directory=True)
        paths.append(f"{link.name}/{name}")
    Session = open_store(url)
    with Session() as s, s.begin():
        dataset = create_dataset(s, "bench", ["globally_sclerotic", "non_globally_sclerotic"], root=root)
        slides = [get_or_create_slide(s, f"slide_{k:02d}").id for k in range(24)]
        other = get_or_create_annotator(s, "other").id
        for start in range(0, n_images, 5000):
            rows = [
                dict(dataset_id=dataset.id, path=paths[i], sha256=f"{i:064x}",
                     width=224, height=224, slide_id=slides[i % 24], x0=100 * i, y0=0, box_w=224, box_h=224)
                for i in range(start, min(start + 5000, n_images))
            ]
            ids = s.scalars(insert(Image).returning(Image.id), rows).all()
            set_labels_bulk(s, [(i, other, ["globally_sclerotic"], False, "") for i in ids[::2]], source="bench")
            if predictions:
                rng = random.Random(start)
                preds = []
                for i in ids:
                    p = rng.random()
                    probs = {"globally_sclerotic": p, "non_globally_sclerotic": 1 - p}
                    preds.append(dict(image_id=i, checkpoint_id="bench@1", probs=probs, predicted=max(probs, key=probs.get),
                                      margin=prediction_margin(probs)))
                s.execute(insert(Prediction), preds)
    if url.startswith("postgresql"):
        with Session() as s, s.begin():
            s.connection().exec_driver_sql("ANALYZE")


def empty_pg(url: str) -> None:
    from annotation_db.db import create_store_engine, open_store
    from annotation_db.models import Base

    open_store.cache_clear()
    engine = create_store_engine(url)
    Base.metadata.drop_all(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
    engine.dispose()


def start_app(url: str, port: int, log: Path, extra: list[str] = ()) -> subprocess.Popen:
    """``streamlit run app/label.py`` from the repository (so .streamlit/config.toml applies)."""
    env = dict(os.environ, GLOM_DB=url, GLOM_TEST_URL_SIGNIN="1")  # ?annotator= signs the bench in (loopback)
    proc = subprocess.Popen(
        [str(REPO / ".venv" / "bin" / "streamlit"), "run", str(REPO / "app" / "label.py"),
         "--server.port", str(port), "--server.address", "127.0.0.1", "--server.headless", "true", *extra],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"),
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1)
            return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"streamlit did not start: {log.read_text()[-2000:]}")


def measure(port: int, presses: int, warmup: int, queue: str = "mine") -> list[float]:
    from playwright.sync_api import sync_playwright

    samples: list[float] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.goto(f"http://127.0.0.1:{port}/?annotator=bench&dataset=bench&queue={queue}")
        page.wait_for_selector(CROP_IMG, timeout=60_000)
        page.wait_for_timeout(1000)
        for k in range(warmup + presses):
            page.wait_for_function(KEYS_READY, timeout=30_000)  # not timed: see KEYS_READY
            page.evaluate(WAIT_NEXT_PAINT)
            page.keyboard.press("1" if k % 3 else "2")
            ms = page.evaluate("Promise.race([window.__painted, new Promise(r => setTimeout(() => r(null), 15000))])")
            if ms is None:
                raise SystemExit(f"press {k}: no new crop within 15 s")
            if k >= warmup:
                samples.append(ms)
        browser.close()
    return samples


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--presses", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", default=str(REPO / ".bench" / "label_latency.json"))
    parser.add_argument("--pg", help="PostgreSQL URL of a throw-away database (emptied before each size)")
    parser.add_argument("--queue", choices=["mine", "uncertain"], default="mine")
    parser.add_argument("--streamlit-option", action="append", default=[], metavar="NAME=VALUE",
                        help="extra `streamlit run` option, e.g. runner.postScriptGC=true (to compare)")
    args = parser.parse_args(argv)

    results = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="glom-bench-") as tmp:
            url = args.pg or f"sqlite:///{tmp}/store.db"
            if args.pg:
                empty_pg(url)
            t = time.perf_counter()
            build_store(url, Path(tmp) / "crops", n, predictions=args.queue == "uncertain")
            build_s = time.perf_counter() - t
            port = free_port()
            extra = [f"--{o.split('=', 1)[0]}={o.split('=', 1)[1]}" for o in args.streamlit_option]
            proc = start_app(url, port, Path(tmp) / "streamlit.log", extra)
            try:
                samples = measure(port, args.presses, args.warmup, args.queue)
            finally:
                proc.terminate()
                proc.wait(timeout=20)
        row = {
            "images": n,
            "presses": len(samples),
            "p50_ms": round(statistics.median(samples), 1),
            "p95_ms": round(percentile(samples, 0.95), 1),
            "max_ms": round(max(samples), 1),
            "store_build_s": round(build_s, 1),
            "samples_ms": [round(x, 1) for x in samples],
        }
        results.append(row)
        print(f"{n:>7,} images: p50 {row['p50_ms']:6.1f} ms  p95 {row['p95_ms']:6.1f} ms  max {row['max_ms']:6.1f} ms",
              flush=True)
    base = results[0]
    print(f"\nratio against the {base['images']:,}-image store (baseline):")
    for r in results:
        print(f"{r['images']:>7,}: p50 x{r['p50_ms'] / base['p50_ms']:.2f}  p95 x{r['p95_ms'] / base['p95_ms']:.2f}")
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}"
    print(f"store: {'PostgreSQL' if args.pg else 'SQLite'}; queue: {args.queue}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "options": args.streamlit_option, "results": results}, indent=1))
    print(f"samples in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
