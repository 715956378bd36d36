"""A training run, built entirely from a :class:`~core.config.TrainConfig`.

:func:`run_training` reads as its steps: check the config, start the process (device, rank,
seeds), load and split the data, build the model, loaders and losses, run the epochs (keeping
the best checkpoint by ``train.monitor``), then evaluate the best model. The parts live apart:
:mod:`core.training_data` (data, split, stain normaliser, loaders), :mod:`core.optim` (optimizer,
schedule), :mod:`core.engine` (one epoch), :mod:`core.evaluate` (the report),
:mod:`core.distributed` (DDP).

``runs/<name>/`` receives: ``config.yaml`` (resolved), ``split.json``, ``metrics.csv`` and
TensorBoard events (per epoch), ``best.safetensors`` + ``best.json`` (checkpoint and sidecar),
``last.*``, and the evaluation report (``report.json``, ``report.md``, PNG plots).

Several GPUs: ``torchrun --nproc_per_node=N -m core.train --recipe ...`` (DDP; rank 0 writes).
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from core.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from core.config import TrainConfig, TrainingConfigError, load_config, validate_config
from core.distributed import broadcast, init_distributed
from core.engine import StepContext, TrainingDivergedError, make_step_context, predict, train_one_epoch
from core.errors import GlomError
from core.evaluate import evaluate_model
from core.labeled_sets import DataError, LabeledSet, Sample
from core.losses import class_weights_from_counts, create_loss
from core.metrics import classification_metrics, plot_history, softmax, write_report
from core.model_factory import apply_freeze, create_classifier, model_kwargs
from core.optim import build_optimizer, build_scheduler, step_scheduler
from core.splits import Split
from core.training_data import TrainLoaders, build_loaders, fit_stain_normalizer, load_training_set, make_split
from core.transforms import resolve_preprocess
from models.freeze import freeze_backbone, set_frozen_norm_eval, unfreeze_all

log = logging.getLogger(__name__)

__all__ = ["RunResult", "run_training", "seed_everything"]


@dataclass
class RunResult:
    """Where a run wrote its files and its headline numbers."""

    run_dir: Path
    checkpoint: Path
    report: dict[str, Any]
    history: list[dict[str, Any]]
    seconds: float
    logits: dict[str, np.ndarray] = field(default_factory=dict)  # raw val/test logits of the best model (rank 0)

    def metric(self, split: str, key: str) -> Any:
        return self.report["splits"].get(split, {}).get(key)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class _Process:
    """This process's device and place among the DDP ranks (rank 0 alone writes files)."""

    device: torch.device
    rank: int
    world: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class _Run:
    """What the first steps of a run built, and what the epochs and the final evaluation use."""

    cfg: TrainConfig
    proc: _Process
    run_dir: Path
    data: LabeledSet
    split: Split
    subsets: dict[str, list[Sample]]
    preprocess: dict[str, Any]
    normalizer: Any
    model: nn.Module
    ctx: StepContext
    meta: CheckpointMeta
    t0: float

    @property
    def classes(self) -> list[str]:
        return self.data.classes


@dataclass
class _Fit:
    """How the epochs went: one row per epoch, the best and the last epoch, why they stopped."""

    history: list[dict[str, Any]]
    best_epoch: int
    last_epoch: int
    stop_reason: str


# --- the run ----------------------------------------------------------------------------------


def run_training(cfg: TrainConfig, progress: bool = True,
                 on_epoch: Callable[[dict[str, Any]], None] | None = None) -> RunResult:
    """Train and evaluate as ``cfg`` says; returns the run folder, checkpoint and report."""
    t0 = time.perf_counter()
    validate_config(cfg)
    proc = _start_process(cfg)
    ls = load_training_set(cfg)
    split = make_split(cfg, ls)
    run_dir = _open_run_dir(cfg, proc, split)
    subsets = split.subsets(ls)
    if not subsets["train"]:
        raise DataError("the training split is empty")
    k = len(ls.classes)
    model = create_classifier(cfg.model, k)
    preprocess = resolve_preprocess(model, cfg.preprocess)
    normalizer, stain_meta = fit_stain_normalizer(cfg, subsets["train"])
    ctx = _place_model(model, cfg, proc.device)
    loaders = build_loaders(cfg, subsets, k, preprocess, normalizer, proc.device, proc.world)
    losses = _build_losses(cfg, subsets["train"], k, proc.device)
    run = _Run(cfg, proc, run_dir, ls, split, subsets, preprocess, normalizer, model, ctx,
               _checkpoint_meta(cfg, ls, split, preprocess, stain_meta), t0)
    fit = _fit(run, _wrap_ddp(model, proc), loaders, losses, progress, on_epoch)
    report, logits = _evaluate_best(run, fit) if proc.is_main else ({}, {})
    report = broadcast(report)
    if dist.is_initialized():
        dist.barrier()
    return RunResult(run_dir, run_dir / "best.safetensors", report, fit.history, time.perf_counter() - t0, logits)


