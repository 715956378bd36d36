"""Whether a path stays inside a folder once symbolic links are followed (imports from the web)."""

from __future__ import annotations

from pathlib import Path


def is_within(path: str | Path, root: str | Path) -> bool:
    """Whether ``path`` resolves (links followed) to ``root`` or something under it."""
    try:
        return Path(path).resolve().is_relative_to(Path(root).resolve())
    except (OSError, RuntimeError, ValueError):  # a name too long, a link loop, a NUL byte
        return False
