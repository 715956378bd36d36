"""Slide-grouped train/val/test splits and k folds of a :class:`~core.labeled_sets.LabeledSet`.

Splits keep every slide (or patient, or centre) inside one split, are stratified by class as well
as the groups allow, and are fully determined by the seed; :class:`Split` is saved with each run
as ``split.json``.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from core.labeled_sets import DataError, LabeledSet, Sample

log = logging.getLogger(__name__)

__all__ = ["Split", "kfold_grouped", "split_grouped"]


@dataclass
class Split:
    """Which images train, validate and test; saved as ``split.json`` beside the checkpoint."""

    train: list[str]
    val: list[str]
    test: list[str]
    seed: int
    ratios: list[float]
    group_by: str = "slide"
    fold: int | None = None
    n_folds: int | None = None
    groups: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Split:
        return cls(**d)

    def save(self, path: str | Path) -> None:
        """Write the split as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> Split:
        """Read a split written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def subsets(self, ls: LabeledSet) -> dict[str, list[Sample]]:
        """The samples of each split, in split order; unknown paths raise :class:`DataError`."""
        by_path = {s.path: s for s in ls.samples}
        out = {}
        for name in ("train", "val", "test"):
            paths = getattr(self, name)
            missing = [p for p in paths if p not in by_path]
            if missing:
                raise DataError(f"split lists {len(missing)} images not in the data, e.g. {missing[0]}")
            out[name] = [by_path[p] for p in paths]
        return out


def _assign_groups(labels: np.ndarray, groups: Sequence[str], ratios: Sequence[float],
                   seed: int) -> list[int]:
    """Greedy stratified assignment of whole groups to splits; returns the split of each group."""
    names = sorted(set(groups))
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    counts = {g: np.zeros(n_classes) for g in names}
    for lab, g in zip(labels, groups):
        counts[g][lab] += 1
    rng = random.Random(seed)
    rng.shuffle(names)
    # Big groups first: they are the hard ones to place; ties keep the seeded shuffle.
    names.sort(key=lambda g: -counts[g].sum())
    r = np.asarray(ratios, dtype=float) / sum(ratios)
    total = np.bincount(labels, minlength=n_classes).astype(float)
    target = r[:, None] * total[None, :]
    have = np.zeros_like(target)
    split_of: dict[str, int] = {}
    for g in names:
        best, best_cost = 0, None
        for s in range(len(r)):
            trial = have.copy()
            trial[s] += counts[g]
            # Relative shortfall/excess per class, plus the split's overall size.
            cost = (((trial - target) / np.maximum(total, 1)) ** 2).sum() \
                + (((trial.sum(1) - target.sum(1)) / max(total.sum(), 1)) ** 2).sum()
            if best_cost is None or cost < best_cost - 1e-12:
                best, best_cost = s, cost
        have[best] += counts[g]
        split_of[g] = best
    return [split_of[g] for g in groups]


def split_grouped(ls: LabeledSet, ratios: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0,
                  group_by: str = "slide") -> Split:
    """Stratified train/val/test split that never puts one slide (or patient) in two splits.

    ``ratios`` has two (train, test; val is then empty, as in the 7:3 recipe) or three values.
    """
    if len(ratios) not in (2, 3) or any(x < 0 for x in ratios) or sum(ratios) <= 0:
        raise DataError(f"ratios must be 2 or 3 non-negative numbers, got {list(ratios)}")
    groups = ls.groups(group_by)
    n_groups = len(set(groups))
    wanted = sum(1 for x in ratios if x > 0)
    if n_groups < wanted:
        raise DataError(f"{n_groups} {group_by}s cannot fill {wanted} splits; label more slides or use group_by: none")
    labels = np.asarray(ls.labels)
    assignment = _assign_groups(labels, groups, ratios, seed)
    parts: list[list[str]] = [[] for _ in ratios]
    part_groups: list[set[str]] = [set() for _ in ratios]
    for s, a, g in zip(ls.samples, assignment, groups):
        parts[a].append(s.path)
        part_groups[a].add(g)
    if len(ratios) == 2:
        parts = [parts[0], [], parts[1]]
        part_groups = [part_groups[0], set(), part_groups[1]]
    r3 = list(ratios) if len(ratios) == 3 else [ratios[0], 0.0, ratios[1]]
    empty = [n for n, p, r in zip(("train", "val", "test"), parts, r3) if not p and r > 0]
    if empty:
        raise DataError(f"split {empty} came out empty: too few {group_by}s for ratios {list(ratios)}")
    named = {n: sorted(g for g in pg if not g.startswith("__image_"))
             for n, pg in zip(("train", "val", "test"), part_groups)}
    split = Split(parts[0], parts[1], parts[2], seed, [float(x) for x in ratios], group_by, groups=named)
    _log_split(ls, split)
    return split


def kfold_grouped(ls: LabeledSet, n_folds: int = 5, seed: int = 0, group_by: str = "slide",
                  val_fraction: float = 0.2, val_group_by: str | None = None) -> list[Split]:
    """``n_folds`` grouped, stratified folds; each fold's test part is one fold, val is carved
    from the rest by :func:`split_grouped` (``val_fraction`` of it, 0 for none), grouped by
    ``val_group_by`` (default ``group_by``; folds by centre carve val by slide)."""
    from sklearn.model_selection import StratifiedGroupKFold

    groups = ls.groups(group_by)
    if len(set(groups)) < n_folds:
        raise DataError(f"{len(set(groups))} {group_by}s cannot make {n_folds} folds")
    labels = np.asarray(ls.labels)
    kf = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    out = []
    for k, (rest_idx, test_idx) in enumerate(kf.split(np.zeros(len(labels)), labels, groups)):
        rest = LabeledSet(ls.classes, [ls.samples[i] for i in rest_idx], ls.display_names, ls.source)
        test = [ls.samples[i].path for i in test_idx]
        if val_fraction > 0:
            inner = split_grouped(rest, (1 - val_fraction, val_fraction), seed + k, val_group_by or group_by)
            train, val = inner.train, inner.test
        else:
            train, val = [s.path for s in rest.samples], []
        g_of = dict(zip((s.path for s in ls.samples), groups))
        named = {n: sorted({g_of[p] for p in ps if not g_of[p].startswith("__image_")})
                 for n, ps in (("train", train), ("val", val), ("test", test))}
        out.append(Split(train, val, test, seed, [1 - val_fraction, val_fraction], group_by,
                         fold=k, n_folds=n_folds, groups=named))
    return out


def _log_split(ls: LabeledSet, split: Split) -> None:
    label_of = {s.path: s.label for s in ls.samples}
    for name in ("train", "val", "test"):
        c = Counter(label_of[p] for p in getattr(split, name))
        log.info("%s: %d images, %d groups (%s), per class %s", name, len(getattr(split, name)),
                 len(split.groups.get(name, [])), split.group_by,
                 {ls.classes[i]: c.get(i, 0) for i in range(len(ls.classes))})
