"""Server folders a web user may name: everything they type is confined to a configured root.

The labeling app's Import page, the Slide workspace's routes and the viewer's slide picker take
paths from the browser. A path is used only when it resolves (symbolic links followed) inside its
root: ``$GLOM_DATA_ROOT`` (default ``./data``) for imports, ``$GLOM_SLIDES_DIR`` for slides. A refusal
says the same whatever the path is, so it reveals neither a file's content nor whether it exists.
"""

from __future__ import annotations

import os
from pathlib import Path

from annotation_db.paths import is_within
from core.errors import GlomError

__all__ = ["OutsideRootError", "data_root", "slides_root", "confine", "is_within"]


class OutsideRootError(GlomError, ValueError):
    """A path given by a web user lies outside the folder it must stay in."""


def data_root() -> Path:
    """``$GLOM_DATA_ROOT`` (default ``data`` in the working directory), resolved."""
    return Path(os.environ.get("GLOM_DATA_ROOT") or "data").expanduser().resolve()


def slides_root() -> Path | None:
    """The whole-slide folder (``$GLOM_SLIDES_DIR``, else ``../shared/data/wsi``), or None."""
    from core.wsi import default_slides_dir

    folder = default_slides_dir()
    return Path(folder).expanduser().resolve() if folder else None


def confine(text: str | Path, root: str | Path, what: str = "the data folder") -> Path:
    """The resolved path ``text`` names (relative paths start at ``root``), if it lies inside
    ``root``; otherwise :class:`OutsideRootError` with a message that repeats nothing of it."""
    root = Path(root).expanduser().resolve()
    refusal = OutsideRootError(f"refused: only files and folders under {what} on the server ({root}) can be used")
    raw = str(text).strip()
    if not raw or "\x00" in raw:
        raise refusal
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = root / path
    if not is_within(path, root):
        raise refusal
    return path.resolve()