# --- its steps --------------------------------------------------------------------------------


def _start_process(cfg: TrainConfig) -> _Process:
    """Device and rank (DDP under torchrun), seeds, CPU threads, cuDNN autotuning."""
    device, rank, world = init_distributed(cfg.train.device)
    seed_everything(cfg.seed + rank)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    return _Process(device, rank, world)


def _open_run_dir(cfg: TrainConfig, proc: _Process, split: Split) -> Path:
    """The run folder, holding the resolved config and the split before any training."""
    run_dir = _run_dir(cfg, proc.rank)
    if proc.is_main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))
        split.save(run_dir / "split.json")
    log.info("run folder %s on %s (world %d)", run_dir, proc.device, proc.world)
    return run_dir


def _run_dir(cfg: TrainConfig, rank: int) -> Path:
    if rank == 0:
        base = Path(cfg.output_dir) / cfg.name
        path = base
        k = 2
        while path.exists() and any(path.iterdir()):
            path = base.with_name(f"{base.name}-{k}")
            k += 1
        path.mkdir(parents=True, exist_ok=True)
    else:
        path = None
    return Path(broadcast(str(path)) if dist.is_initialized() else path)


def _place_model(model: nn.Module, cfg: TrainConfig, device: torch.device) -> StepContext:
    """Move the model to ``device``; the step context (AMP, channels-last) it trains under."""
    model.to(device)
    ctx = make_step_context(device, cfg.train.amp, cfg.train.channels_last)
    if ctx.channels_last:
        model.to(memory_format=torch.channels_last)
    return ctx


def _class_weights(setting: Any, counts: list[int]) -> list[float] | None:
    """Loss weights: ``balanced`` (inverse frequency), ``auto`` (balanced when the largest class
    has ≥ 1.5× the images of the smallest present one, else none), None, or the list given."""
    if setting == "auto":
        present = [c for c in counts if c > 0]
        skewed = len(present) > 1 and max(present) >= 1.5 * min(present)
        if skewed:
            log.info("classes are skewed %s: balanced class weights (train.loss.class_weights: auto)", counts)
        return class_weights_from_counts(counts).tolist() if skewed else None
    if setting == "balanced":
        return class_weights_from_counts(counts).tolist()
    if setting is None or isinstance(setting, (list, tuple)):
        return setting
    raise TrainingConfigError(f"train.loss.class_weights: {setting!r} is not auto, balanced, null or a list")


def _build_losses(cfg: TrainConfig, train: list[Sample], num_classes: int,
                  device: torch.device) -> tuple[nn.Module, nn.Module]:
    """The training loss (with label smoothing) and the validation loss (without); same class weights."""
    counts = np.bincount([s.label for s in train], minlength=num_classes).tolist()
    lc = cfg.train.loss
    weights = _class_weights(lc.class_weights, counts)
    loss_fn = create_loss(lc.name, num_classes, lc.label_smoothing, weights, lc.focal_gamma, lc.focal_alpha)
    eval_loss = create_loss(lc.name, num_classes, 0.0, weights, lc.focal_gamma, lc.focal_alpha)
    return loss_fn.to(device), eval_loss.to(device)


def _checkpoint_meta(cfg: TrainConfig, ls: LabeledSet, split: Split, preprocess: dict[str, Any],
                     stain_meta: dict | None) -> CheckpointMeta:
    """The sidecar every checkpoint of the run carries (epoch and metrics filled in as it goes)."""
    return CheckpointMeta(architecture=cfg.model.name, num_classes=len(ls.classes), classes=ls.classes,
                          display_names=ls.display_names, preprocess=preprocess,
                          model_kwargs=model_kwargs(cfg.model), stain=stain_meta, tta=cfg.evaluate.tta,
                          split={"file": "split.json", "groups": split.groups, "seed": split.seed,
                                 "ratios": split.ratios, "group_by": split.group_by, "fold": split.fold,
                                 "sizes": {n: len(getattr(split, n)) for n in ("train", "val", "test")}},
                          config=cfg.to_dict())


def _wrap_ddp(model: nn.Module, proc: _Process) -> nn.Module:
    """The module the optimizer steps through: the model itself, or DDP around it on several ranks."""
    if proc.world == 1:
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[proc.device.index] if proc.device.type == "cuda" else None, find_unused_parameters=True)


