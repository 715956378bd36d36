"""Deep Zoom tiles of the slides folder for the slide workspace, and the tokens that open them.

No web framework here (the routes are :mod:`app.slide_api`); plain functions and one class:

* :class:`TileService` (one per process): ``slide(name)`` opens a slide under the slides root once
  and keeps its :class:`~core.slide_view.DeepZoomTiles` (so its ``DeepZoomGenerator``);
  ``tile(name, level, col, row)`` gives JPEG bytes from a bounded in-memory LRU
  (:class:`TileCache`, by bytes) or encodes ``DeepZoomGenerator.get_tile`` once. A slide name is
  relative to the root and is used only when it resolves (symbolic links followed) to a slide
  file inside it (:func:`core.roots.confine`); a level, column or row outside the pyramid is
  :class:`TileNotFound`; a slide OpenSlide cannot read is :class:`~core.wsi.SlideOpenError` /
  :class:`~core.wsi.SlideReadError` whose message names the slide, never a traceback.
* ``sign_token(user, slide)`` / ``check_token(token, slide)``: a short-lived HMAC token that the
  signed-in Streamlit page embeds in tile and overlay URLs. The routes live in the app's own
  server process, so the key is a per-process random secret unless ``$GLOM_TILE_SECRET`` sets one
  (several server processes behind one address). A token names the user and the one slide it
  opens and expires after one to two hours; it changes at most once an hour, so tile URLs stay
  the same and the browser's cache (``Cache-Control``) keeps working.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import os
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from core.errors import GlomError
from core.roots import OutsideRootError, confine
from core.slide_view import DeepZoomTiles
from core.wsi import (
    SLIDE_SUFFIXES,
    RegionError,
    SlideOpenError,
    SlideReadError,
    open_slide,
)

__all__ = [
    "JPEG_QUALITY",
    "TILE_OVERLAP",
    "TILE_SIZE",
    "SlideInfo",
    "TileCache",
    "TileNotFound",
    "TileService",
    "TokenError",
    "check_token",
    "encode_jpeg",
    "sign_token",
]

TILE_SIZE = 254  # + 2 × overlap = 256 px tiles, the usual Deep Zoom choice
TILE_OVERLAP = 1
JPEG_QUALITY = 85
DEFAULT_CACHE_BYTES = 96 * 2**20  # ~ 6,000 tiles of ~16 kB
TOKEN_BUCKET_S = 3600  # a token changes at most once an hour and lives one to two hours


class TileNotFound(GlomError, LookupError):
    """No such slide under the slides root, or no such tile in its pyramid (HTTP 404)."""


class TokenError(GlomError, PermissionError):
    """A missing, forged, expired, or other slide's token (HTTP 403)."""


