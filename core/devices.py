"""The one place a device preference (``auto``, ``cpu``, ``cuda``, ``cuda:N``) becomes a torch device.

``auto`` is CUDA when present, else the CPU; a named device is checked before any work starts, so a
GPU asked for on a machine without one is refused at once, not after the data is loaded.
"""

from __future__ import annotations

import torch

from core.errors import GlomError

__all__ = ["DeviceError", "resolve_device"]


class DeviceError(GlomError, ValueError):
    """A device that does not exist or that this machine does not have."""


def resolve_device(pref: str = "auto") -> torch.device:
    """``auto``: CUDA when present, else CPU; otherwise the named device, validated."""
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(pref)
    except RuntimeError as e:
        raise DeviceError(f"unknown device {pref!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {pref!r} was asked for but this machine has no CUDA GPU")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceError(f"device {pref!r} was asked for but this machine has {torch.cuda.device_count()} GPU(s)")
    return dev
