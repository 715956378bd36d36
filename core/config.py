"""Typed training configuration, loaded from ``recipes/*.yaml`` with ``--set key=value`` overrides.

Every field has a default, so a recipe names only what differs. Unknown keys are errors (a typo
in a recipe must not silently train something else), and :func:`validate_config` refuses a
choice that names nothing (an optimizer, scheduler, monitor... that does not exist) before a run
starts. ``to_dict`` gives the resolved config, which each run saves as ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from core.errors import GlomError

__all__ = ["ConfigError", "TrainConfig", "DataConfig", "SplitConfig", "ModelConfig", "FreezeConfig",
           "PreprocessConfig", "StainConfig", "AugmentConfig", "OptimConfig", "SchedulerConfig",
           "LossConfig", "TwoPhaseConfig", "EvalConfig", "load_config", "apply_overrides",
           "config_from_dict", "TrainingConfigError", "validate_config"]


class ConfigError(GlomError, ValueError):
    """A recipe or override is malformed; the message names the key."""


class TrainingConfigError(GlomError, ValueError):
    """A training setting cannot be used as given (optimizer, scheduler, monitor...)."""


@dataclass
class SplitConfig:
    ratios: list[float] = field(default_factory=lambda: [0.6, 0.2, 0.2])  # 2 values: train/test (7:3)
    group_by: str = "slide"  # slide | patient | centre | none
    seed: int = 0
    kfold: int = 0  # > 1: k-fold; run fold ``fold``
    fold: int = 0
    file: str = ""  # reuse a saved split.json


@dataclass
class DataConfig:
    kind: str = "csv"  # store | folder | csv | jsonl
    path: str = ""  # CSV/JSONL file or class folder; ``$SHARED`` expands to the shared data folder
    root: str = ""  # where relative image paths resolve (default: the file's folder)
    dataset: str = ""  # store dataset name
    label_source: str = "majority"  # majority | adjudicated | final | annotator:NAME
    db_url: str | None = None
    classes: list[str] = field(default_factory=list)  # class order (default sorted / schema)
    split: SplitConfig = field(default_factory=SplitConfig)
    cache: bool = True  # keep decoded (stain-normalised) crops in memory
    num_workers: int = 0
    max_images: int = 0  # > 0: use a stratified subset (smoke runs)
    centre_pattern: str = ""  # regex on the slide id giving its centre (group 1), e.g. "^([^_]+)_"


@dataclass
class FreezeConfig:
    fraction: float | None = None  # 0, 0.25, 0.75, 1.0 of the backbone's parameters
    stages: int | None = None  # stem + first N stages
    conv_layers: int | None = None  # first N convolutions


@dataclass
class ModelConfig:
    name: str = "resnet18"  # any timm name, or a custom one from models/
    pretrained: bool = False
    pretrained_file: str = ""  # local .safetensors/.pth(weights only) to load instead of the hub
    drop_rate: float = 0.0  # dropout before the classifier
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class StainConfig:
    method: str = "none"  # none | macenko | vahadane
    reference: str = ""  # one reference image (all stains)
    references: dict[str, str] = field(default_factory=dict)  # per stain, e.g. {PAS: ..., HE: ...}


@dataclass
class PreprocessConfig:
    input_size: int = 0  # 0: the model's own (224; 299 for Inception)
    scaling: str = "imagenet"  # imagenet (mean/std) | unit ([0, 1])
    interpolation: str = "bilinear"
    stain: StainConfig = field(default_factory=StainConfig)


@dataclass
class AugmentConfig:
    rotate_degrees: float = 0.0  # uniform rotation in ±degrees (180: any angle)
    rotate90: bool = False  # random multiple of 90°
    hflip: float = 0.0
    vflip: float = 0.0
    crop_scale: float = 0.0  # random resized crop keeping ≥ this area fraction (0.8); 0 = off
    gaussian_noise: float = 0.0  # σ on the [0, 1] scale
    color_jitter: float = 0.0  # brightness/contrast/saturation strength
    hue_jitter: float = 0.0
    hed_jitter: float = 0.0  # per-stain concentration scale/shift strength (Tellez et al.: 0.05 light, 0.2 strong)
    randstain: float = 0.0  # probability of RandStainNA-style LAB re-staining towards a random training stain
    randstain_std: float = 1.0  # spread of the drawn LAB statistics, in units of their training spread
    grayscale: float = 0.0  # probability of a grey image (3 equal channels)
    blur: float = 0.0  # probability of a Gaussian blur (σ 0.1–1.5 px): focus differences between scanners
    jpeg: float = 0.0  # probability of JPEG re-compression at quality 30–90: scanner/archive artefacts
    mixup_alpha: float = 0.0  # batch MixUp (seed 000: 0.2)
    same_class_mix_p: float = 0.0  # probability of same-class mixup per image (seed 003)
    same_class_mix_alpha: float = 0.4
    balanced_sampling: bool = False


@dataclass
class SchedulerConfig:
    name: str = "cosine"  # cosine | multistep | step | plateau | none
    milestones: list[int] = field(default_factory=lambda: [60, 120, 160])
    gamma: float = 0.1
    step_size: int = 10
    patience: int = 7
    factor: float = 0.5
    warmup_epochs: int = 0
    min_lr: float = 0.0


@dataclass
class LossConfig:
    name: str = "cross_entropy"  # cross_entropy | focal
    label_smoothing: float = 0.0
    class_weights: Any = "auto"  # "auto" (balanced when classes are skewed ≥ 1.5:1) | None | "balanced" | list
    focal_gamma: float = 2.0
    focal_alpha: list[float] | None = None  # per class; None: class_weights


@dataclass
class TwoPhaseConfig:
    frozen_epochs: int = 0  # > 0: train only the head this many epochs first
    lr_scale: float = 0.1  # then all layers at lr × lr_scale


@dataclass
class OptimConfig:
    epochs: int = 10
    batch_size: int = 32
    optimizer: str = "adamw"  # adamw | adam | sgd
    lr: float = 1e-3
    weight_decay: float = 0.01
    momentum: float = 0.9
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    two_phase: TwoPhaseConfig = field(default_factory=TwoPhaseConfig)
    early_stopping_patience: int = 0  # 0: off
    monitor: str = "val_macro_f1"  # val_macro_f1 | val_loss | val_accuracy | val_balanced_accuracy
    max_minutes: float = 0.0  # > 0: stop after this wall time (checked per epoch)
    amp: bool = True  # CUDA only
    channels_last: bool = True  # CUDA only
    cudnn_benchmark: bool = True
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch CPU threads; 0: torch's default
    log_every: int = 10  # batches between progress-bar updates of the running metrics


@dataclass
class EvalConfig:
    tsne: bool = True
    calibrate: bool = True
    batch_size: int = 64
    tta: bool = False  # average the 8 dihedral views (rotations × flip) at evaluation and prediction
    bootstrap: int = 1000  # resamples of slides for the 95 % intervals of `glom cv` / `glom evaluate`


@dataclass
class TrainConfig:
    name: str = "run"
    seed: int = 0
    output_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not fit {tp}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in values.items()}
    return cls(**kwargs)


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """Build a :class:`TrainConfig`, checking key names and value types."""
    return _build(TrainConfig, d or {}, "")


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = d
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = value
    return d


def read_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """A recipe file (or nothing: defaults) as a nested dict, ``--set`` overrides applied; every
    recipe kind (classifier, detector) reads its file here."""
    d: dict[str, Any] = {}
    if path:
        try:
            d = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise ConfigError(f"cannot read recipe {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {path} is not valid YAML: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"recipe {path} must be a YAML mapping")
    return apply_overrides(d, overrides or [])


def build_config(cls: type, d: dict[str, Any]) -> Any:
    """An instance of the dataclass ``cls`` from ``d``, checking key names and value types."""
    return _build(cls, d or {}, "")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a classifier recipe (or start from defaults) and apply ``--set`` overrides."""
    return config_from_dict(read_recipe(path, overrides))


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
