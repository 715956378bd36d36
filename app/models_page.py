"""The Models page: train from the browser, follow the run, pick the dataset's active model, and
set when suggestions show while labeling.

Training never runs inside this script: starting a job writes a row to the store and starts
``glom jobs run --until-empty`` in a process of its own (``core.jobs``), so a page reload or an
app restart does not touch it. Progress is read from the store and the run's ``metrics.csv``.
Only admins may start or cancel jobs and change the dataset's model (``train`` permission,
annotation_db/users.py); everyone signed in sees the page.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st
from sqlalchemy.exc import SQLAlchemyError

from annotation_db import jobs as job_store
from annotation_db import store, suggestions
from annotation_db.db import StoreError
from annotation_db.models import Job
from app.session import current_dataset, flash, show_flash, who
from app.store_cache import DatasetView, dataset_view, get_sessionmaker, store_url
from core import jobs as runner
from core.config import ConfigError, load_config

POLL_S = 2.0
RECIPE_DEFAULT = "(recipe's)"


def _may_train() -> bool:
    me = who()
    return me is not None and me.may("train")


# --- callbacks ------------------------------------------------------------------------------------


def on_start(dataset_name: str) -> None:
    if not _may_train():
        flash("error", "Only admins may start training jobs.")
        return
    ss = st.session_state
    arch = ss.get("job_arch")
    size = ss.get("job_size")
    recipes = {p.name: p for p in runner.list_recipes()}
    if ss.get("job_recipe") not in recipes:
        flash("error", f"No recipe named {ss.get('job_recipe')!r} in {runner.recipes_dir()}.")
        return
    try:
        overrides = runner.job_overrides(int(ss.job_epochs), None if size == RECIPE_DEFAULT else int(size),
                                         None if arch == RECIPE_DEFAULT else arch)
        with get_sessionmaker()() as s, s.begin():
            dataset = store.get_dataset(s, dataset_name)
            job = job_store.submit_job(s, dataset, created_by=who().name, recipe=recipes[ss.job_recipe],
                                       label_source=ss.job_source, overrides=overrides,
                                       runs_dir=runner.default_runs_dir())
            job_id = job.id
        if ss.get("job_run_here", True):
            runner.start_runner(store_url())
            flash("success", f"Job #{job_id} started.")
        else:
            flash("success", f"Job #{job_id} queued for a worker (`glom jobs run --worker`).")
    except (StoreError, SQLAlchemyError, OSError) as e:
        flash("error", f"Job not started — {e}")


def on_cancel(job_id: int) -> None:
    if not _may_train():
        flash("error", "Only admins may cancel training jobs.")
        return
    try:
        job = runner.cancel_job(get_sessionmaker(), job_id)
    except (StoreError, SQLAlchemyError) as e:
        flash("error", f"Not cancelled — {e}")
        return
    flash("info", f"Job #{job_id}: {'cancelled' if job.status == 'cancelled' else 'cancelling…'}")


def on_activate(dataset_name: str, job_id: int | None) -> None:
    if not _may_train():
        flash("error", "Only admins may change the dataset's model.")
        return
    try:
        with get_sessionmaker()() as s, s.begin():
            dataset = store.get_dataset(s, dataset_name)
            if job_id is None:
                suggestions.set_active_checkpoint(s, dataset, None, None)
            else:
                job = job_store.get_job(s, job_id)
                suggestions.set_active_checkpoint(s, dataset, job.checkpoint, job.checkpoint_id)
    except (StoreError, SQLAlchemyError) as e:
        flash("error", f"Not changed — {e}")


def on_suggestions(dataset_name: str) -> None:
    if not _may_train():
        flash("error", "Only admins may change suggestion settings.")
        return
    try:
        with get_sessionmaker()() as s, s.begin():
            dataset = store.get_dataset(s, dataset_name)
            suggestions.set_suggestions(s, dataset, st.session_state.sugg_mode,
                                        blind_share=st.session_state.sugg_blind / 100)
    except (StoreError, SQLAlchemyError) as e:
        flash("error", f"Not saved — {e}")
        return
    flash("success", "Suggestion settings saved.")


# --- panels ---------------------------------------------------------------------------------------


def start_panel(dataset: DatasetView) -> None:
    st.subheader("Train a model")
    if not _may_train():
        st.caption("Only admins start training jobs (`glom user role NAME admin`).")
        return
    recipes = [p.name for p in runner.list_recipes()]
    if not recipes:
        st.warning(f"No recipes in {runner.recipes_dir()}.")
        return
    with st.container(key="start_job", border=True):
        c1, c2 = st.columns(2)
        c1.selectbox("Recipe", recipes, key="job_recipe",
                     index=recipes.index("quick.yaml") if "quick.yaml" in recipes else 0)
        c2.radio("Labels", job_store.LABEL_SOURCES, key="job_source", horizontal=True,
                 help="majority of clinicians · adjudicated images only · final (adjudicated, else majority)")
        try:
            cfg = load_config(runner.recipes_dir() / st.session_state.job_recipe)
        except ConfigError as e:
            st.error(f"{st.session_state.job_recipe}: {e}")
            return
        c3, c4, c5 = st.columns(3)
        c3.number_input("Epochs", 1, runner.MAX_EPOCHS, value=int(cfg.train.epochs), key="job_epochs")
        c4.selectbox("Input size (px)", [RECIPE_DEFAULT, *runner.INPUT_SIZES_PX], key="job_size",
                     help=f"the recipe's: {cfg.preprocess.input_size} px")
        c5.selectbox("Architecture", [RECIPE_DEFAULT, *runner.ARCHITECTURES], key="job_arch",
                     help=f"the recipe's: {cfg.model.name}")
        st.checkbox("Run on this server now", value=True, key="job_run_here",
                    help="unticked: the job waits for `glom jobs run --worker` on a GPU server")
        st.button("Start training", key="start_training", type="primary", on_click=on_start, args=(dataset.name,),
                  icon=":material/play_arrow:")


def _job_title(job: Job) -> str:
    return f"#{job.id} · {Path(job.recipe).name} · {job.label_source} · by {job.created_by}"


def progress_panel(job: Job) -> None:
    """One active job: status, epoch, loss and the validation macro-F1 curve so far."""
    rows = runner.read_metrics(job)
    with st.container(key=f"job_{job.id}", border=True):
        epochs = next((o.split("=", 1)[1] for o in job.overrides if o.startswith("train.epochs=")), "?")
        head = f"**{_job_title(job)}** — {job.status}"
        if job.status == "running":
            head += f" · {job.stage or 'starting'} on {job.device}"
        st.markdown(head)
        if rows:
            last = rows[-1]
            st.caption(f"epoch {int(last['epoch']) + 1} / {epochs} · train loss {last.get('train_loss', float('nan')):.4f}"
                       + (f" · val macro-F1 {last['val_macro_f1']:.3f}" if "val_macro_f1" in last else ""))
            curves = {k: [r.get(k) for r in rows] for k in ("train_loss", "val_macro_f1") if k in last}
            st.line_chart(curves, height=180)
        else:
            st.caption("waiting for the first epoch…")
        if _may_train():
            st.button("Cancel", key=f"cancel_{job.id}", on_click=on_cancel, args=(job.id,), icon=":material/stop:")


def history_panel(jobs: list[Job]) -> None:
    ended = [j for j in jobs if j.status not in job_store.ACTIVE_STATUSES]
    if not ended:
        return
    st.markdown("**Past jobs**")
    with st.container(key="job_history"):
        for j in ended:
            line = f"#{j.id} **{j.status}** · {Path(j.recipe).name} · {j.label_source} · by {j.created_by}"
            if j.status == "done":
                st.markdown(line + f" · {j.predictions} predictions")
            else:
                st.markdown(line)
                if j.error:
                    st.caption(f"`{runner.log_error_line(j)}`")


def checkpoints_panel(dataset: DatasetView, jobs: list[Job], active_id: str | None) -> None:
    done = [j for j in jobs if j.status == "done" and j.checkpoint]
    st.subheader("Checkpoints")
    if not done:
        st.caption("None yet: a finished job adds its checkpoint here and predicts every image of the dataset.")
        return
    for j in done:
        m, d = j.metrics or {}, j.data_summary or {}
        sizes = d.get("sizes", {})
        is_active = j.checkpoint_id == active_id
        with st.container(key=f"ckpt_{j.id}", border=True):
            a, b = st.columns([4, 1], vertical_alignment="center")
            a.markdown(f"**#{j.id}** `{j.checkpoint_id}`" + (" — **active**" if is_active else ""))
            a.caption(f"val macro-F1 {m.get('val_macro_f1', float('nan')):.3f} · test macro-F1 "
                      f"{m.get('test_macro_f1', float('nan')):.3f} · {d.get('architecture')} at {d.get('input_size')} px · "
                      f"labels: {d.get('label_source')} · images train {sizes.get('train', '?')} / val "
                      f"{sizes.get('val', '?')} / test {sizes.get('test', '?')}")
            if _may_train():
                if is_active:
                    b.button("Deactivate", key=f"deactivate_{j.id}", on_click=on_activate, args=(dataset.name, None))
                else:
                    b.button("Make active", key=f"activate_{j.id}", on_click=on_activate, args=(dataset.name, j.id))


def suggestions_panel(dataset: DatasetView, mode: str, blind_share: float) -> None:
    st.subheader("Suggestions while labeling")
    st.caption("The active model's class and probability, taken with **A**. A blind slice of the images never "
               "shows one, so the Agreement page can measure what suggestions do to labels.")
    if not _may_train():
        st.markdown(f"Now: **{suggestions.SUGGESTION_TITLES[mode]}**, blind slice {blind_share:.0%}")
        return
    st.session_state.setdefault("sugg_mode", mode)
    st.session_state.setdefault("sugg_blind", round(blind_share * 100))
    with st.container(key="suggestion_settings", border=True):
        st.radio("Show suggestions", suggestions.SUGGESTION_MODES, key="sugg_mode", horizontal=True,
                 format_func=suggestions.SUGGESTION_TITLES.get)
        st.slider("Blind slice (% of images never shown a suggestion)", 0, 50, key="sugg_blind")
        st.button("Save", key="save_suggestions", on_click=on_suggestions, args=(dataset.name,))


def jobs_panel(dataset_name: str, polling: bool) -> None:
    """Active jobs, past jobs and checkpoints; run as a fragment every few seconds (``polling``)
    while a job is active, and the whole page once more when the last one ends."""
    dataset = dataset_view(store_url(), dataset_name)
    with get_sessionmaker()() as s, s.begin():
        ds = store.get_dataset(s, dataset_name)
        jobs = job_store.list_jobs(s, ds)
        active_id = ds.active_checkpoint_id
    active = [j for j in jobs if j.status in job_store.ACTIVE_STATUSES]
    st.subheader("Jobs")
    if not jobs:
        st.caption("No training jobs for this dataset yet.")
    for j in active:
        progress_panel(j)
    history_panel(jobs)
    checkpoints_panel(dataset, jobs, active_id)
    if polling and not active:
        st.rerun(scope="app")  # stop polling


def page() -> None:
    dataset = current_dataset()
    if dataset is None:
        st.info("Pick a dataset in the sidebar.")
        return
    st.header(f"Models · {dataset.name}")
    show_flash()
    with get_sessionmaker()() as s, s.begin():
        ds = store.get_dataset(s, dataset.name)
        mode, blind = ds.suggestions, ds.blind_share
        job_store.reap_lost(s)
        polling = any(j.status in job_store.ACTIVE_STATUSES for j in job_store.list_jobs(s, ds, limit=20))
    left, right = st.columns([3, 2], gap="large")
    with right:
        start_panel(dataset)
        suggestions_panel(dataset, mode, blind)
    with left:
        st.fragment(run_every=POLL_S if polling else None)(jobs_panel)(dataset.name, polling)


if __name__ == "__main__":  # run by st.navigation as a page script
    page()
