"""``GlomError``: the one root of every named error GlomLab raises.

An entry point (the ``glom`` command, the labeling app, the diagnosis viewer) catches ``GlomError``
and shows its message: the error is one a user can act on (a bad file, a missing class, a run that
diverged). Any other exception is a bug and keeps its traceback.

Why here: the layers run app → core → annotation_db / models, and ``annotation_db`` imports nothing
else from the project, so it is the only home that every layer, ``models`` included, can import
without an edge running upwards. ``models`` imports this module and nothing else from
``annotation_db``; ``core.errors`` re-exports it for ``core`` and ``app``.

Each named error keeps its builtin base next to this one (``class ConfigError(GlomError,
ValueError)``), so callers that catch ``ValueError`` or ``RuntimeError`` keep working.
"""

from __future__ import annotations

__all__ = ["GlomError"]


class GlomError(Exception):
    """Base of every named GlomLab error: the message says what went wrong and what to do."""
