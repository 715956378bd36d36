"""What a training run learns from, built from its config: the labelled crops, their split, the
stain normaliser and RandStainNA statistics fitted on the training part, and the data loaders.

``load_training_set`` and ``make_split`` are shared by ``glom train`` and ``glom cv``; paths in a
recipe go through :func:`resolve_path` (``$SHARED`` is the shared data folder).
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from core.config import TrainConfig
from core.labeled_sets import DataError, LabeledSet, Sample, assign_centres, load_labeled_set, shared_data_dir
from core.splits import Split, kfold_grouped, split_grouped
from core.stain import PerStainNormalizer, create_stain_normalizer, pick_reference
from core.torch_data import ImageDataset, balanced_sampler, read_rgb
from core.transforms import build_eval_transform, build_train_transform, lab_statistics

log = logging.getLogger(__name__)

__all__ = ["TrainLoaders", "build_loaders", "fit_stain_normalizer", "load_training_set", "make_split",
           "resolve_path"]


def resolve_path(p: str) -> str:
    """Expand ``$SHARED`` (the shared data folder), ``~`` and environment variables."""
    if not p:
        return p
    p = p.replace("$SHARED", str(shared_data_dir())).replace("${SHARED}", str(shared_data_dir()))
    return os.path.expanduser(os.path.expandvars(p))


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


def make_split(cfg: TrainConfig, ls: LabeledSet) -> Split:
    """The split ``cfg.data.split`` asks for: a saved ``split.json``, one fold of k, or train/val/test."""
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


def fit_stain_normalizer(cfg: TrainConfig, train: list[Sample]) -> tuple[Any, dict | None]:
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


@dataclass
class TrainLoaders:
    """The training loader (and its sampler, reseeded per epoch under DDP) and the validation one."""

    train: DataLoader
    sampler: Sampler | None
    val: DataLoader | None


def build_loaders(cfg: TrainConfig, subsets: dict[str, list[Sample]], num_classes: int, preprocess: dict[str, Any],
                  normalizer: Any, device: torch.device, world: int) -> TrainLoaders:
    """Augmented, optionally class-balanced training batches and plain validation batches."""
    d, aug = cfg.data, cfg.augment
    stain_stats = _lab_stats(subsets["train"], preprocess, normalizer, cfg.seed) if aug.randstain > 0 else None
    train_ds = ImageDataset(subsets["train"], build_train_transform(preprocess, aug, stain_stats), normalizer,
                            cache=d.cache, same_class_mix_p=aug.same_class_mix_p,
                            same_class_mix_alpha=aug.same_class_mix_alpha)
    if world > 1:
        sampler = DistributedSampler(train_ds, shuffle=True, seed=cfg.seed)
    elif aug.balanced_sampling:
        sampler = balanced_sampler(subsets["train"], num_classes, cfg.seed)
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
    return TrainLoaders(train_loader, sampler, val_loader)
