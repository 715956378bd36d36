"""Import: register a folder on the server, or an uploaded zip of images or label file."""

from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import streamlit as st
from sqlalchemy.exc import SQLAlchemyError

from annotation_db import importer
from app.session import who
from app.store_cache import dataset_names, dataset_view, get_sessionmaker, store_url
from core.errors import GlomError
from core.roots import OutsideRootError, confine, data_root

SOURCES = {
    "folders-unlabeled": "Folder of images (no labels)",
    "folders": "Folder with one sub-folder per class",
    "csv": "CSV label file (image,label[,annotator][,slide])",
    "jsonl": "JSONL (original labeling system)",
    "labelstudio": "Label Studio JSON",
}
LABEL_FORMATS = ("csv", "jsonl", "labelstudio")
MAX_ZIP_BYTES = 20 * 2**30  # unpacked size of one uploaded zip
MAX_ZIP_MEMBERS = 200_000


def upload_root() -> Path:
    """Where a zip for a new dataset is unpacked: ``$GLOM_DATA_ROOT/uploads`` (default ``data/uploads``)."""
    return data_root() / "uploads"


def _may_import() -> bool:
    me = who()
    return me is not None and me.may("import")


def label_format(path: Path, chosen: str) -> str:
    """The chosen format when it is a label format, else the one the file says: ``.csv``,
    ``.jsonl``; ``.json`` is Label Studio when its tasks have ``data``, else JSONL."""
    if chosen in LABEL_FORMATS:
        return chosen
    suffix = path.suffix.lower()
    if suffix in (".csv", ".jsonl"):
        return suffix[1:]
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "jsonl"  # its reader names the bad line
    first = data[0] if isinstance(data, list) and data else data
    return "labelstudio" if isinstance(first, dict) and "data" in first else "jsonl"


def _import(fmt: str, path: Path, dataset_name: str, root: Path | None, annotator: str, skip_missing: bool) -> str:
    unlabeled = fmt == "folders-unlabeled"
    fmt = "folders" if unlabeled else fmt
    class_names, records = importer.read_records(fmt, path, labels_from_subfolders=not unlabeled)
    if unlabeled:
        records = [r for r in records if not r.image.startswith("_")]  # e.g. _masks/
    root = root or (path if fmt == "folders" else path.parent)
    confine(root, data_root())  # a new dataset's root, too, stays under the data folder
    known = dataset_view(store_url(), dataset_name).root if dataset_name in dataset_names(store_url()) else None
    # Read and hash before the write transaction: other clinicians' clicks do not wait on it.
    metas = importer.read_image_metas(known if known is not None else root, records, confine_to=data_root())
    # Staged in short transactions, published in one: other clinicians' clicks wait for neither.
    classes = [c.strip() for c in st.session_state.get("import_classes", "").split(",") if c.strip()]
    report = importer.import_staged(
        get_sessionmaker(), dataset_name, records, class_names=classes or class_names, root=root,
        multi_label=st.session_state.get("import_multi", False), annotator=annotator, source=f"import:{fmt}",
        skip_missing=skip_missing, confine_to=data_root(), metas=metas,
    )
    dataset_names.clear()
    dataset_view.clear()
    return report.summary()


def _run(fmt: str, path: Path, root: Path | None = None) -> None:
    if not _may_import():
        st.session_state.import_result = ("error", "Only admins import.")
        return
    name = (st.session_state.get("import_dataset") or "").strip()
    if not name:
        st.session_state.import_result = ("error", "Name the dataset to import into.")
        return
    try:
        summary = _import(fmt, path, name, root, st.session_state.get("import_annotator") or "imported",
                          st.session_state.get("import_skip_missing", False))
    except (GlomError, SQLAlchemyError, OSError) as e:
        st.session_state.import_result = ("error", f"Nothing imported: {e}")
        return
    st.session_state.import_result = ("success", summary)


def on_import_folder() -> None:
    if not _may_import():
        st.session_state.import_result = ("error", "Only admins import.")
        return
    try:
        path = confine(st.session_state.get("import_path") or "", data_root())
    except OutsideRootError as e:
        st.session_state.import_result = ("error", str(e))
        return
    if not path.exists():
        st.session_state.import_result = ("error", "Nothing at that path under the data folder.")
        return
    _run(st.session_state.import_format, path)


