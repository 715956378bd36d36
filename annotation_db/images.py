"""Image files of the store and the checks on their paths.

What a crop may be is checked before anything is decoded (:func:`read_image_meta`: the type from
the first bytes, the size in bytes from the file system, the pixel size from the header, within
:class:`ImageLimits`), and a path relative to a dataset's root cannot leave that root
(:func:`resolve_in_root`, :func:`normalize_rel_path`).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image as PILImage
from PIL import UnidentifiedImageError

from annotation_db.db import StoreError
from annotation_db.models import Dataset, Image

# file suffixes a folder scan takes for crops
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


class ImageFileError(StoreError):
    """An image file is missing, unreadable, or outside the dataset's root."""


class ImageTooLargeError(ImageFileError):
    """An image has more bytes or pixels than a crop may (a slide, or a decompression bomb)."""


@dataclass(frozen=True)
class ImageLimits:
    """What one crop may be, checked before anything is decoded. The viewer's upload limits by
    default; ``GLOM_IMPORT_MAX_BYTES`` and ``GLOM_IMPORT_MAX_PIXELS`` change them."""

    max_bytes: int = 25 * 1024 * 1024
    max_pixels: int = 40_000_000  # e.g. 6300 × 6300: far above any glomerulus crop
    max_side_px: int = 16_384

    @classmethod
    def from_env(cls) -> ImageLimits:
        def number(name: str, default: int) -> int:
            raw = os.environ.get(name, "").strip()
            if not raw:
                return default
            try:
                return int(float(raw))
            except ValueError:
                raise StoreError(f"{name}={raw!r} is not a number") from None

        return cls(number("GLOM_IMPORT_MAX_BYTES", cls.max_bytes), number("GLOM_IMPORT_MAX_PIXELS", cls.max_pixels))


# magic bytes of the image types a crop may be
_IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"), (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"),
                (b"BM", "bmp"))


def sniff_image_type(head: bytes) -> str | None:
    """png, jpeg, tiff, bmp or webp as the file's first bytes announce it (names are not trusted)."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return next((kind for magic, kind in _IMAGE_MAGIC if head.startswith(magic)), None)


@dataclass
class ImageMeta:
    sha256: str
    width: int
    height: int


def read_image_meta(path: Path, limits: ImageLimits | None = None) -> ImageMeta:
    """sha256 of the file's bytes and its pixel size, within ``limits`` (default: from the
    environment, see :class:`ImageLimits`).

    Nothing large is read before it is known to be an image of an acceptable size: the type comes
    from the first bytes, the size in bytes from the file system, the pixel size from the header;
    then the bytes are hashed in a stream. Raises :class:`ImageTooLargeError` over the limits and
    :class:`ImageFileError` for anything that is not a readable PNG, JPEG or TIFF.
    """
    limits = limits or ImageLimits.from_env()
    try:
        with path.open("rb") as f:
            head = f.read(16)
            size_bytes = os.fstat(f.fileno()).st_size
            kind = sniff_image_type(head)
            if kind is None:
                raise ImageFileError(f"{path}: not an image (its first bytes are not those of a PNG, JPEG or TIFF file)")
            if size_bytes > limits.max_bytes:
                raise ImageTooLargeError(f"{path}: {size_bytes / 2**20:.1f} MiB is over the limit of "
                                         f"{limits.max_bytes / 2**20:.0f} MiB for one crop (GLOM_IMPORT_MAX_BYTES)")
            f.seek(0)
            width, height = _header_size(path, f, limits)
            f.seek(0)
            digest = hashlib.sha256()
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except FileNotFoundError:
        raise ImageFileError(f"{path}: file not found") from None
    except OSError as e:
        raise ImageFileError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    return ImageMeta(digest.hexdigest(), width, height)


def _header_size(path: Path, f, limits: ImageLimits) -> tuple[int, int]:  # noqa: ANN001 - a binary file
    """(width, height) from the image header, refusing more pixels than ``limits`` allow."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)  # our limit decides
            with PILImage.open(f) as im:
                width, height = im.size
    except PILImage.DecompressionBombError:
        width = height = None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ImageFileError(f"{path}: not an image PIL can read (expected PNG, JPEG or TIFF)") from None
    if width is None or width * height > limits.max_pixels or max(width, height) > limits.max_side_px:
        shown = "far too many pixels" if width is None else f"{width}×{height} pixels"
        raise ImageTooLargeError(
            f"{path}: {shown} is over the limit of {limits.max_pixels / 1e6:.0f} megapixels or "
            f"{limits.max_side_px} px a side for one crop (GLOM_IMPORT_MAX_PIXELS); cut crops from slides with "
            "`glom extract`")
    return width, height


# --- paths under a dataset's root ------------------------------------------------------------


@lru_cache(maxsize=64)
def _resolved_root(root: str) -> Path:
    return Path(root or ".").resolve()


def resolve_in_root(dataset: Dataset, rel_path: str) -> Path:
    """Absolute path of ``rel_path`` under the dataset's root; refuses paths that escape it.

    The check is on the normalised text (``..``, absolute paths): a data tree reached through a
    symbolic link stays usable, and the check costs no file-system call per image.
    """
    root = _resolved_root(dataset.root)
    norm = posixpath.normpath(rel_path.replace("\\", "/"))
    if norm == ".." or norm.startswith("../") or posixpath.isabs(norm):
        raise ImageFileError(f"{rel_path}: resolves outside the data root {root}")
    return root / norm


def normalize_rel_path(dataset: Dataset, path: str | Path) -> str:
    """A POSIX path relative to the dataset root (absolute paths must lie inside the root)."""
    text = str(path)
    if posixpath.isabs(text) or os.path.isabs(text):
        root = _resolved_root(dataset.root)
        rp = Path(text).resolve()
        if not rp.is_relative_to(root):
            raise ImageFileError(f"{path}: outside the data root {root}")
        text = rp.relative_to(root).as_posix()
    resolve_in_root(dataset, text)
    return posixpath.normpath(text.replace("\\", "/"))


def image_abspath(dataset: Dataset, image: Image) -> Path:
    return Path(dataset.root or ".") / image.path
