"""Custom architectures, registered into timm on import.

After ``import models`` they are created like any timm model::

    timm.create_model("se_resnet50_factorized", num_classes=4, drop_rate=0.5)

- ``se_resnet50_factorized`` (seed 003), ``ds_resnet50`` (seed 001), ``resnetv2_50_attn`` (seed 002)
- ``googlenet``, ``shufflenetv2_x1_0``: torchvision baselines of seed 001
"""

from models import ds_resnet, resnetv2_attn, se_resnet_factorized, torchvision_baselines  # noqa: F401
from models.freeze import FreezeError, freeze_backbone, set_frozen_norm_eval, unfreeze_all

CUSTOM_MODELS = ("se_resnet50_factorized", "ds_resnet50", "resnetv2_50_attn", "googlenet",
                 "shufflenetv2_x1_0")

__all__ = ["CUSTOM_MODELS", "FreezeError", "freeze_backbone", "set_frozen_norm_eval", "unfreeze_all"]
