"""The viewer's whole-slide request against its parts done by hand, in the same run.

    .venv/bin/python bench/bench_viewer_slide.py [--boxes 40] [--repeats 3] [--model resnet18@224]

Ours: ``app.viewer.slide_batch`` called in-process (everything a click on "Cut and predict the
slide's glomeruli" runs except HTTP): read the GeoJSON, cut one crop per annotation at 0.5 µm/px
through ``core.extract`` into a fresh store and data folder, register them, check each crop as an
upload, predict, store the predictions, draw the gallery, write the CSV and the per-slide
summary. Timed without heatmaps, with Grad-CAM, and with Grad-CAM again on the same store (crops
reused, predicted again).

Baseline: the least a hand-written script does to get the same predictions: one
``openslide.OpenSlide`` per slide, ``read_region`` at the best level (resized only when off
0.5 µm/px by more than 1%, as ours) + PNG (level 6), then the crops decoded, preprocessed the
model's way and run through the model under ``torch.no_grad`` in batches of 16 (no store, no
checks, no heatmaps, no gallery). Figure: ours / baseline.

Boxes: glomerulus-sized (300-500 level-0 px), seeded random positions, on the two real slides in
``../shared/data/wsi`` (the TCGA slide records no µm/px: 0.25 is given, as a clinician would).
The model is untrained (``pretrained=False``; cost does not depend on the weights), saved as a
real checkpoint (safetensors + JSON) and loaded through the viewer's loader.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import openslide  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import models  # noqa: E402,F401
from bench.bench_extract import make_boxes  # noqa: E402 - the extraction benchmark's boxes
from core.annotations import Annotation, write_geojson  # noqa: E402
from core.checkpoint import CheckpointMeta, save_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WSI = Path(os.environ.get("GLOM_SHARED_DATA", REPO.parent / "shared" / "data")) / "wsi"
SLIDES = {"cmu-1-small-region.svs": None, "tcga-cr-7395-01a-01-ts1.svs": 0.25}  # name -> µm/px to supply
TARGET_MPP, PAD = 0.5, 16
CLASSES = ["normal", "segmental_sclerosis", "mesangial_proliferation", "crescent"]


def baseline(work: dict[str, list], out: Path, ckpt_path: Path) -> float:
    from core.diagnosis import load_viewer_checkpoint

    pred = load_viewer_checkpoint(ckpt_path).predictor
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    files = []
    for name, boxes in work.items():
        with openslide.OpenSlide(str(WSI / name)) as osr:
            mpp = SLIDES[name] or float(osr.properties[openslide.PROPERTY_NAME_MPP_X])
            # the coarsest level at least as fine as 0.5 µm/px (1% tolerance), resampled only when needed
            level = max(i for i, d in enumerate(osr.level_downsamples) if mpp * d <= TARGET_MPP * 1.01)
            ds = osr.level_downsamples[level]
            exact = abs(mpp * ds / TARGET_MPP - 1) <= 0.01
            for i, (x, y, w, h) in enumerate(boxes):
                x, y, w, h = x - PAD, y - PAD, w + 2 * PAD, h + 2 * PAD
                img = osr.read_region((x, y), level, (round(w / ds), round(h / ds))).convert("RGB")
                if not exact:
                    scale = mpp / TARGET_MPP
                    img = img.resize((round(w * scale), round(h * scale)), Image.LANCZOS)
                f = out / f"{Path(name).stem}_{i}.png"
                img.save(f, format="PNG", compress_level=6)
                files.append(f)
    rgbs = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    with torch.no_grad():
        for i in range(0, len(rgbs), 16):
            x = torch.stack([pred.preprocess(r) for r in rgbs[i:i + 16]]).to(pred.device)
            torch.softmax(pred.model(x), 1).cpu().numpy()
    return time.perf_counter() - t


def ours(ckpt_path: Path, anns: dict[str, Path], root: Path, method: str,
         repeat_on_same_store: bool) -> tuple[float, float | None]:
    """Seconds for the slide requests on a fresh store (and again on the same store)."""
    from annotation_db.db import open_store

    os.environ.update(GLOM_RUNS=str(ckpt_path.parents[1]), GLOM_DB=f"sqlite:///{root / 'store.db'}",
                      GLOM_DATA_ROOT=str(root / "data"), GLOM_SLIDES_DIR=str(WSI))
    from app import viewer

    open_store(os.environ["GLOM_DB"])  # the store exists before a clinician's click (migrations not timed)

    def run() -> float:
        t = time.perf_counter()
        for name, ann in anns.items():
            viewer.slide_batch(str(ckpt_path), name, str(ann), SLIDES[name], method, 0.45, 64)
        return time.perf_counter() - t

    first = run()
    again = run() if repeat_on_same_store else None
    open_store.cache_clear()  # the next repeat gets a new store file
    return first, again


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--boxes", type=int, default=40, help="annotations per slide")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="resnet18@224", help="timm name@input size")
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tmp = Path(tempfile.mkdtemp(prefix="glom-bench-viewer-slide-"))
    try:
        name, size = args.model.split("@")
        model = timm.create_model(name, pretrained=False, num_classes=len(CLASSES)).eval()
        meta = CheckpointMeta(name, len(CLASSES), CLASSES, {"input_size": [3, int(size), int(size)],
                              "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "scaling": "imagenet",
                              "interpolation": "bilinear"}, temperature=1.0)
        ckpt = save_checkpoint(model, tmp / "runs" / "bench" / "best", meta)
        work = {n: make_boxes(WSI / n, args.boxes, seed=i, margin=PAD) for i, n in enumerate(SLIDES)}
        anns = {n: write_geojson([Annotation.rectangle(*b) for b in boxes], tmp / f"{Path(n).stem}.geojson")
                for n, boxes in work.items()}
        n_crops = sum(len(b) for b in work.values())
        # warm-up: imports, model load, first slide opens
        baseline(work, tmp / "warm-base", ckpt)
        ours(ckpt, anns, tmp / "warm-ours", "gradcam", False)
        base_t, plain_t, cam_t, again_t = [], [], [], []
        for r in range(args.repeats):  # in turns, so machine load falls on all alike
            base_t.append(baseline(work, tmp / f"base{r}", ckpt))
            plain_t.append(ours(ckpt, anns, tmp / f"plain{r}", "", False)[0])
            first, again = ours(ckpt, anns, tmp / f"cam{r}", "gradcam", True)
            cam_t.append(first)
            again_t.append(again)
        b, p, c, a = (statistics.median(v) for v in (base_t, plain_t, cam_t, again_t))
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} on CPU; "
              f"model {args.model}; {n_crops} glomeruli on {len(SLIDES)} slides; median of {args.repeats}")
        print(f"baseline (hand-written read+PNG, decode, forward):  {b:6.2f} s  ({n_crops / b:5.1f} crops/s)")
        for label, v in (("viewer slide request, no heatmaps", p), ("viewer slide request, Grad-CAM", c),
                         ("viewer, Grad-CAM, crops reused", a)):
            print(f"{label + ':':50s} {v:6.2f} s  ({n_crops / v:5.1f} crops/s)  ratio {v / b:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
