"""Agreement between annotators: kappa per class, the between-annotator confusion matrix, the
disagreements, and the adjudicator's final label for each."""

from __future__ import annotations

import math

import streamlit as st
from sqlalchemy.exc import SQLAlchemyError

from annotation_db import agreement, queues, store
from annotation_db.label_resolution import dataset_stats
from annotation_db.models import Annotator, Image
from app.session import current_dataset, flash, is_adjudicator, show_flash, who
from app.store_cache import DatasetView, crop_bytes, get_sessionmaker, store_url
from core.errors import GlomError

SHOWN_DISAGREEMENTS = 30


@st.cache_data(ttl=15, show_spinner="Computing agreement…")
def _report(url: str, dataset_name: str, annotators: tuple[str, ...] | None) -> dict:
    with get_sessionmaker()() as s:
        dataset = store.get_dataset(s, dataset_name)
        return agreement.agreement_report(s, dataset, list(annotators) if annotators else None).to_dict()


@st.cache_data(ttl=15, show_spinner="Comparing the blind slice with the rest…")
def _suggestion_report(url: str, dataset_name: str) -> dict:
    with get_sessionmaker()() as s:
        return agreement.suggestion_report(s, store.get_dataset(s, dataset_name)).to_dict()


@st.cache_data(ttl=15, show_spinner=False)
def _annotators(url: str, dataset_name: str) -> list[str]:
    with get_sessionmaker()() as s:
        return sorted(dataset_stats(s, store.get_dataset(s, dataset_name))["labels_per_annotator"])


def on_decide(image_id: int) -> None:
    choice = st.session_state.get(f"final_{image_id}")
    classes = list(choice or []) if isinstance(choice, list) else ([choice] if choice else [])
    if not classes:
        flash("warning", "Pick the final class first.")
        return
    me = who()
    try:
        with get_sessionmaker()() as s, s.begin():
            store.adjudicate(s, s.get(Image, image_id), s.get(Annotator, me.annotator_id), classes)
    except (GlomError, SQLAlchemyError) as e:
        flash("error", f"Final label not saved — {e}")
        return
    _report.clear()


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def summary_panel(dataset: DatasetView, report: dict) -> None:
    c1, c2, c3 = st.columns(3)
    c1.metric("Overall kappa", _fmt(report["kappa"]), help=f"{report['method']} kappa")
    c2.metric("Images labeled by ≥ 2", report["items"])
    c3.metric("Disagreements", len(report["disagreements"]))
    left, right = st.columns(2)
    with left:
        st.markdown("**Kappa per class**")
        st.dataframe(
            {"class": [dataset.display(k) for k in report["per_class_kappa"]],
             "kappa": [_fmt(v) for v in report["per_class_kappa"].values()]},
            hide_index=True, width="stretch",
        )
    with right:
        st.markdown("**Between-annotator confusion** (rows: first annotator of each pair)")
        names = [dataset.display(k) for k in report["classes"]]
        st.dataframe({"": names} | {n: [row[j] for row in report["confusion"]] for j, n in enumerate(names)},
                     hide_index=True, width="stretch")


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def suggestions_panel(report: dict) -> None:
    """Blind slice vs the rest: what suggestions do to agreement, and automation bias per annotator."""
    st.subheader("Model suggestions: blind slice vs the rest")
    st.caption(f"Blind slice: {_pct(report['blind_share'])} of the images never show a suggestion. "
               f"Model: `{report['checkpoint_id'] or 'none yet'}`.")
    sl = report["slices"]
    with st.container(key="suggestion_slices"):
        st.dataframe({
            "slice": list(sl),
            "labels": [f["labels"] for f in sl.values()],
            "agree with the model": [_pct(f["model_agreement"]) for f in sl.values()],
            "between clinicians": [_pct(f["pair_agreement"]) for f in sl.values()],
            "pairs": [f["pairs"] for f in sl.values()],
            "kappa": [_fmt(f["kappa"]) for f in sl.values()],
        }, hide_index=True, width="stretch")
    st.markdown("**Automation bias** — on adjudicated images the model gets wrong: how often the clinician "
                "took the wrong class when it was suggested, vs chose it with no suggestion (blind slice)")
    bias = report["bias"]
    with st.container(key="suggestion_bias"):
        st.dataframe({
            "annotator": list(bias),
            "followed a wrong suggestion": [f"{b['followed_wrong']}/{b['shown_wrong']} ({_pct(b['followed_rate'])})"
                                            for b in bias.values()],
            "chose it unprompted": [f"{b['chose_unprompted']}/{b['blind_wrong']} ({_pct(b['unprompted_rate'])})"
                                    for b in bias.values()],
        }, hide_index=True, width="stretch")


def disagreements_panel(dataset: DatasetView, report: dict) -> None:
    me = who()
    may_decide = is_adjudicator(me)
    st.subheader("Disagreements, worst first")
    if not may_decide:
        st.caption("Only adjudicators and admins can set final labels (`glom user role NAME adjudicator`).")
    for d in report["disagreements"][:SHOWN_DISAGREEMENTS]:
        image_id = d["image_id"]
        with st.container(border=True):
            img, votes, decide = st.columns([1, 2, 2], vertical_alignment="center")
            try:
                img.image(crop_bytes(str(dataset.abspath(d["path"]))), width=140)
            except OSError:
                img.warning("file missing")
            votes.markdown(f"`{d['path']}`  \n" + "  \n".join(
                f"**{a}**: {', '.join(dataset.display(k) for k in c)}" for a, c in d["votes"].items()))
            with get_sessionmaker()() as s:
                final = queues.adjudication_of(s, image_id)
            if final:
                decide.success(f"Final: {', '.join(dataset.display(k) for k in final[0])} — {final[1]}")
            decide.pills("Final label", dataset.keys, key=f"final_{image_id}", format_func=dataset.display,
                         selection_mode="multi" if dataset.multi_label else "single", disabled=not may_decide)
            decide.button("Set final label", key=f"decide_{image_id}", on_click=on_decide, args=(image_id,),
                          disabled=not may_decide)


def page() -> None:
    dataset = current_dataset()
    if dataset is None:
        st.info("Pick a dataset in the sidebar.")
        return
    st.header(f"Agreement · {dataset.name}")
    show_flash()
    everyone = _annotators(store_url(), dataset.name)
    chosen = st.multiselect("Annotators", everyone, default=everyone, key="agreement_annotators")
    if len(chosen) < 2:
        st.info("Agreement needs at least two annotators' labels.")
        suggestions_panel(_suggestion_report(store_url(), dataset.name))
        return
    report = _report(store_url(), dataset.name, tuple(sorted(chosen)))
    summary_panel(dataset, report)
    suggestions_panel(_suggestion_report(store_url(), dataset.name))
    disagreements_panel(dataset, report)


if __name__ == "__main__":  # run by st.navigation as a page script
    page()
