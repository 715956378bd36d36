"""One root error: every exception class the project defines derives from ``GlomError``.

The entry points (``glom``, the labeling app, the viewer) catch ``GlomError`` alone, so an error
class on another root would escape them as a traceback. This test imports every module of the
four packages and checks every exception class defined there.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

from annotation_db.errors import GlomError
from core.errors import GlomError as CoreGlomError

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("annotation_db", "core", "models", "app")
# Modules that do something when imported: app.label runs the Streamlit page, the Alembic
# scripts need a migration context. Their classes are checked from the source instead.
IMPORT_SIDE_EFFECTS = ("app.label", "annotation_db.migrations")


def _module_names() -> list[str]:
    names = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names.append(".".join(parts))
    return names


def _has_side_effects(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in IMPORT_SIDE_EFFECTS)


def _defined_exceptions(module) -> list[type[BaseException]]:
    return [obj for obj in vars(module).values()
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == module.__name__]


def test_core_errors_reexports_the_one_root():
    assert CoreGlomError is GlomError


def test_every_exception_class_derives_from_glom_error():
    found: dict[str, type[BaseException]] = {}
    for name in _module_names():
        if _has_side_effects(name):
            continue
        for cls in _defined_exceptions(importlib.import_module(name)):
            found[f"{name}.{cls.__qualname__}"] = cls
    stray = sorted(q for q, cls in found.items() if not issubclass(cls, GlomError))
    assert not stray, f"exception classes not derived from GlomError: {stray}"
    # The walk reached every layer: these are the errors each entry point relies on catching.
    for expected in ("annotation_db.db.StoreError", "annotation_db.queues.QueueError",
                     "core.engine.TrainingDivergedError", "core.config.ConfigError",
                     "core.wsi.RegionError", "models.freeze.FreezeError", "app.viewer.SignInRequired"):
        assert expected in found, f"{expected} not found among {sorted(found)}"
    assert len(found) >= 30


@pytest.mark.parametrize("cls_path, builtin", [
    ("core.config.ConfigError", ValueError),
    ("core.engine.TrainingDivergedError", RuntimeError),
    ("core.checkpoint.CheckpointError", RuntimeError),
    ("core.wsi.RegionError", ValueError),
    ("models.freeze.FreezeError", ValueError),
])
def test_named_errors_keep_their_builtin_base(cls_path, builtin):
    # Callers written against ``except ValueError`` / ``except RuntimeError`` keep working.
    module, name = cls_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, GlomError) and issubclass(cls, builtin)


def test_modules_not_imported_define_no_exception_classes():
    # What the import walk skips is read from source: a class there whose bases look like an
    # exception would escape the check above.
    for name in _module_names():
        if not _has_side_effects(name):
            continue
        path = ROOT / Path(*name.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ClassDef):
                bases = [ast.unparse(b) for b in node.bases]
                assert not any(b.endswith(("Error", "Exception")) for b in bases), \
                    f"{path}:{node.lineno}: {node.name}({', '.join(bases)}) is not checked by the import walk"
