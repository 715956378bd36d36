"""The annotation store: datasets, slides, images, annotators' labels with full history,
adjudications and model predictions, in SQLite (default) or PostgreSQL via SQLAlchemy 2.0."""

from annotation_db.classes import GLOMERULUS_CLASSES, ClassSpec
from annotation_db.db import StoreError, create_store_engine, open_store, resolve_url, upgrade
from annotation_db.label_resolution import LabeledItem, labeled_items

__all__ = [
    "GLOMERULUS_CLASSES",
    "ClassSpec",
    "LabeledItem",
    "StoreError",
    "create_store_engine",
    "labeled_items",
    "open_store",
    "resolve_url",
    "upgrade",
]