def _safe_extract(zf: zipfile.ZipFile, dest: Path) -> None:
    """Unpack ``zf`` into ``dest``, refusing members outside it and archives too large unpacked."""
    members = zf.infolist()
    if len(members) > MAX_ZIP_MEMBERS:
        raise OSError(f"{len(members)} files in the zip (at most {MAX_ZIP_MEMBERS})")
    total = sum(m.file_size for m in members)
    if total > MAX_ZIP_BYTES:
        raise OSError(f"{total / 2**30:.1f} GiB unpacked (at most {MAX_ZIP_BYTES // 2**30} GiB)")
    for member in members:
        target = (dest / member.filename).resolve()
        if not target.is_relative_to(dest.resolve()):
            raise OSError(f"{member.filename}: refuses to write outside {dest}")
    zf.extractall(dest)


def on_import_upload() -> None:
    if not _may_import():
        st.session_state.import_result = ("error", "Only admins import.")
        return
    upload = st.session_state.get("import_upload")
    if upload is None:
        st.session_state.import_result = ("error", "Choose a file first.")
        return
    name = (st.session_state.get("import_dataset") or "").strip()
    if not name:
        st.session_state.import_result = ("error", "Name the dataset to import into.")
        return
    existing = name in dataset_names(store_url())
    if upload.name.lower().endswith(".zip"):
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        if existing:
            base = Path(dataset_view(store_url(), name).root)
            dest = base / "uploads" / stamp
            try:
                confine(dest, data_root())
            except OutsideRootError as e:
                st.session_state.import_result = ("error", f"Nothing imported: the dataset's images are {e}")
                return
        else:
            base = dest = upload_root() / name
            if "/" in name or "\\" in name or name.startswith(".") or not dest.resolve().is_relative_to(upload_root()):
                st.session_state.import_result = (
                    "error", f"{name!r} cannot name a folder for the images: use letters, digits, - and _")
                return
            if dest.exists() and any(dest.iterdir()):
                st.session_state.import_result = (
                    "error", f"{dest} already holds files; choose another dataset name")
                return
        try:
            dest.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(upload) as zf:
                _safe_extract(zf, dest)
        except (zipfile.BadZipFile, OSError) as e:
            shutil.rmtree(dest, ignore_errors=True)
            st.session_state.import_result = ("error", f"Cannot unpack {upload.name}: {e}")
            return
        _run("folders-unlabeled", dest, root=base)
        if st.session_state.get("import_result", ("",))[0] == "error":
            shutil.rmtree(dest, ignore_errors=True)  # nothing was registered: no stray copies either
        return
    if not existing:
        st.session_state.import_result = ("error", "A label file needs an existing dataset (its images' root).")
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / upload.name
        path.write_bytes(upload.getvalue())
        _run(label_format(path, st.session_state.import_format), path, root=Path(dataset_view(store_url(), name).root))
        kind, message = st.session_state.get("import_result", ("", ""))
        if kind == "error":  # name the file the clinician uploaded, not our temporary copy
            st.session_state.import_result = (kind, message.replace(str(path), upload.name))


def page() -> None:
    st.header("Import")
    if not _may_import():
        st.info("Only admins import. An admin grants the role with `glom user role NAME admin`.")
        return
    st.text_input("Dataset (existing, or a new name)", key="import_dataset",
                  value=st.session_state.get("dataset_name") or "")
    c1, c2, c3 = st.columns(3)
    c1.text_input("Attribute labels to", key="import_annotator", value="imported")
    c2.text_input("Classes of a new dataset (comma-separated; default: from the file)", key="import_classes")
    c3.checkbox("New dataset is multi-label", key="import_multi")
    st.radio("Format", list(SOURCES), format_func=SOURCES.get, key="import_format", horizontal=True)
    st.checkbox("Skip (and list) missing image files", key="import_skip_missing")
    folder, upload = st.tabs(["Folder or file on the server", "Upload"])
    with folder:
        st.text_input(f"Path on the server, under {data_root()}", key="import_path",
                      placeholder="crops/ or labels.csv (relative to the data folder)")
        st.button("Import", on_click=on_import_folder, type="primary", key="import_folder_btn")
    with upload:
        st.file_uploader("A zip of images, or a label file", type=["zip", "csv", "jsonl", "json"], key="import_upload",
                         help="A zip registers its images (a new dataset's images go to the server's data folder; "
                              "an existing dataset's under its root). A label file (CSV, JSONL, Label Studio JSON) "
                              "labels images of an existing dataset; its format is taken from the choice above, or "
                              "from the file name when a folder format is chosen.")
        st.button("Import upload", on_click=on_import_upload, type="primary", key="import_upload_btn")
    result = st.session_state.pop("import_result", None)
    if result:
        getattr(st, result[0])(result[1])


if __name__ == "__main__":  # run by st.navigation as a page script
    page()
