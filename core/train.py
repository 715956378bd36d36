"""A training run, built entirely from a :class:`~core.config.TrainConfig`.

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

from core.checkpoint import CheckpointMeta, save_checkpoint
from core.config import TrainConfig, load_config
from core.engine import StepContext, TrainingDivergedError, make_step_context, predict, train_one_epoch
from core.errors import GlomError
from core.evaluate import evaluate_model
from core.labeled_sets import DataError, LabeledSet, Sample, assign_centres, load_labeled_set, shared_data_dir
from core.losses import class_weights_from_counts, create_loss
from core.metrics import classification_metrics, plot_history, softmax
from core.model_factory import apply_freeze, create_classifier, model_kwargs
from core.splits import Split, kfold_grouped, split_grouped
from core.stain import PerStainNormalizer, create_stain_normalizer, pick_reference
from core.torch_data import ImageDataset, balanced_sampler, read_rgb
from core.transforms import build_eval_transform, build_train_transform, lab_statistics, resolve_preprocess
from models.freeze import freeze_backbone, set_frozen_norm_eval, unfreeze_all

log = logging.getLogger(__name__)

__all__ = ["RunResult", "run_training", "load_training_set", "build_optimizer", "build_scheduler", "seed_everything",
           "resolve_path", "TrainingConfigError", "validate_config"]


class TrainingConfigError(GlomError, ValueError):
    """A training setting cannot be used as given (optimizer, scheduler, monitor...)."""


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


def resolve_path(p: str) -> str:
    """Expand ``$SHARED`` (the shared data folder), ``~`` and environment variables."""
    if not p:
        return p
    p = p.replace("$SHARED", str(shared_data_dir())).replace("${SHARED}", str(shared_data_dir()))
    return os.path.expanduser(os.path.expandvars(p))


# --- distributed ------------------------------------------------------------------------------


def _init_distributed(device_pref: str) -> tuple[torch.device, int, int]:
    """(device, rank, world size); initialises DDP when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device_pref == "auto":
        device_pref = "cuda" if torch.cuda.is_available() else "cpu"
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device_pref.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if device_pref.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local) if device_pref == "cuda" else torch.device(device_pref)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_pref)
    return device, rank, world


def _broadcast(obj: Any) -> Any:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --- building blocks --------------------------------------------------------------------------


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


