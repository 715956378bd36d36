"""Labeled image sets from the annotation store, a class folder, CSV or JSONL; slide-grouped splits.

A :class:`LabeledSet` is the ordered class schema plus one :class:`Sample` per image. Splits keep
every slide (or patient) inside one split, are stratified by class as well as the groups allow,
and are fully determined by the seed; :class:`Split` is saved with each run as ``split.json``.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, WeightedRandomSampler

from core.errors import GlomError
from core.stain import PerStainNormalizer

log = logging.getLogger(__name__)

__all__ = [
    "DataError", "Sample", "LabeledSet", "Split", "load_from_store", "load_from_folder",
    "load_from_csv", "load_from_jsonl", "load_labeled_set", "split_grouped", "kfold_grouped",
    "ImageDataset", "balanced_sampler", "shared_data_dir", "assign_centres", "GROUP_BY",
]


class DataError(GlomError, ValueError):
    """The labeled data cannot be read or split as asked; the message says what to fix."""


@dataclass(frozen=True)
class Sample:
    """One labeled image: absolute path, class index, and the slide/patient it comes from."""

    path: str
    label: int
    slide: str | None = None
    patient: str | None = None
    stain: str | None = None
    image_id: int | None = None
    centre: str | None = None  # the hospital / scanner site (a CSV column or a slide-id pattern)


@dataclass
class LabeledSet:
    """Class schema (keys, in order; display names) and samples."""

    classes: list[str]
    samples: list[Sample]
    display_names: list[str] = field(default_factory=list)
    source: str = ""

    def __post_init__(self) -> None:
        if not self.display_names:
            self.display_names = list(self.classes)

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]

    def counts(self) -> list[int]:
        """Number of samples per class, in schema order."""
        c = Counter(self.labels)
        return [c.get(i, 0) for i in range(len(self.classes))]

    def groups(self, group_by: str = "slide") -> list[str]:
        """Group name of each sample (``slide``, ``patient``, ``centre`` or ``none``); ungrouped samples stand alone.

        ``patient`` falls back to the slide for samples whose slide records no patient, so a
        slide is never split either way (``glom patients`` fills the patients in). ``centre``
        has no fallback: every sample must have one (:func:`assign_centres`).
        """
        if group_by not in GROUP_BY:
            raise DataError(f"group_by must be one of {', '.join(GROUP_BY)}, not {group_by!r}")
        if group_by == "centre":
            missing = [s.path for s in self.samples if not s.centre]
            if missing:
                raise DataError(f"{len(missing)} of {len(self.samples)} images have no centre, e.g. {missing[0]}: "
                                f"add a `centre` column or set data.centre_pattern (a regex on the slide id)")
            return [f"centre:{s.centre}" for s in self.samples]
        out, no_patient = [], 0
        for i, s in enumerate(self.samples):
            if group_by == "patient":
                g = f"patient:{s.patient}" if s.patient else (f"slide:{s.slide}" if s.slide else None)
                no_patient += not s.patient
            else:
                g = None if group_by == "none" else s.slide
            out.append(g if g is not None else f"__image_{i}")
        if no_patient:
            log.warning("%d of %d images have no patient (grouped by their slide instead): record patients with "
                        "`glom patients FILE.csv`", no_patient, len(self.samples))
        return out


GROUP_BY = ("slide", "patient", "centre", "none")


def assign_centres(ls: LabeledSet, pattern: str = "") -> LabeledSet:
    """Fill each sample's centre from ``pattern``, a regex searched in the slide id (group 1, or the
    whole match). Samples that already have a centre (a CSV column) keep it. ``^([^_]+)_`` gives the
    shared set's ``SAS`` / ``SESCAM`` / ``VUHSK``. A slide the pattern does not match is an error
    naming it (a silently unassigned centre would leak between the training and test side).
    """
    import re

    if not pattern:
        return ls
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise DataError(f"data.centre_pattern {pattern!r} is not a regular expression: {e}") from None
    out = []
    for s in ls.samples:
        if s.centre:
            out.append(s)
            continue
        m = rx.search(s.slide or "")
        if not m:
            raise DataError(f"data.centre_pattern {pattern!r} does not match the slide id {s.slide!r} of {s.path}")
        centre = m.group(1) if rx.groups else m.group(0)
        out.append(replace(s, centre=centre))
    return LabeledSet(ls.classes, out, ls.display_names, ls.source)


def shared_data_dir() -> Path:
    """The shared real-data folder: ``$GLOM_SHARED_DATA`` or ``../shared/data`` beside the repo."""
    import os

    env = os.environ.get("GLOM_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def _single_label(where: str, classes: Sequence[str] | None, index: dict[str, int]) -> int | None:
    if not classes:
        return None
    if len(classes) != 1:
        log.warning("%s: %d classes %s; single-label training skips it", where, len(classes), list(classes))
        return None
    if classes[0] not in index:
        raise DataError(f"{where}: class {classes[0]!r} is not in the schema {list(index)}")
    return index[classes[0]]


def load_from_store(dataset: str, source: str = "majority", db_url: str | None = None) -> LabeledSet:
    """Images of a store dataset with labels from ``source`` (``majority``, ``adjudicated`` or ``annotator:NAME``)."""
    from annotation_db.db import open_store
    from annotation_db.store import get_dataset, labeled_items

    Session = open_store(db_url)
    with Session() as session:
        ds = get_dataset(session, dataset)
        if ds.multi_label:
            log.warning("dataset %s is multi-label; images with more than one class are skipped", dataset)
        keys = [c.key for c in ds.classes]
        names = [c.display_name for c in ds.classes]
        items = labeled_items(session, dataset, source=source)
        stain_of = _slide_stains(session)
    index = {k: i for i, k in enumerate(keys)}
    samples = []
    for it in items:
        label = _single_label(f"image {it.path}", it.classes, index)
        if label is not None:
            samples.append(Sample(it.path, label, it.slide, it.patient,
                                  stain_of.get(it.slide) if it.slide else None, it.image_id))
    if not samples:
        raise DataError(f"dataset {dataset!r} has no single-class labels from source {source!r}")
    return LabeledSet(keys, samples, names, source=f"store:{dataset}:{source}")


def _slide_stains(session) -> dict[str, str]:
    """Slide name → stain (``HE``, ``PAS``; slides marked ``other`` are left out)."""
    from sqlalchemy import select

    from annotation_db.models import Slide

    rows = session.execute(select(Slide.name, Slide.stain)).all()
    return {name: getattr(stain, "value", stain) for name, stain in rows if getattr(stain, "value", stain) != "other"}


def _slide_from_name(path: str) -> str | None:
    """Slide id from a crop name: before the last ``-`` (``SAS_21883_001-10``), else before the
    last ``_`` (the seed labeling system's ``0496052bb_10``); None when neither is there."""
    stem = Path(path).stem
    for sep in ("-", "_"):
        if sep in stem:
            return stem.rsplit(sep, 1)[0]
    return None


def load_from_folder(root: str | Path, slide_from_name: bool = True) -> LabeledSet:
    """A class-per-subfolder tree; the slide comes from the file name when asked (see ``_slide_from_name``).

    Sub-folders whose name starts with ``_`` or ``.`` (masks, caches) are not classes.
    """
    from annotation_db.formats import scan_folder

    root = Path(root).resolve()
    records = [r for r in scan_folder(root, labels_from_subfolders=True)
               if r.classes and not r.classes[0].startswith(("_", "."))]
    keys = sorted({r.classes[0] for r in records if r.classes})
    index = {k: i for i, k in enumerate(keys)}
    samples = [
        Sample(str(root / r.image), index[r.classes[0]], _slide_from_name(r.image) if slide_from_name else None)
        for r in records if r.classes
    ]
    return LabeledSet(keys, samples, source=f"folder:{root}")


def load_from_csv(path: str | Path, root: str | Path | None = None,
                  classes: Sequence[str] | None = None) -> LabeledSet:
    """``image,label[,annotator][,slide]`` or the shared ``path,label,slide_id,mask_path`` file.

    Paths resolve against ``root`` (default: the CSV's folder). Class order is ``classes`` or sorted.
    """
    from annotation_db.formats import read_csv

    path = Path(path)
    base = Path(root) if root else path.parent
    records = [r for r in read_csv(path) if r.classes]
    if any(r.annotator for r in records):
        log.warning("%s has an annotator column; every row is used as its own sample", path)
    keys = list(classes) if classes else sorted({c for r in records for c in r.classes})
    index = {k: i for i, k in enumerate(keys)}
    samples = []
    for r in records:
        label = _single_label(r.where, r.classes, index)
        if label is not None:
            samples.append(Sample(str((base / r.image).resolve()), label, r.slide, r.patient, centre=r.centre))
    return LabeledSet(keys, samples, source=f"csv:{path}")


def load_from_jsonl(path: str | Path, root: str | Path | None = None,
                    class_keys: Sequence[str] | None = None) -> LabeledSet:
    """The seed labeling system's JSONL (one-hot by display name); keys default to the names."""
    from annotation_db.formats import read_jsonl

    path = Path(path)
    base = Path(root) if root else path.parent
    names, records = read_jsonl(path)
    keys = list(class_keys) if class_keys else list(names)
    if len(keys) != len(names):
        raise DataError(f"{len(keys)} class keys given for the {len(names)} classes of {path}")
    index = {n: i for i, n in enumerate(names)}
    samples = []
    for r in records:
        label = _single_label(r.where, r.classes, index)
        if label is not None:
            samples.append(Sample(str((base / r.image).resolve()), label, _slide_from_name(r.image)))
    return LabeledSet(keys, samples, list(names), source=f"jsonl:{path}")


def load_labeled_set(kind: str, path: str = "", root: str = "", dataset: str = "",
                     label_source: str = "majority", db_url: str | None = None,
                     classes: Sequence[str] | None = None) -> LabeledSet:
    """Dispatch on ``kind``: ``store``, ``folder``, ``csv`` or ``jsonl``."""
    if kind == "store":
        ls = load_from_store(dataset, label_source, db_url)
    elif kind == "folder":
        ls = load_from_folder(path or root)
    elif kind == "csv":
        ls = load_from_csv(path, root or None, classes)
    elif kind == "jsonl":
        ls = load_from_jsonl(path, root or None, classes)
    else:
        raise DataError(f"unknown data kind {kind!r}: use store, folder, csv or jsonl")
    missing = [s.path for s in ls.samples if not Path(s.path).is_file()]
    if missing:
        raise DataError(f"{len(missing)} image files are missing, e.g. {missing[0]}")
    if len(ls.samples) == 0:
        raise DataError(f"no labeled images in {ls.source}")
    log.info("%s: %d images, counts %s", ls.source, len(ls.samples), dict(zip(ls.classes, ls.counts())))
    return ls


# --- splits -------------------------------------------------------------------------------


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


# --- torch dataset ------------------------------------------------------------------------


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file to HWC uint8 RGB."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except OSError as e:
        raise DataError(f"cannot read image {path}: {e}") from None


class ImageDataset(Dataset):
    """Samples → (tensor, label). Optional stain normalisation, in-memory cache, same-class mixup.

    ``same_class_mix_p``: probability of blending an image with another image of the same class
    (λ ~ Beta(α, α)) before augmentation; the label is unchanged (seed paper 003).
    """

    def __init__(self, samples: Sequence[Sample], transform: Callable | None = None,
                 stain_normalizer: Callable[[np.ndarray], np.ndarray] | None = None,
                 cache: bool = False, same_class_mix_p: float = 0.0,
                 same_class_mix_alpha: float = 0.4) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.stain_normalizer = stain_normalizer
        self.cache = cache
        self._cache: dict[int, np.ndarray] = {}
        self.same_class_mix_p = same_class_mix_p
        self.same_class_mix_alpha = same_class_mix_alpha
        self._by_class: dict[int, list[int]] = {}
        for i, s in enumerate(self.samples):
            self._by_class.setdefault(s.label, []).append(i)

    def __len__(self) -> int:
        return len(self.samples)

    def load_rgb(self, index: int) -> np.ndarray:
        """The decoded (and stain-normalised) image, HWC uint8."""
        if index in self._cache:
            return self._cache[index]
        sample = self.samples[index]
        rgb = read_rgb(sample.path)
        if isinstance(self.stain_normalizer, PerStainNormalizer):
            rgb = self.stain_normalizer(rgb, sample.stain)
        elif self.stain_normalizer is not None:
            rgb = self.stain_normalizer(rgb)
        if self.cache:
            self._cache[index] = rgb
        return rgb

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        rgb = self.load_rgb(index)
        label = self.samples[index].label
        # torch's generator: DataLoader seeds it per worker and per epoch.
        if self.same_class_mix_p > 0 and torch.rand(()).item() < self.same_class_mix_p:
            peers = self._by_class[label]
            other = self.load_rgb(peers[int(torch.randint(len(peers), ()).item())])
            if other.shape == rgb.shape:
                a = torch.tensor(self.same_class_mix_alpha)
                lam = float(torch.distributions.Beta(a, a).sample())
                rgb = (lam * rgb + (1 - lam) * other).round().astype(np.uint8)
        x = self.transform(rgb) if self.transform is not None else torch.from_numpy(rgb).permute(2, 0, 1)
        return x, label


def balanced_sampler(samples: Sequence[Sample], num_classes: int, seed: int = 0) -> WeightedRandomSampler:
    """Draw classes equally often (with replacement), one epoch = ``len(samples)`` draws."""
    counts = Counter(s.label for s in samples)
    weights = torch.tensor([1.0 / counts[s.label] for s in samples], dtype=torch.double)
    g = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(weights, num_samples=len(samples), replacement=True, generator=g)