def _start_phase(model: nn.Module, cfg: TrainConfig, phase: int) -> tuple[torch.optim.Optimizer, Any]:
    """Optimizer and schedule for a phase: 1 trains only the head at ``train.lr`` for
    ``two_phase.frozen_epochs``; 2 trains what ``model.freeze`` leaves trainable for the remaining
    epochs, at ``train.lr`` (× ``two_phase.lr_scale`` after a phase 1)."""
    frozen_epochs = cfg.train.two_phase.frozen_epochs
    unfreeze_all(model)
    if phase == 1:
        freeze_backbone(model, fraction=1.0)
        lr, n = cfg.train.lr, frozen_epochs
    else:
        apply_freeze(model, cfg.model)
        lr = cfg.train.lr * (cfg.train.two_phase.lr_scale if frozen_epochs else 1.0)
        n = cfg.train.epochs - frozen_epochs
    opt = build_optimizer(model.parameters(), cfg, lr)
    return opt, build_scheduler(opt, cfg, n)


def _fit(run: _Run, train_model: nn.Module, loaders: TrainLoaders, losses: tuple[nn.Module, nn.Module],
         progress: bool, on_epoch: Callable[[dict[str, Any]], None] | None) -> _Fit:
    """The epochs: train, validate, step the schedule and save ``best.*`` whenever ``train.monitor``
    improves; stop early, on the time budget, or after ``train.epochs``."""
    cfg = run.cfg
    monitor = cfg.train.monitor
    higher = not monitor.endswith("loss")
    frozen_epochs = cfg.train.two_phase.frozen_epochs
    optimizer, scheduler = _start_phase(run.model, cfg, 1 if frozen_epochs else 2)
    logger = _EpochLog(run.run_dir, run.proc.is_main)
    best_value, best_epoch, bad_epochs = None, -1, 0
    stop_reason = "epochs done"
    for epoch in range(cfg.train.epochs):
        if frozen_epochs and epoch == frozen_epochs:
            log.info("phase 2: all layers at lr %.2e", cfg.train.lr * cfg.train.two_phase.lr_scale)
            optimizer, scheduler = _start_phase(run.model, cfg, 2)
        row = _train_epoch(run, train_model, loaders, losses, optimizer, epoch, progress)
        value = row.get(monitor, -row["train_loss"] if higher else row["train_loss"])
        step_scheduler(scheduler, value)
        improved = best_value is None or (value > best_value if higher else value < best_value)
        if improved:
            best_value, best_epoch, bad_epochs = value, epoch, 0
            if run.proc.is_main:
                run.meta.epoch = epoch
                run.meta.metrics = {k2: v for k2, v in row.items() if k2 != "epoch"}
                save_checkpoint(run.model, run.run_dir / "best", run.meta)
        else:
            bad_epochs += 1
        row["best"] = improved
        logger.write(row)
        if on_epoch is not None:
            on_epoch(row)
        stop = _stop_reason(cfg, bad_epochs, run.t0)
        if stop:
            stop_reason = stop
            break
    logger.close()
    log.info("training stopped: %s (best %s %s at epoch %d)", stop_reason, monitor, best_value, best_epoch)
    return _Fit(logger.rows, best_epoch, epoch, stop_reason)


def _train_epoch(run: _Run, train_model: nn.Module, loaders: TrainLoaders, losses: tuple[nn.Module, nn.Module],
                 optimizer: torch.optim.Optimizer, epoch: int, progress: bool) -> dict[str, Any]:
    """One epoch of training, then validation on rank 0; the epoch's row, the same on every rank."""
    cfg = run.cfg
    loss_fn, eval_loss = losses
    if isinstance(loaders.sampler, DistributedSampler):
        loaders.sampler.set_epoch(epoch)
    tr = train_one_epoch(train_model, loaders.train, loss_fn, optimizer, run.ctx, epoch, len(run.classes),
                         cfg.augment.mixup_alpha, cfg.train.log_every, progress, set_frozen_norm_eval)
    row: dict[str, Any] = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                           "train_loss": tr["loss"], "train_accuracy": tr["accuracy"],
                           "train_images_per_s": tr["images_per_s"]}
    row.update(_val_metrics(run.model, loaders.val, run.ctx, eval_loss, run.classes) if run.proc.is_main else {})
    row = broadcast(row)
    log.info("epoch %d: train loss %.4f acc %.3f | %s", epoch, tr["loss"], tr["accuracy"],
             ", ".join(f"{k2} {v:.4f}" for k2, v in row.items() if k2.startswith("val_")))
    return row


