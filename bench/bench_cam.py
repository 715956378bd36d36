"""Heatmap cost against its baseline: one forward + backward pass of the same model.

    .venv/bin/python bench/bench_cam.py [--device cpu|cuda] [--models resnet18@224 ...] [--repeats 7]

For each model and batch size (1 and 16) it times, median of ``--repeats`` after warm-up:

- ``fwd+bwd``: ``model(x)``, then the predicted-class score summed and back-propagated, with
  parameter gradients as in training — the baseline;
- ``gradcam (library)``: pytorch-grad-cam's ``GradCAM`` as shipped (full backward);
- ``gradcam (core.explain)``: :func:`core.explain.open_cam`, which stops the backward at the target
  layer and skips weight gradients;
- ``predict+gradcam (viewer)``: what the viewer runs per request (:func:`core.diagnosis.diagnose`:
  preprocessing excluded, probabilities from the CAM's own forward).

and prints ratios to the baseline (goal: ≤ 1.3× for Grad-CAM). Models are untrained
(``pretrained=False``): the cost does not depend on the weights.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402
import torch  # noqa: E402
from pytorch_grad_cam import GradCAM  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

import models  # noqa: E402,F401
from core.explain import find_target_layers, open_cam  # noqa: E402

DEFAULT_MODELS = ("resnet18@224", "vit_tiny_patch16_224@224", "se_resnet50_factorized@128", "resnet18@96")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_round_robin(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                      warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, measured in turns so that load from other
    processes on a shared machine falls on all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_model(spec: str, batch: int, device: torch.device, repeats: int) -> dict[str, float]:
    name, size = spec.split("@")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=4).to(device).eval()
    x = torch.randn(batch, 3, int(size), int(size), device=device)
    target = find_target_layers(model, name)

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        logits = model(x)
        logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()

    def library() -> None:
        with GradCAM(model, target.layers, reshape_transform=target.reshape_transform) as cam:
            cam(x, targets=[ClassifierOutputTarget(1)] * batch)

    def ours() -> None:
        with open_cam(model, name, "gradcam", target) as cam:
            cam(x, target_class=1)

    def viewer() -> None:
        with open_cam(model, name, "gradcam", target) as cam:
            cam(x)  # predicted class, as the viewer does
            torch.softmax(cam.outputs, 1)

    return _time_round_robin({"fwd+bwd": fwd_bwd, "gradcam (library)": library, "gradcam (core.explain)": ours,
                              "predict+gradcam (viewer)": viewer}, device, repeats)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="name@input_px")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# Grad-CAM vs one forward+backward ({where}, torch {torch.__version__}, median of {args.repeats})")
    print("| model @ px | batch | fwd+bwd ms/img | Grad-CAM library ms/img (×) | Grad-CAM core.explain ms/img (×) "
          "| viewer predict+CAM ms/img (×) |")
    print("|---|---:|---:|---:|---:|---:|")
    for spec in args.models:
        for batch in args.batches:
            r = bench_model(spec, batch, device, args.repeats)
            base = r["fwd+bwd"]

            def cell(key: str) -> str:
                return f"{1000 * r[key] / batch:.1f} ({r[key] / base:.2f}×)"

            print(f"| {spec} | {batch} | {1000 * base / batch:.1f} | {cell('gradcam (library)')} | "
                  f"{cell('gradcam (core.explain)')} | {cell('predict+gradcam (viewer)')} |", flush=True)


if __name__ == "__main__":
    main()
