"""The root error for ``core`` and ``app``: ``GlomError`` (defined in ``annotation_db.errors``).

Every named error of the library derives from it, so an entry point catches this one class
instead of a list (see ``annotation_db/errors.py`` for why it is defined one layer down).
"""

from annotation_db.errors import GlomError

__all__ = ["GlomError"]
