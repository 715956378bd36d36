"""The optimizer and the per-epoch learning-rate schedule of a training run, built from ``cfg.train``.

``build_optimizer(model.parameters(), cfg, lr)`` takes only the trainable parameters (frozen
layers are left out); ``build_scheduler(optimizer, cfg, epochs)`` is stepped once per epoch,
with the monitored value for ``plateau``. A two-phase run builds both again for its second phase.
"""

from __future__ import annotations

from typing import Any

import torch

from core.config import TrainConfig, TrainingConfigError

__all__ = ["build_optimizer", "build_scheduler", "step_scheduler"]


def build_optimizer(params, cfg: TrainConfig, lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW, Adam or SGD over the trainable ``params``."""
    t = cfg.train
    lr = t.lr if lr is None else lr
    params = [p for p in params if p.requires_grad]
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=True)
    raise TrainingConfigError(f"unknown optimizer {t.optimizer!r}: use adamw, adam or sgd")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, epochs: int):
    """Per-epoch scheduler (multistep, cosine, step, plateau, none) with optional linear warmup."""
    s = cfg.train.scheduler
    warm = min(s.warmup_epochs, max(epochs - 1, 0))
    main_epochs = max(epochs - warm, 1)
    if s.name == "plateau":
        mode = "min" if cfg.train.monitor.endswith("loss") else "max"
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=s.factor,
                                                          patience=s.patience, min_lr=s.min_lr)
    if s.name == "cosine":
        main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=main_epochs, eta_min=s.min_lr)
    elif s.name == "multistep":
        main = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[m - warm for m in s.milestones],
                                                    gamma=s.gamma)
    elif s.name == "step":
        main = torch.optim.lr_scheduler.StepLR(optimizer, step_size=s.step_size, gamma=s.gamma)
    elif s.name == "none":
        main = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0)
    else:
        raise TrainingConfigError(f"unknown scheduler {s.name!r}: use cosine, multistep, step, plateau or none")
    if warm <= 0:
        return main
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / (warm + 1), total_iters=warm)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, main], milestones=[warm])


def step_scheduler(scheduler: Any, monitored: float) -> None:
    """The end-of-epoch step; ``plateau`` decides on the monitored value, the others on the epoch count."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(monitored)
    else:
        scheduler.step()