def _stain_normalizer(cfg: TrainConfig, train: list[Sample]) -> tuple[Any, dict | None]:
    """The fitted normaliser (per stain when several references are given) and its sidecar entry."""
    st = cfg.preprocess.stain
    if st.method in ("none", "", None):
        return None, None
    refs = {k: resolve_path(v) for k, v in st.references.items() if v}
    if refs:
        fitted = {k: create_stain_normalizer(st.method).fit(read_rgb(v)) for k, v in refs.items()}
        default = next(iter(refs))
        if st.reference:
            fitted["*"] = create_stain_normalizer(st.method).fit(read_rgb(resolve_path(st.reference)))
            default = "*"
        norm = PerStainNormalizer(fitted, default)
        log.info("%s stain normalisers fitted per stain on %s (default %s)", st.method, refs, default)
        return norm, {**norm.to_dict(), "references": {**refs, **({"*": st.reference} if st.reference else {})}}
    ref = resolve_path(st.reference)
    if not ref:
        # No reference given: the most typical of (up to) 32 training crops.
        candidates = [s.path for s in train[:: max(1, len(train) // 32)]][:32]
        ref = candidates[pick_reference([read_rgb(p) for p in candidates])]
    norm = create_stain_normalizer(st.method).fit(read_rgb(ref))
    log.info("%s stain normaliser fitted on %s", st.method, ref)
    return norm, {**norm.to_dict(), "reference": ref}


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


def _lab_stats(train: list[Sample], preprocess: dict[str, Any], normalizer: Any, seed: int,
               n: int = 64) -> dict[str, list[float]]:
    """LAB stain statistics of up to ``n`` training crops (RandStainNA's template distribution)."""
    import torchvision.transforms.v2 as T

    rng = random.Random(seed)
    picked = rng.sample(train, min(n, len(train)))
    size = int(preprocess["input_size"][-1])
    to_tensor = T.Compose([T.ToImage(), T.Resize((size, size), antialias=True), T.ToDtype(torch.float32, scale=True)])
    ds = ImageDataset(picked, to_tensor, normalizer)
    stats = lab_statistics([ds[i][0] for i in range(len(ds))])
    log.info("RandStainNA template distribution from %d training crops: %s", len(picked), stats)
    return stats


def _subsample(ls: LabeledSet, n: int, seed: int) -> LabeledSet:
    """A class-stratified subset of whole slides' images, at most ``n`` images."""
    if n <= 0 or n >= len(ls.samples):
        return ls
    rng = random.Random(seed)
    by_class: dict[int, list[Sample]] = {}
    for s in ls.samples:
        by_class.setdefault(s.label, []).append(s)
    keep: list[Sample] = []
    for _, items in sorted(by_class.items()):
        rng.shuffle(items)
        keep += items[: max(1, round(n * len(items) / len(ls.samples)))]
    return LabeledSet(ls.classes, keep, ls.display_names, ls.source)


def load_training_set(cfg: TrainConfig) -> LabeledSet:
    """The labelled crops ``cfg.data`` names: loaded, subsampled (``max_images``), centres assigned."""
    d = cfg.data
    ls = load_labeled_set(d.kind, resolve_path(d.path), resolve_path(d.root), d.dataset, d.label_source,
                          d.db_url, d.classes or None)
    return assign_centres(_subsample(ls, d.max_images, cfg.seed), d.centre_pattern)


def _make_split(cfg: TrainConfig, ls: LabeledSet) -> Split:
    sc = cfg.data.split
    if sc.file:
        split = Split.load(resolve_path(sc.file))
        split.subsets(ls)  # raises if it names unknown images
        return split
    if sc.kfold > 1:
        folds = kfold_grouped(ls, sc.kfold, sc.seed, sc.group_by,
                              val_group_by="slide" if sc.group_by == "centre" else None)
        if not 0 <= sc.fold < sc.kfold:
            raise DataError(f"fold {sc.fold} is outside 0..{sc.kfold - 1}")
        return folds[sc.fold]
    return split_grouped(ls, sc.ratios, sc.seed, sc.group_by)


def validate_config(cfg: TrainConfig) -> None:
    """Fail before any work when a setting names something that does not exist."""
    t = cfg.train
    checks = [
        ("train.optimizer", t.optimizer, ("adamw", "adam", "sgd")),
        ("train.scheduler.name", t.scheduler.name, ("cosine", "multistep", "step", "plateau", "none")),
        ("train.loss.name", t.loss.name, ("cross_entropy", "ce", "focal")),
        ("train.monitor", t.monitor, ("val_macro_f1", "val_loss", "val_accuracy", "val_balanced_accuracy")),
        ("data.kind", cfg.data.kind, ("store", "folder", "csv", "jsonl")),
        ("preprocess.scaling", cfg.preprocess.scaling, ("imagenet", "model", "unit")),
        ("preprocess.stain.method", cfg.preprocess.stain.method, ("none", "macenko", "vahadane")),
    ]
    for key, value, allowed in checks:
        if value not in allowed:
            raise TrainingConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
    if t.epochs < 1 or t.two_phase.frozen_epochs >= t.epochs:
        raise TrainingConfigError(f"train.epochs ({t.epochs}) must be ≥ 1 and exceed "
                                  f"train.two_phase.frozen_epochs ({t.two_phase.frozen_epochs})")
    if cfg.data.kind != "store" and not cfg.data.path:
        raise TrainingConfigError(f"data.path is empty: name the {cfg.data.kind} to train on")
    if cfg.data.kind == "store" and not cfg.data.dataset:
        raise TrainingConfigError("data.dataset is empty: name the store dataset to train on")


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
    return Path(_broadcast(str(path)) if dist.is_initialized() else path)


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


# --- the run ----------------------------------------------------------------------------------


def run_training(cfg: TrainConfig, progress: bool = True,
                 on_epoch: Callable[[dict[str, Any]], None] | None = None) -> RunResult:
    """Train and evaluate as ``cfg`` says; returns the run folder, checkpoint and report."""
    t0 = time.perf_counter()
    validate_config(cfg)
    device, rank, world = _init_distributed(cfg.train.device)
    is_main = rank == 0
    seed_everything(cfg.seed + rank)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    d = cfg.data
    ls = load_training_set(cfg)
    split = _make_split(cfg, ls)
    run_dir = _run_dir(cfg, rank)
    if is_main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))
        split.save(run_dir / "split.json")
    log.info("run folder %s on %s (world %d)", run_dir, device, world)
    subsets = split.subsets(ls)
    classes, k = ls.classes, len(ls.classes)
    if not subsets["train"]:
        raise DataError("the training split is empty")

    model = create_classifier(cfg.model, k)
    preprocess = resolve_preprocess(model, cfg.preprocess)
    normalizer, stain_meta = _stain_normalizer(cfg, subsets["train"])
    model.to(device)
    ctx = make_step_context(device, cfg.train.amp, cfg.train.channels_last)
    if ctx.channels_last:
        model.to(memory_format=torch.channels_last)

    stain_stats = _lab_stats(subsets["train"], preprocess, normalizer, cfg.seed) if cfg.augment.randstain > 0 else None
    train_ds = ImageDataset(subsets["train"], build_train_transform(preprocess, cfg.augment, stain_stats), normalizer,
                            cache=d.cache, same_class_mix_p=cfg.augment.same_class_mix_p,
                            same_class_mix_alpha=cfg.augment.same_class_mix_alpha)
    if world > 1:
        sampler = DistributedSampler(train_ds, shuffle=True, seed=cfg.seed)
    elif cfg.augment.balanced_sampling:
        sampler = balanced_sampler(subsets["train"], k, cfg.seed)
    else:
        sampler = None
    pin = device.type == "cuda"
    train_loader = DataLoader(train_ds, batch_size=cfg.train.batch_size, shuffle=sampler is None,
                              sampler=sampler, num_workers=d.num_workers, pin_memory=pin,
                              persistent_workers=d.num_workers > 0,
                              drop_last=len(train_ds) // world > cfg.train.batch_size)
    val_loader = None
    if subsets["val"]:
        val_ds = ImageDataset(subsets["val"], build_eval_transform(preprocess), normalizer, cache=d.cache)
        val_loader = DataLoader(val_ds, batch_size=cfg.evaluate.batch_size, num_workers=d.num_workers,
                                pin_memory=pin, persistent_workers=d.num_workers > 0)

    counts = np.bincount([s.label for s in subsets["train"]], minlength=k).tolist()
    lc = cfg.train.loss
    weights = _class_weights(lc.class_weights, counts)
    loss_fn = create_loss(lc.name, k, lc.label_smoothing, weights, lc.focal_gamma, lc.focal_alpha).to(device)
    eval_loss = create_loss(lc.name, k, 0.0, weights, lc.focal_gamma, lc.focal_alpha).to(device)

    train_model: nn.Module = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)

    meta = CheckpointMeta(architecture=cfg.model.name, num_classes=k, classes=classes,
                          display_names=ls.display_names, preprocess=preprocess,
                          model_kwargs=model_kwargs(cfg.model), stain=stain_meta, tta=cfg.evaluate.tta,
                          split={"file": "split.json", "groups": split.groups, "seed": split.seed,
                                 "ratios": split.ratios, "group_by": split.group_by, "fold": split.fold,
                                 "sizes": {n: len(getattr(split, n)) for n in ("train", "val", "test")}},
                          config=cfg.to_dict())

    monitor = cfg.train.monitor
    if monitor not in ("val_macro_f1", "val_loss", "val_accuracy", "val_balanced_accuracy"):
        raise TrainingConfigError(f"monitor {monitor!r}: use val_macro_f1, val_loss, val_accuracy or val_balanced_accuracy")
    higher = not monitor.endswith("loss")
    frozen_epochs = cfg.train.two_phase.frozen_epochs
    epochs = cfg.train.epochs

    def start_phase(phase: int) -> tuple[torch.optim.Optimizer, Any]:
        unfreeze_all(model)
        if phase == 1:
            freeze_backbone(model, fraction=1.0)
            lr, n = cfg.train.lr, frozen_epochs
        else:
            apply_freeze(model, cfg.model)
            lr = cfg.train.lr * (cfg.train.two_phase.lr_scale if frozen_epochs else 1.0)
            n = epochs - frozen_epochs
        opt = build_optimizer(model.parameters(), cfg, lr)
        return opt, build_scheduler(opt, cfg, n)

    optimizer, scheduler = start_phase(1 if frozen_epochs else 2)
    logger = _EpochLog(run_dir, is_main)
    best_value, best_epoch, bad_epochs = None, -1, 0
    stop_reason = "epochs done"
    for epoch in range(epochs):
        if frozen_epochs and epoch == frozen_epochs:
            log.info("phase 2: all layers at lr %.2e", cfg.train.lr * cfg.train.two_phase.lr_scale)
            optimizer, scheduler = start_phase(2)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        tr = train_one_epoch(train_model, train_loader, loss_fn, optimizer, ctx, epoch, k,
                             cfg.augment.mixup_alpha, cfg.train.log_every, progress, set_frozen_norm_eval)
        row: dict[str, Any] = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                               "train_loss": tr["loss"], "train_accuracy": tr["accuracy"],
                               "train_images_per_s": tr["images_per_s"]}
        row.update(_val_metrics(model, val_loader, ctx, eval_loss, classes) if is_main else {})
        row = _broadcast(row)
        value = row.get(monitor, -row["train_loss"] if higher else row["train_loss"])
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(value)
        else:
            scheduler.step()
        improved = best_value is None or (value > best_value if higher else value < best_value)
        if improved:
            best_value, best_epoch, bad_epochs = value, epoch, 0
            if is_main:
                meta.epoch = epoch
                meta.metrics = {k2: v for k2, v in row.items() if k2 != "epoch"}
                save_checkpoint(model, run_dir / "best", meta)
        else:
            bad_epochs += 1
        row["best"] = improved
        logger.write(row)
        if on_epoch is not None:
            on_epoch(row)
        log.info("epoch %d: train loss %.4f acc %.3f | %s", epoch, tr["loss"], tr["accuracy"],
                 ", ".join(f"{k2} {v:.4f}" for k2, v in row.items() if k2.startswith("val_")))
        if cfg.train.early_stopping_patience and bad_epochs >= cfg.train.early_stopping_patience:
            stop_reason = f"early stopping after {bad_epochs} epochs without {monitor} improving"
            break
        if cfg.train.max_minutes and (time.perf_counter() - t0) / 60 > cfg.train.max_minutes:
            stop_reason = f"time budget of {cfg.train.max_minutes} min reached"
            break
    logger.close()
    log.info("training stopped: %s (best %s %s at epoch %d)", stop_reason, monitor, best_value, best_epoch)

    report: dict[str, Any] = {}
    logits: dict[str, np.ndarray] = {}
    if is_main:
        meta.epoch = best_epoch
        save_checkpoint(model, run_dir / "last", CheckpointMeta(**{**meta.to_dict(), "epoch": epoch}))
        from core.checkpoint import load_checkpoint

        best_model, best_meta = load_checkpoint(run_dir / "best", device)
        if ctx.channels_last:
            best_model.to(memory_format=torch.channels_last)
        plot_history(logger.rows, run_dir / "history.png")
        report = evaluate_model(
            best_model, classes, preprocess, normalizer, {"val": subsets["val"], "test": subsets["test"]},
            run_dir, ctx, calibrate=cfg.evaluate.calibrate, tsne=cfg.evaluate.tsne,
            batch_size=cfg.evaluate.batch_size, num_workers=d.num_workers, seed=cfg.seed, tta=cfg.evaluate.tta,
            bootstrap=cfg.evaluate.bootstrap, logits_out=logits,
            extra={"name": cfg.name, "architecture": cfg.model.name, "checkpoint": "best.safetensors",
                   "data": ls.source, "split_groups": split.groups, "best_epoch": best_epoch,
                   "stop_reason": stop_reason, "code_revision": best_meta.code_revision,
                   "train_seconds": time.perf_counter() - t0,
                   "parameters": sum(p.numel() for p in model.parameters())})
        report["plots"]["training history"] = "history.png"
        best_meta.temperature = report.get("temperature")
        best_meta.metrics = {**best_meta.metrics, **{
            f"{s}_{key}": m[key] for s, m in report["splits"].items()
            for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc")}}
        save_checkpoint(best_model, run_dir / "best", best_meta)
        from core.metrics import write_report

        report["total_seconds"] = time.perf_counter() - t0
        write_report(run_dir, report, classes)
    report = _broadcast(report)
    if dist.is_initialized():
        dist.barrier()
    return RunResult(run_dir, run_dir / "best.safetensors", report, logger.rows, time.perf_counter() - t0, logits)


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``torchrun -m core.train --recipe R [--set k=v ...]``."""
    p = argparse.ArgumentParser(description="Train a classifier from a recipe (DDP under torchrun).")
    p.add_argument("--recipe", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.INFO if rank0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = run_training(load_config(args.recipe, args.overrides))
    if int(os.environ.get("RANK", "0")) == 0:
        test = result.report.get("splits", {}).get("test", {})
        log.info("done: %s, test macro-F1 %s", result.run_dir, test.get("macro_f1"))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
