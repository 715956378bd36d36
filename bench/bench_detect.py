"""``glom detect`` against the model's bare forward pass, and the detector's held-out accuracy.

- **throughput**: a pyramidal TIFF (3 levels, 0.5 µm/px) made of all 24 real PAS tiles, with a
  band of glass. ``detect_slide`` end to end (thumbnail, Otsu tissue mask, tile reading through
  OpenSlide on a prefetch thread, forward, strip stitching, watershed, polygons, GeoJSON) in
  tiles/s ÷ the same predictor's forward pass alone over the very same tiles, already in memory,
  same batch size, alternating rounds in the same run (median of the per-round ratios).
  Target ≥ 0.8.
- **accuracy**: ``evaluate_detector`` on the checkpoint's held-out test tiles (and validation
  tiles): object precision / recall / F1 at IoU ≥ 0.5, pixel Dice, AP@[.5:.95], count error.

    python bench/bench_detect.py --checkpoint runs/detector/best.safetensors
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.detection.data import resolve_data_path
from core.detection.inference import Predictor, resolve_device
from core.detection.model import load_detector
from core.detection.slides import (
    DetectSettings,
    _tile_tasks,
    checkpoint_digest,
    detect_slide,
)


def build_slide(path: Path, cols: int = 6) -> Path:
    """All real tiles in a grid (level 0 = 0.5 µm/px) plus one row of glass; 3 levels."""
    folder = resolve_data_path("$SHARED/glomeruli-tiles") / "images"
    tiles = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))]
    rows = (len(tiles) + cols - 1) // cols
    rgb = np.full(((rows + 1) * 1024, cols * 1024, 3), 243, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        rgb[r * 1024:(r + 1) * 1024, c * 1024:(c + 1) * 1024] = t
    img = Image.fromarray(rgb)
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for level in range(3):
            if level:
                img = img.resize((img.width // 2, img.height // 2), Image.Resampling.BOX)
            extra = {"resolution": (1e4 / 0.5, 1e4 / 0.5), "resolutionunit": "CENTIMETER"} if level == 0 else {}
            tw.write(np.asarray(img), tile=(256, 256), photometric="rgb", compression="zlib",
                     subfiletype=1 if level else 0, metadata=None, **extra)
    return path


def bench_throughput(ckpt: Path, slide: Path, settings: DetectSettings, rounds: int, device: str) -> dict:
    from core.wsi import open_slide

    dev = resolve_device(device)
    model, meta = load_detector(ckpt, dev)
    predictor = Predictor(model, meta, dev)
    with open_slide(slide) as reader:
        _, _, tasks, _, _, bbox = _tile_tasks(reader, settings, meta.mpp)
        f = meta.mpp / reader.require_mpp()
        t = settings.tile_px
        tiles = np.stack([reader.read_region((round(bbox[0] + x * f), round(bbox[1] + y * f)), (t, t), mpp=meta.mpp)
                          for y, x in tasks])
    digest = checkpoint_digest(ckpt)
    bare, full, ratios, found = [], [], [], 0
    predictor(tiles[: settings.batch_size])  # warm-up
    with tempfile.TemporaryDirectory() as out:
        for _ in range(rounds):
            t0 = time.perf_counter()
            for i in range(0, len(tiles), settings.batch_size):
                predictor(tiles[i:i + settings.batch_size])
            bare.append(len(tiles) / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            det, _ = detect_slide(slide, predictor, settings, Path(out), checkpoint=str(ckpt), digest=digest,
                                  resume=False)
            full.append(det.tiles_read / (time.perf_counter() - t0))
            ratios.append(full[-1] / bare[-1])
            found = len(det.instances)
    return {"tiles": len(tiles), "tile_px": settings.tile_px, "batch": settings.batch_size, "device": str(dev),
            "threads": torch.get_num_threads(), "bare_tiles_per_s": round(statistics.median(bare), 3),
            "detect_tiles_per_s": round(statistics.median(full), 3), "ratio": round(statistics.median(ratios), 3),
            "ratios": [round(r, 3) for r in ratios], "glomeruli_found": found, "timings_last": det.timings,
            "working_mpix_per_s": round(statistics.median(full) * (settings.tile_px - settings.overlap_px) ** 2 / 1e6, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tile-px", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--skip-accuracy", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from core.detection.model import read_detector_meta

    meta = read_detector_meta(args.checkpoint)
    settings = DetectSettings.from_meta(meta, tile_px=args.tile_px, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        slide = build_slide(Path(tmp) / "all_tiles.tif")
        result = {"throughput": bench_throughput(args.checkpoint, slide, settings, args.rounds, args.device)}
    print(json.dumps(result["throughput"], indent=1), flush=True)
    if not args.skip_accuracy:
        from core.detection.evaluate import evaluate_detector

        for split in ("test", "val"):
            with tempfile.TemporaryDirectory() as tmp:
                rep = evaluate_detector(args.checkpoint, "$SHARED/glomeruli-tiles", Path(tmp), split=split,
                                        device=args.device, overlays=False)
            result[split] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in rep.items()
                             if k not in ("checkpoint", "data")}
            print(split, json.dumps(result[split]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
