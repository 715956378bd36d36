"""Export: download a dataset's labels as JSONL (original labeling system), CSV or Label Studio."""

from __future__ import annotations

import tempfile
from pathlib import Path

import streamlit as st

from annotation_db import formats, store
from app.session import current_dataset, who
from app.store_cache import get_sessionmaker
from core.errors import GlomError

FORMATS = {"jsonl": ("JSONL (original labeling system)", "jsonl", "application/jsonl"),
           "csv": ("CSV", "csv", "text/csv"),
           "labelstudio": ("Label Studio JSON", "json", "application/json")}


def export_bytes(dataset_name: str, fmt: str, source: str) -> tuple[bytes, str]:
    """The exported file's bytes and a one-line summary."""
    with tempfile.TemporaryDirectory() as tmp, get_sessionmaker()() as s:
        out = Path(tmp) / f"export.{FORMATS[fmt][1]}"
        report = formats.EXPORTERS[fmt](s, store.get_dataset(s, dataset_name), out, source=source)
        summary = f"{report.images} images, {report.labeled} labeled"
        if report.undecided:
            summary += f", {report.undecided} tied and left unlabeled"
        return out.read_bytes(), summary


def on_prepare(dataset_name: str) -> None:
    fmt, source = st.session_state.export_format, st.session_state.export_source
    try:
        data, summary = export_bytes(dataset_name, fmt, source)
    except GlomError as e:
        st.session_state.export = {"error": str(e)}
        return
    st.session_state.export = {"data": data, "summary": summary, "fmt": fmt, "source": source}


def page() -> None:
    dataset = current_dataset()
    if dataset is None:
        st.info("Pick a dataset in the sidebar.")
        return
    st.header(f"Export · {dataset.name}")
    me = who()
    sources = ["final", "majority", "adjudicated", f"annotator:{me.name}"]
    st.radio("Format", list(FORMATS), format_func=lambda f: FORMATS[f][0], key="export_format", horizontal=True)
    st.radio("Labels from", sources, key="export_source", horizontal=True,
             help="final: adjudicated where decided, else the majority of annotators")
    st.button("Prepare export", on_click=on_prepare, args=(dataset.name,), type="primary")
    done = st.session_state.get("export")
    if done and "error" in done:
        st.error(done["error"])
    elif done:
        ext = FORMATS[done["fmt"]][1]
        st.success(done["summary"])
        st.download_button(f"Download {dataset.name}.{ext}", done["data"], file_name=f"{dataset.name}.{ext}",
                           mime=FORMATS[done["fmt"]][2], icon=":material/download:")


if __name__ == "__main__":  # run by st.navigation as a page script
    page()
