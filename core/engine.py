"""One training epoch and one evaluation pass; AMP, channels_last and DDP aware.

:func:`train_step` is the whole per-batch work (forward, loss, backward, optimiser step) so that
``bench/bench_train_step.py`` can time exactly what training runs against a bare timm loop.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from core.errors import GlomError
from core.transforms import mixup_batch

log = logging.getLogger(__name__)

__all__ = ["StepContext", "make_step_context", "train_step", "train_one_epoch", "predict", "TrainingDivergedError"]


class TrainingDivergedError(GlomError, RuntimeError):
    """The loss became NaN or infinite; lower the learning rate or turn AMP off."""


@dataclass
class StepContext:
    """Device placement and precision for training and inference steps."""

    device: torch.device
    amp_dtype: torch.dtype | None = None  # None: full precision
    channels_last: bool = False
    scaler: torch.amp.GradScaler | None = None
    non_blocking: bool = False
    extra: dict = field(default_factory=dict)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=self.non_blocking)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def make_step_context(device: torch.device, amp: bool = True, channels_last: bool = True) -> StepContext:
    """AMP (bf16 where supported, else fp16 with a grad scaler) and channels_last on CUDA only."""
    if device.type != "cuda":
        return StepContext(device)
    dtype = None
    scaler = None
    if amp:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if dtype == torch.float16:
            scaler = torch.amp.GradScaler("cuda")
    return StepContext(device, dtype, channels_last, scaler, non_blocking=True)


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module,
               optimizer: torch.optim.Optimizer, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, loss, backward and step on one batch already on the device; returns (loss, logits)."""
    with ctx.autocast():
        logits = model(x)
        loss = loss_fn(logits, y)
    optimizer.zero_grad(set_to_none=True)
    if ctx.scaler is not None:
        ctx.scaler.scale(loss).backward()
        ctx.scaler.step(optimizer)
        ctx.scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss.detach(), logits.detach()


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def train_one_epoch(model: nn.Module, loader: DataLoader, loss_fn: nn.Module,
                    optimizer: torch.optim.Optimizer, ctx: StepContext, epoch: int,
                    num_classes: int, mixup_alpha: float = 0.0, log_every: int = 10,
                    progress: bool = True, after_train_mode=None) -> dict[str, float]:
    """Train one pass over ``loader``; returns mean loss, accuracy and images/s (all ranks summed).

    ``after_train_mode(model)`` runs right after ``model.train()`` (e.g. keep frozen BN in eval).
    """
    model.train()
    if after_train_mode is not None:
        after_train_mode(model)
    sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # loss·n, correct, n
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not (progress and _is_main()),
               dynamic_ncols=True)
    for i, (x, y) in enumerate(bar):
        x, y = ctx.to_device(x), y.to(ctx.device, non_blocking=ctx.non_blocking)
        target = y
        if mixup_alpha > 0:
            x, target = mixup_batch(x, y, num_classes, mixup_alpha)
        loss, logits = train_step(model, x, target, loss_fn, optimizer, ctx)
        n = y.shape[0]
        sums += torch.stack([loss.double() * n, (logits.argmax(1) == y).sum().double(),
                             torch.tensor(float(n), dtype=torch.float64, device=ctx.device)])
        if (i + 1) % log_every == 0 or i + 1 == len(loader):
            s = sums.tolist()
            if not math.isfinite(s[0]):
                raise TrainingDivergedError(f"loss is {s[0]} at epoch {epoch}, batch {i}: lower the "
                                            f"learning rate or turn AMP off")
            bar.set_postfix(loss=f"{s[0] / s[2]:.4f}", acc=f"{s[1] / s[2]:.3f}")
    bar.close()
    seconds = time.perf_counter() - start
    s = _reduce(sums).tolist()
    if s[2] == 0:
        raise TrainingDivergedError("the training loader yielded no images: is the training split smaller "
                                    "than one batch per process?")
    return {"loss": s[0] / max(s[2], 1), "accuracy": s[1] / max(s[2], 1), "images": s[2],
            "seconds": seconds, "images_per_s": s[2] / max(seconds, 1e-9)}


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, ctx: StepContext, features: bool = False,
            progress: bool = False, desc: str = "predict", tta: bool = False) -> dict[str, torch.Tensor]:
    """Logits (float32, CPU) and labels for every batch; penultimate features when asked.

    ``tta``: logits are the mean over the 8 dihedral views (features stay those of the plain view).
    """
    from core.transforms import tta_logits

    model.eval()
    inner = getattr(model, "module", model)
    logits, labels, feats = [], [], []
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
        x = ctx.to_device(x)
        with ctx.autocast():
            if tta:
                out = tta_logits(model, x)
                if features:
                    feats.append(inner.forward_head(inner.forward_features(x), pre_logits=True).float().cpu())
            elif features:
                f = inner.forward_head(inner.forward_features(x), pre_logits=True)
                out = inner.get_classifier()(f)
                feats.append(f.float().cpu())
            else:
                out = model(x)
        logits.append(out.float().cpu())
        labels.append(y.cpu())
    result = {"logits": torch.cat(logits) if logits else torch.empty(0),
              "labels": torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)}
    if features:
        result["features"] = torch.cat(feats) if feats else torch.empty(0)
    return result