def _stop_reason(cfg: TrainConfig, bad_epochs: int, t0: float) -> str | None:
    """Why training stops after this epoch (early stopping, time budget), or None to go on."""
    t = cfg.train
    if t.early_stopping_patience and bad_epochs >= t.early_stopping_patience:
        return f"early stopping after {bad_epochs} epochs without {t.monitor} improving"
    if t.max_minutes and (time.perf_counter() - t0) / 60 > t.max_minutes:
        return f"time budget of {t.max_minutes} min reached"
    return None


class _EpochLog:
    """metrics.csv + TensorBoard, rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed: metrics go to metrics.csv only")

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if not self.enabled:
            return
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        with self.path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)
        if self.tb is not None:
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k.replace("_", "/", 1), v, row["epoch"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _val_metrics(model: nn.Module, loader: DataLoader | None, ctx: StepContext, loss_fn: nn.Module,
                 classes: list[str]) -> dict[str, float]:
    if loader is None:
        return {}
    out = predict(model, loader, ctx)
    logits, labels = out["logits"], out["labels"]
    if not torch.isfinite(logits).all():
        # The weights blew up in the last steps of the epoch (the training loss was still finite).
        raise TrainingDivergedError("the model's outputs on the validation images are NaN or infinite: "
                                    "training diverged; lower the learning rate or turn AMP off")
    m = classification_metrics(softmax(logits.numpy()), labels.numpy(), classes)
    loss = float(loss_fn(logits.to(ctx.device), labels.to(ctx.device)))
    return {"val_loss": loss, "val_accuracy": m["accuracy"], "val_macro_f1": m["macro_f1"],
            "val_balanced_accuracy": m["balanced_accuracy"]}


def _evaluate_best(run: _Run, fit: _Fit) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Rank 0: save ``last.*``, evaluate the best checkpoint on val and test (report, plots,
    calibration), and write its temperature and headline metrics into its sidecar."""
    cfg, run_dir, meta = run.cfg, run.run_dir, run.meta
    meta.epoch = fit.best_epoch
    save_checkpoint(run.model, run_dir / "last", CheckpointMeta(**{**meta.to_dict(), "epoch": fit.last_epoch}))
    best_model, best_meta = load_checkpoint(run_dir / "best", run.proc.device)
    if run.ctx.channels_last:
        best_model.to(memory_format=torch.channels_last)
    plot_history(fit.history, run_dir / "history.png")
    logits: dict[str, np.ndarray] = {}
    report = evaluate_model(
        best_model, run.classes, run.preprocess, run.normalizer,
        {"val": run.subsets["val"], "test": run.subsets["test"]}, run_dir, run.ctx,
        calibrate=cfg.evaluate.calibrate, tsne=cfg.evaluate.tsne,
        batch_size=cfg.evaluate.batch_size, num_workers=cfg.data.num_workers, seed=cfg.seed, tta=cfg.evaluate.tta,
        bootstrap=cfg.evaluate.bootstrap, logits_out=logits,
        extra={"name": cfg.name, "architecture": cfg.model.name, "checkpoint": "best.safetensors",
               "data": run.data.source, "split_groups": run.split.groups, "best_epoch": fit.best_epoch,
               "stop_reason": fit.stop_reason, "code_revision": best_meta.code_revision,
               "train_seconds": time.perf_counter() - run.t0,
               "parameters": sum(p.numel() for p in run.model.parameters())})
    report["plots"]["training history"] = "history.png"
    best_meta.temperature = report.get("temperature")
    best_meta.metrics = {**best_meta.metrics, **{
        f"{s}_{key}": m[key] for s, m in report["splits"].items()
        for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc")}}
    save_checkpoint(best_model, run_dir / "best", best_meta)
    report["total_seconds"] = time.perf_counter() - run.t0
    write_report(run_dir, report, run.classes)
    return report, logits


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``torchrun -m core.train --recipe R [--set k=v ...]``."""
    p = argparse.ArgumentParser(description="Train a classifier from a recipe (DDP under torchrun).")
    p.add_argument("--recipe", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.INFO if rank0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = run_training(load_config(args.recipe, args.overrides))
    except GlomError as e:  # as `glom train`: one line (torchrun names the rank), status 2
        print(f"error: {e}", file=sys.stderr)
        if dist.is_initialized():
            dist.destroy_process_group()
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        test = result.report.get("splits", {}).get("test", {})
        log.info("done: %s, test macro-F1 %s", result.run_dir, test.get("macro_f1"))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
