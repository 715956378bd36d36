"""What honest validation costs: TTA against plain inference, k-fold CV against one training run,
and the slide bootstrap against one metric computation. Each figure is a ratio to a baseline
measured in the same run, on the real crops (``../shared/data/glomeruli-bueno``).

- **TTA**: ``Predictor`` with ``tta`` (8 dihedral views) ÷ the same predictor without, same crops,
  alternating rounds (median of the per-pair ratios). Ideal: 8.0 on the forward pass; less when
  decoding and resizing dominate.
- **CV**: ``glom cv`` with k folds ÷ one ``glom train`` run of the same recipe (60/20/20 split).
  Ideal: k × (train fraction of CV folds ÷ that of the single split) + the held-out re-prediction.
- **bootstrap**: 1000 resamples of slides ÷ one ``point_metrics`` call on all crops.

    python bench/bench_cv_tta.py                       # tiny model, CPU, a few minutes
    python bench/bench_cv_tta.py --model efficientnet_lite0 --size 160 --epochs 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.config import load_config  # noqa: E402
from core.labeled_sets import load_from_csv, shared_data_dir  # noqa: E402


def bench_tta(ckpt: Path, paths: list[str], rounds: int) -> dict:
    from core.predict import Predictor

    plain, tta = Predictor.from_checkpoint(ckpt), Predictor.from_checkpoint(ckpt)
    plain.tta, tta.tta = False, True
    times: dict[str, list[float]] = {"plain": [], "tta": []}
    for _ in range(rounds):
        for name, p in (("plain", plain), ("tta", tta)):
            t0 = time.perf_counter()
            p.predict_paths(paths, batch_size=32)
            times[name].append(time.perf_counter() - t0)
    ratios = [t / p for t, p in zip(times["tta"], times["plain"])]
    return {"crops": len(paths), "plain_crops_per_s": len(paths) / statistics.median(times["plain"]),
            "tta_crops_per_s": len(paths) / statistics.median(times["tta"]), "ratio": statistics.median(ratios)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--images", type=int, default=300, help="crops used for training (stratified subset)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    labels = shared_data_dir() / "glomeruli-bueno" / "labels.csv"
    out = Path(tempfile.mkdtemp(prefix="bench_cv_"))
    overrides = [f"output_dir={out}", "data.kind=csv", f"data.path={labels}", f"data.max_images={args.images}",
                 "data.centre_pattern=^([^_]+)_", f"model.name={args.model}", f"preprocess.input_size={args.size}",
                 f"train.epochs={args.epochs}", "train.threads=2", "evaluate.tsne=false"]
    from core.cv import run_cv
    from core.train import run_training

    t0 = time.perf_counter()
    single = run_training(load_config(None, ["name=single", *overrides]), progress=False)
    t_single = time.perf_counter() - t0
    t0 = time.perf_counter()
    cv = run_cv(load_config(None, ["name=cv", *overrides]), "kfold", args.folds, progress=False)
    t_cv = time.perf_counter() - t0
    print(f"CV: one run {t_single:.1f} s, {args.folds}-fold CV {t_cv:.1f} s -> ratio {t_cv / t_single:.2f} "
          f"({t_cv / args.folds / t_single:.2f} per fold)")

    ls = load_from_csv(labels)
    paths = [s.path for s in ls.samples[:: max(1, len(ls.samples) // 128)]][:128]
    tta = bench_tta(single.checkpoint, paths, args.rounds)
    print(f"TTA: plain {tta['plain_crops_per_s']:.1f} crops/s, 8-view {tta['tta_crops_per_s']:.1f} crops/s "
          f"-> ratio {tta['ratio']:.2f} ({tta['crops']} crops, {args.model} {args.size} px)")

    from core.intervals import bootstrap_metrics, point_metrics

    rng = np.random.default_rng(0)
    y = np.array(ls.labels)
    p = np.clip(np.eye(2)[y] * 0.8 + rng.uniform(0, 0.4, (len(y), 2)), 0, None)
    p /= p.sum(1, keepdims=True)
    slides = [s.slide for s in ls.samples]
    t0 = time.perf_counter()
    for _ in range(20):
        point_metrics(p, y, ls.classes)
    t_one = (time.perf_counter() - t0) / 20
    t0 = time.perf_counter()
    bootstrap_metrics(p, y, slides, ls.classes, n=1000)
    t_boot = time.perf_counter() - t0
    print(f"bootstrap: one metric pass {t_one * 1000:.1f} ms, 1000 slide resamples {t_boot:.2f} s "
          f"-> ratio {t_boot / t_one:.0f} ({len(y)} crops, {len(set(slides))} slides)")
    print(f"cv report: {cv.out_dir / 'cv_report.md'}")


if __name__ == "__main__":
    main()
