"""Class schemas: the classes a dataset has, and the one rule that turns label text into a class key.

A schema is an ordered list of :class:`ClassSpec` (key, display name, hotkey);
:data:`GLOMERULUS_CLASSES` is the default one. :func:`validate_classes` checks the class keys of a
label against a dataset's schema.

Label text → class key is what every path that reads class names from a file uses.

A class may be named by its key (``crescent``) or its display name (``新月体形成``, ``Crescent``
when a schema displays it so), in any case and with surrounding spaces: QuPath, ImageScope and
spreadsheets carry what people typed. An exact match wins over a case-insensitive one, so a
schema whose keys differ only in case still resolves each of them. A name that matches no class
raises :class:`UnknownClassError`, with the same message on every path (``glom import``,
``glom extract``, the Slide workspace, the viewer)::

    keys = ClassKeys.of(dataset)
    keys.key("Crescent", where="boxes.csv:3")   # -> "crescent"
    keys.get("Glomerulus")                       # -> None (the viewer shows it as unannotated)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from annotation_db.db import StoreError
from annotation_db.models import Dataset

__all__ = [
    "GLOMERULUS_CLASSES",
    "ClassKeys",
    "ClassSpec",
    "InvalidLabelError",
    "UnknownClassError",
    "default_hotkey",
    "schema_for",
    "validate_classes",
]


class InvalidLabelError(StoreError):
    """A label, class schema or annotator the store refuses (unknown class, two classes on a
    single-label dataset, duplicate keys)."""


@dataclass(frozen=True)
class ClassSpec:
    """One class of a schema: the key labels store, the name people see, its hotkey."""

    key: str
    display_name: str
    hotkey: str | None = None


GLOMERULUS_CLASSES: tuple[ClassSpec, ...] = (
    ClassSpec("normal", "正常肾小球", "1"),
    ClassSpec("segmental_sclerosis", "节段性硬化", "2"),
    ClassSpec("mesangial_proliferation", "系膜细胞增生", "3"),
    ClassSpec("crescent", "新月体形成", "4"),
)


def default_hotkey(position: int) -> str | None:
    """1-9 for the first nine classes, 0 for the tenth, none after."""
    return str(position + 1) if position < 9 else ("0" if position == 9 else None)


def validate_classes(dataset: Dataset, classes: Iterable[str], *, where: str = "") -> list[str]:
    """Class keys checked against the schema and returned in schema order."""
    keys = dataset.class_keys
    wanted = list(dict.fromkeys(classes))
    unknown = [c for c in wanted if c not in keys]
    prefix = f"{where}: " if where else ""
    if unknown:
        raise InvalidLabelError(
            f"{prefix}unknown class {', '.join(map(repr, unknown))} for dataset {dataset.name!r} "
            f"(its classes: {', '.join(keys)})"
        )
    if not dataset.multi_label and len(wanted) > 1:
        raise InvalidLabelError(
            f"{prefix}dataset {dataset.name!r} is single-label but got {len(wanted)} classes {wanted}"
        )
    return [k for k in keys if k in wanted]



class _Class(Protocol):
    key: str
    display_name: str


class UnknownClassError(InvalidLabelError):
    """A class name that is neither a key nor a display name of the schema."""

    def __init__(self, message: str, label: str) -> None:
        super().__init__(message)
        self.label = label


def _fold(text: str) -> str:
    return text.strip().casefold()


class ClassKeys:
    """The class keys of one schema (a dataset's or a checkpoint's), looked up by key or display name."""

    def __init__(self, classes: Iterable[_Class], owner: str) -> None:
        self.classes: list[tuple[str, str]] = [(c.key, c.display_name) for c in classes]
        self.owner = owner  # "dataset 'glom'": what error messages name
        self._exact: dict[str, str] = {}
        self._folded: dict[str, str] = {}
        for key, display in self.classes:  # keys first: a key is never shadowed by a display name
            self._exact.setdefault(key, key)
            self._folded.setdefault(_fold(key), key)
        for key, display in self.classes:
            self._exact.setdefault(display, key)
            self._folded.setdefault(_fold(display), key)

    @classmethod
    def of(cls, dataset) -> ClassKeys:
        return cls(dataset.classes, f"dataset {dataset.name!r}")

    @property
    def keys(self) -> list[str]:
        return [k for k, _ in self.classes]

    def describe(self) -> str:
        """``key (display name), ...`` as error messages list the classes."""
        return ", ".join(k if d == k else f"{k} ({d})" for k, d in self.classes)

    def get(self, text: str | None) -> str | None:
        """The key ``text`` names, or None (also for no text)."""
        if text is None:
            return None
        return self._exact.get(text.strip()) or self._folded.get(_fold(text))

    def key(self, text: str, *, where: str = "") -> str:
        """The key ``text`` names; :class:`UnknownClassError` naming ``where`` (file:line) otherwise."""
        found = self.get(text)
        if found is None:
            raise UnknownClassError(self.unknown_message(text, where), text)
        return found

    def unknown_message(self, text: str, where: str = "") -> str:
        prefix = f"{where}: " if where else ""
        return f"{prefix}unknown class {text!r} for {self.owner} (its classes: {self.describe()})"


def schema_for(class_names: Sequence[str]) -> list[ClassSpec]:
    """Class schema for a new dataset from the names a file uses, in the file's order.

    When every name is a default glomerulus class (key or display name, by :class:`ClassKeys`'
    rule) the schema is those classes; otherwise each distinct name (ignoring case) becomes a
    class whose key and display name are the name as first written.
    """
    known = ClassKeys(GLOMERULUS_CLASSES, "the glomerulus classes")
    by_key = {c.key: c for c in GLOMERULUS_CLASSES}
    keys = [known.get(n) for n in class_names]
    if class_names and all(keys):
        return [ClassSpec(k, by_key[k].display_name, None) for k in dict.fromkeys(keys)]
    first: dict[str, str] = {}
    for n in class_names:
        first.setdefault(_fold(n), n.strip())
    return [ClassSpec(n, n) for n in first.values()]
