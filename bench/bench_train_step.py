"""Our training step (core.engine.train_step) against a bare timm loop, same model and tensors.

Both loops get an identical copy of the model, the same batch (already on the device), the same
optimiser settings; measurement rounds alternate between them so that background load hits both
alike. Prints images/s (median rounds) and the ratio bare/ours (1.0 = no overhead): the median
of the ratios of adjacent round pairs (the headline: background load cancels), the ratio of the
median rounds, and the ratio of each loop's fastest round.

    python bench/bench_train_step.py                          # CPU: resnet18, 64 px
    python bench/bench_train_step.py --device cuda --amp --channels-last \
        --models resnet50 seresnet50 resnest50d --size 224 --batch-size 128
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402,F401
from core.engine import StepContext, make_step_context, train_step  # noqa: E402
from core.losses import create_loss  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_step(model, x, y, optimizer, ctx: StepContext) -> None:
    """The loop every timm example writes: autocast forward, cross-entropy, backward, step."""
    with torch.autocast(device_type=ctx.device.type, dtype=ctx.amp_dtype or torch.float32,
                        enabled=ctx.amp_dtype is not None):
        loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    if ctx.scaler is not None:
        ctx.scaler.scale(loss).backward()
        ctx.scaler.step(optimizer)
        ctx.scaler.update()
    else:
        loss.backward()
        optimizer.step()


def bench_model(name: str, device: torch.device, batch: int, size: int, steps: int, rounds: int,
                amp: bool, channels_last: bool, num_classes: int = 4) -> dict:
    torch.manual_seed(0)
    base = timm.create_model(name, pretrained=False, num_classes=num_classes).to(device)
    ctx = make_step_context(device, amp, channels_last)
    ctx_bare = make_step_context(device, amp, channels_last)
    if ctx.channels_last:
        base = base.to(memory_format=torch.channels_last)
    ours, bare = base, copy.deepcopy(base)
    ours.train()
    bare.train()
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_bare = torch.optim.AdamW(bare.parameters(), lr=1e-4)
    loss_fn = create_loss("cross_entropy", num_classes).to(device)
    x = ctx.to_device(torch.randn(batch, 3, size, size))
    y = torch.randint(0, num_classes, (batch,), device=device)

    def run_ours() -> None:
        train_step(ours, x, y, loss_fn, opt_ours, ctx)

    def run_bare() -> None:
        bare_step(bare, x, y, opt_bare, ctx_bare)

    for fn in (run_ours, run_bare):  # warm-up (cudnn autotune, allocator)
        for _ in range(2):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {"ours": [], "bare": []}
    pair_ratios: list[float] = []
    for r in range(rounds):
        order = (("ours", run_ours), ("bare", run_bare)) if r % 2 == 0 else (("bare", run_bare), ("ours", run_ours))
        this: dict[str, float] = {}
        for key, fn in order:
            _sync(device)
            t = time.perf_counter()
            for _ in range(steps):
                fn()
            _sync(device)
            this[key] = (time.perf_counter() - t) / steps
            times[key].append(this[key])
        # Adjacent rounds see nearly the same background load: their ratio cancels most of it.
        pair_ratios.append(this["bare"] / this["ours"])
    ours_s, bare_s = statistics.median(times["ours"]), statistics.median(times["bare"])
    # The fastest round of each is the least disturbed by other processes on a shared machine.
    ours_min, bare_min = min(times["ours"]), min(times["bare"])
    return {"model": name, "device": str(device), "batch": batch, "size": size, "amp": ctx.amp_dtype is not None,
            "amp_dtype": str(ctx.amp_dtype) if ctx.amp_dtype else None, "channels_last": ctx.channels_last,
            "ours_s_per_step": ours_s, "bare_s_per_step": bare_s,
            "ours_images_per_s": batch / ours_s, "bare_images_per_s": batch / bare_s,
            "ratio_bare_over_ours": bare_s / ours_s, "ratio_best_rounds": bare_min / ours_min,
            "ratio_paired_median": statistics.median(pair_ratios),
            "rounds": rounds, "steps_per_round": steps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="steps per measurement round")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--amp", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    rows = [bench_model(m, device, args.batch_size, args.size, args.steps, args.rounds, args.amp,
                        args.channels_last) for m in args.models]
    print("| model | device | batch×px | AMP | channels_last | ours img/s | bare timm img/s "
          "| ratio bare/ours (paired rounds) | (medians) | (best rounds) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['device']} | {r['batch']}×{r['size']} | {r['amp_dtype'] or 'off'} "
              f"| {r['channels_last']} | {r['ours_images_per_s']:.1f} | {r['bare_images_per_s']:.1f} "
              f"| {r['ratio_paired_median']:.3f} | {r['ratio_bare_over_ours']:.3f} | {r['ratio_best_rounds']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
