"""Checking uploaded crops before anything decodes them: type by magic bytes, byte and pixel limits.

A crop is a few hundred pixels a side; the limits leave room for large crops while refusing
decompression bombs (a small file that expands to gigapixels) and files that are not images.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from core.errors import GlomError

__all__ = ["UploadError", "UploadLimits", "CheckedImage", "sniff_image_type", "check_upload",
           "check_upload_bytes", "ALLOWED_TYPES"]

# magic bytes → type name, and the PIL format that must agree with it
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"BM", "bmp"),
)
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF", "bmp": "BMP", "webp": "WEBP"}
ALLOWED_TYPES = tuple(_PIL_FORMATS)
SUFFIX = {"png": ".png", "jpeg": ".jpg", "tiff": ".tif", "bmp": ".bmp", "webp": ".webp"}


class UploadError(GlomError, ValueError):
    """An upload that is not an acceptable image; the message says why, in the clinician's terms."""


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int = 25 * 1024 * 1024
    max_pixels: int = 40_000_000  # e.g. 6300 × 6300: far above any glomerulus crop
    max_side_px: int = 16_384


@dataclass
class CheckedImage:
    """A decoded, checked upload: HWC uint8 RGB plus what identifies the file."""

    rgb: np.ndarray
    kind: str  # png, jpeg, tiff, bmp, webp
    sha256: str
    data: bytes
    name: str = ""

    @property
    def suffix(self) -> str:
        return SUFFIX[self.kind]


def sniff_image_type(head: bytes) -> str | None:
    """The image type the first bytes announce, or None (file names and MIME types are not trusted)."""
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def check_upload_bytes(data: bytes, name: str = "upload", limits: UploadLimits = UploadLimits()) -> CheckedImage:
    """Validate and decode ``data``; raises :class:`UploadError` with an actionable message."""
    label = Path(name).name or "upload"
    if len(data) == 0:
        raise UploadError(f"{label}: the file is empty")
    if len(data) > limits.max_bytes:
        raise UploadError(f"{label}: {len(data) / 1e6:.1f} MB is over the {limits.max_bytes / 1e6:.0f} MB limit "
                          "for one crop")
    kind = sniff_image_type(data[:16])
    if kind is None:
        raise UploadError(f"{label}: not a PNG, JPEG, TIFF, BMP or WebP image (checked by content, not name)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if im.format != _PIL_FORMATS[kind]:
                    raise UploadError(f"{label}: content says {kind} but decodes as {im.format}")
                w, h = im.size  # header only: nothing decoded yet
                if w * h > limits.max_pixels or max(w, h) > limits.max_side_px:
                    raise UploadError(f"{label}: {w}×{h} pixels is over the limit of "
                                      f"{limits.max_pixels / 1e6:.0f} megapixels (or {limits.max_side_px} px a side); "
                                      "upload a crop, not a slide")
                if getattr(im, "n_frames", 1) > 1:
                    im.seek(0)
                rgb = np.array(im.convert("RGB"))
    except UploadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UploadError(f"{label}: refused as a decompression bomb (too many pixels for its size)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UploadError(f"{label}: the {kind.upper()} file is damaged or truncated ({type(e).__name__})") from None
    return CheckedImage(rgb, kind, hashlib.sha256(data).hexdigest(), data, label)


def check_upload(path: str | Path, limits: UploadLimits = UploadLimits()) -> CheckedImage:
    """Validate and decode the file at ``path`` (checks the size before reading it)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError:
        raise UploadError(f"{path.name}: the upload could not be read") from None
    if size > limits.max_bytes:
        raise UploadError(f"{path.name}: {size / 1e6:.1f} MB is over the {limits.max_bytes / 1e6:.0f} MB limit "
                          "for one crop")
    return check_upload_bytes(path.read_bytes(), path.name, limits)