def encode_jpeg(img, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of a PIL RGB tile (the one encoder: the tests compare against it)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class TileCache:
    """A thread-safe LRU of ``key -> bytes`` bounded by the total number of bytes it holds."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple, *, count_miss: bool = True) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is None:
                self.misses += count_miss
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return data

    def put(self, key: tuple, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= len(old)
            self._items[key] = data
            self.bytes += len(data)
            while self.bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self.bytes -= len(dropped)


@dataclass(frozen=True)
class SlideInfo:
    """What the viewer needs of a slide: its size, µm/px and Deep Zoom geometry."""

    name: str
    width: int
    height: int
    mpp: float | None
    level_count: int
    tile_size: int
    overlap: int
    offset: tuple[int, int] = (0, 0)  # level-0 (x, y) of Deep Zoom pixel (0, 0): the slide's bounds


class TileService:
    """Deep Zoom JPEG tiles of the slides under ``root`` (one instance per server process)."""

    def __init__(self, root: str | Path, *, cache_bytes: int = DEFAULT_CACHE_BYTES, quality: int = JPEG_QUALITY,
                 tile_size: int = TILE_SIZE, overlap: int = TILE_OVERLAP) -> None:
        self.root = Path(root).expanduser().resolve()
        self.quality = quality
        self.tile_size = tile_size
        self.overlap = overlap
        self.cache = TileCache(cache_bytes)
        self._slides: dict[Path, DeepZoomTiles] = {}
        # names already resolved and opened -> the resolved path's text (the cache key's first part):
        # cached_tile() answers a repeated tile of such a name without touching the disk
        self._named: dict[str, str] = {}
        self._lock = threading.Lock()
        self.opened = 0  # slide handles opened (tests: once per slide per process)

    def resolve(self, name: str) -> Path:
        """The slide file ``name`` (relative to the root) names; :class:`TileNotFound` otherwise,
        with the same message whether the path exists, lies outside the root or is no slide."""
        missing = TileNotFound(f"no slide {name!r} in the slides folder")
        if not name or name.startswith(("/", "\\")) or "\\" in name or any(p in ("", ".", "..") for p in name.split("/")):
            raise missing
        try:
            path = confine(name, self.root, "the slides folder")
        except OutsideRootError:
            raise missing from None
        if not path.is_file() or path.suffix.lower() not in SLIDE_SUFFIXES:
            raise missing  # a slide file OpenSlide then cannot read is SlideOpenError, naming it
        return path

    def slide(self, name: str) -> DeepZoomTiles:
        """The Deep Zoom tiler of slide ``name``, opened on first use and kept for the process."""
        path = self.resolve(name)
        with self._lock:
            tiles = self._slides.get(path)
            if tiles is None:
                reader = open_slide(path)  # SlideOpenError names the file
                tiles = DeepZoomTiles(reader, tile_size=self.tile_size, overlap=self.overlap)
                self._slides[path] = tiles
                self.opened += 1
            self._named[name] = str(path)
            return tiles

    def info(self, name: str) -> SlideInfo:
        tiles = self.slide(name)
        w, h = tiles.generator.level_dimensions[-1]
        props = tiles.slide.properties
        offset = (int(props.get("openslide.bounds-x", 0) or 0), int(props.get("openslide.bounds-y", 0) or 0))
        return SlideInfo(name, w, h, tiles.slide.mpp, tiles.level_count, self.tile_size, self.overlap, offset)

    def dzi_xml(self, name: str) -> str:
        """The ``.dzi`` descriptor of slide ``name``, announcing JPEG tiles."""
        return self.slide(name).generator.get_dzi("jpeg")

    def cached_tile(self, name: str, level: int, col: int, row: int) -> bytes | None:
        """The tile's JPEG bytes if the LRU holds them, else None; no disk access, no decoding (the
        routes answer these inline). Only a name :meth:`slide` resolved and opened before can hit:
        its handle stays open for the process, so its tiles are those of the file confined then."""
        path = self._named.get(name)
        return None if path is None else self.cache.get((path, level, col, row), count_miss=False)

    def tile(self, name: str, level: int, col: int, row: int) -> bytes:
        """JPEG bytes of tile ``(col, row)`` of Deep Zoom level ``level`` of slide ``name``."""
        tiles = self.slide(name)
        key = (self._named[name], level, col, row)
        data = self.cache.get(key)
        if data is not None:
            return data
        try:
            img = tiles.tile_image(level, col, row)
        except RegionError as e:
            raise TileNotFound(str(e)) from None
        data = encode_jpeg(img, self.quality)
        self.cache.put(key, data)
        return data

    def close(self) -> None:
        with self._lock:
            for tiles in self._slides.values():
                tiles.slide.close()
            self._slides.clear()


# --- tokens -------------------------------------------------------------------------------------

_PROCESS_SECRET = secrets.token_bytes(32)


def _secret() -> bytes:
    env = os.environ.get("GLOM_TILE_SECRET")
    return env.encode() if env else _PROCESS_SECRET


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_token(user: str, slide: str, *, now: float | None = None) -> str:
    """A token for ``user`` to read slide ``slide`` (tiles, overlays, decisions) for 1-2 hours."""
    now = time.time() if now is None else now
    expires = (int(now) // TOKEN_BUCKET_S + 2) * TOKEN_BUCKET_S
    payload = f"{user}\n{slide}\n{expires}".encode()
    mac = hmac.new(_secret(), payload, hashlib.sha256).digest()[:18]
    return f"{_b64(payload)}.{_b64(mac)}"


_VERIFIED: dict[tuple[str, str, bytes], tuple[str, int]] = {}  # (token, slide, key) -> (user, expires)
_VERIFIED_MAX = 4096


def check_token(token: str | None, slide: str, *, now: float | None = None) -> str:
    """The user a valid token for ``slide`` was signed for; :class:`TokenError` otherwise. A token
    verified once is remembered (with its expiry, checked on every use) so the tile requests that
    repeat it skip the HMAC; a forged or expired one is never remembered."""
    now = time.time() if now is None else now
    known = _VERIFIED.get((token, slide, _secret())) if token else None
    if known is not None and known[1] >= now:
        return known[0]
    user, expires = _verify(token, slide, now)
    if len(_VERIFIED) >= _VERIFIED_MAX:
        _VERIFIED.clear()  # a bound, not an LRU: tokens change hourly, a refill costs one HMAC each
    _VERIFIED[(token, slide, _secret())] = (user, expires)
    return user


def _verify(token: str | None, slide: str, now: float) -> tuple[str, int]:
    refused = TokenError("sign in to the labeling app to see this slide (missing, invalid or expired link)")
    if not token or "." not in token:
        raise refused
    body, _, mac = token.partition(".")
    try:
        payload, given = _unb64(body), _unb64(mac)
    except (ValueError, TypeError):
        raise refused from None
    if not hmac.compare_digest(hmac.new(_secret(), payload, hashlib.sha256).digest()[:18], given):
        raise refused
    try:
        user, token_slide, expires_text = payload.decode().split("\n")
        expires = int(expires_text)
    except ValueError:
        raise refused from None
    if expires < now or token_slide != slide or not user:
        raise refused
    return user, expires


# Re-exported for the routes: these name the slide and say what is wrong with it.
SLIDE_ERRORS = (SlideOpenError, SlideReadError)
