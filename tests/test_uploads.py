"""Upload checks: content sniffing, byte and pixel limits, decompression bombs, damaged files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from core.uploads import UploadError, UploadLimits, check_upload, check_upload_bytes, sniff_image_type


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt,kind", [("PNG", "png"), ("JPEG", "jpeg"), ("TIFF", "tiff"), ("BMP", "bmp"),
                                      ("WEBP", "webp")])
def test_accepted_types_decode_to_rgb(fmt, kind):
    img = Image.fromarray(np.full((20, 30, 3), 200, np.uint8))
    out = check_upload_bytes(_encode(img, fmt), f"crop.{kind}")
    assert out.kind == kind and out.rgb.shape == (20, 30, 3) and out.rgb.dtype == np.uint8
    assert len(out.sha256) == 64 and out.suffix.startswith(".")


def test_grey_and_rgba_become_rgb():
    out = check_upload_bytes(_encode(Image.new("LA", (8, 8)), "PNG"))
    assert out.rgb.shape == (8, 8, 3)


def test_names_are_not_trusted():
    assert sniff_image_type(b"GIF89a....") is None
    with pytest.raises(UploadError, match="checked by content"):
        check_upload_bytes(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "crop.png")
    with pytest.raises(UploadError, match="empty"):
        check_upload_bytes(b"", "crop.png")


def test_limits_on_bytes_pixels_and_bombs(tmp_path):
    png = _encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(UploadError, match="MB limit"):
        check_upload_bytes(png, limits=UploadLimits(max_bytes=100))
    with pytest.raises(UploadError, match="megapixels"):
        check_upload_bytes(png, limits=UploadLimits(max_pixels=5_000))
    bomb = _encode(Image.new("1", (12_000, 12_000)), "PNG")  # tiny file, 144 megapixels
    assert len(bomb) < 300_000
    with pytest.raises(UploadError, match="megapixels|decompression bomb"):
        check_upload_bytes(bomb)
    big = tmp_path / "big.png"
    big.write_bytes(png)
    with pytest.raises(UploadError, match="MB limit"):
        check_upload(big, UploadLimits(max_bytes=100))  # refused before reading


def test_damaged_files_say_so():
    png = _encode(Image.new("RGB", (64, 64), (10, 200, 30)), "PNG")
    with pytest.raises(UploadError, match="damaged or truncated"):
        check_upload_bytes(png[:60], "cut.png")
    with pytest.raises(UploadError, match="damaged or truncated|decodes as"):
        check_upload_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, "fake.png")
