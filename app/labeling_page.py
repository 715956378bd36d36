"""The labeling page: one crop large, class buttons with hotkeys, progress.

Everything that changes per keystroke lives in one ``st.fragment``, so a hotkey reruns only this
panel. Each click writes at once in its own transaction and only then moves on; a failed write
stays on the crop and says why.
"""

from __future__ import annotations

import time
from collections import deque
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import PurePosixPath

import streamlit as st
from sqlalchemy.exc import SQLAlchemyError

from annotation_db import queues, store, suggestions
from annotation_db.db import StoreError
from annotation_db.models import Annotator, Dataset, Image
from app.hotkeys import crop_alt, hotkey_layer
from app.session import Who, current_dataset, flash, is_adjudicator, queue_spec, show_flash, who
from app.store_cache import DatasetView, crop_data_url, get_sessionmaker, slide_thumbnail_with_box
from app.trail import Trail
from core.errors import GlomError

CROP_WIDTH_PX = 560


# --- state ---------------------------------------------------------------------------------------


def _trail(spec: queues.QueueSpec) -> Trail:
    trail = st.session_state.get("trail")
    if trail is None or trail.queue != spec:
        trail = st.session_state.trail = Trail(queue=spec)
    return trail


def _fetch(s, spec: queues.QueueSpec):  # noqa: ANN001 - a Session
    def fetch(cursor):  # noqa: ANN001 - an image id, or (margin, image id) in the uncertain queue
        return queues.next_image_ids(s, spec, cursor, limit=1)

    return fetch


def _older(spec: queues.QueueSpec):
    def older(exclude):
        with get_sessionmaker()() as s:
            return queues.recent_labeled_ids(s, spec.dataset_id, spec.annotator_id, exclude=exclude, limit=20)

    return older


def refresh_progress(dataset: DatasetView, me: Who) -> None:
    """Counts from the store (a full page run); a hotkey updates them in place instead."""
    with get_sessionmaker()() as s:
        p = queues.progress(s, dataset.id, me.annotator_id)
        since = datetime.now(timezone.utc) - timedelta(hours=1)
        recent = queues.labels_since(s, me.annotator_id, since)
    st.session_state.progress = {
        "key": (dataset.id, me.annotator_id),
        "done": p.done,
        "total": p.total,
        "per_class": dict(p.per_class),
        "uncertain": p.uncertain,
    }
    # Times of my labels in the last hour: the seed is spread evenly, new ones are exact.
    now = time.time()
    st.session_state.rate = deque(now - 3600 * (i + 1) / (recent + 1) for i in range(recent))


def _count_label(before: queues.LabelView | None, classes: list[str], uncertain: bool) -> None:
    p = st.session_state.get("progress")
    if p is None:
        return
    if before is None:
        p["done"] += 1
    else:
        for k in before.classes:
            p["per_class"][k] = p["per_class"].get(k, 0) - 1
        p["uncertain"] -= bool(before.uncertain)
    for k in classes:
        p["per_class"][k] = p["per_class"].get(k, 0) + 1
    p["uncertain"] += bool(uncertain)
    st.session_state.setdefault("rate", deque()).append(time.time())


# --- callbacks (each write in its own transaction) -----------------------------------------------


def _stale(image_id: int) -> bool:
    """A key pressed for a crop that is no longer on screen must not label the next one."""
    trail = st.session_state.get("trail")
    return trail is None or trail.peek() != image_id


def _shown_suggestion(image_id: int) -> suggestions.Suggestion | None:
    """The model suggestion on screen for this crop (recorded with the label), if any."""
    shown = st.session_state.get("suggestion_shown")
    return shown[1] if shown and shown[0] == image_id else None


def _save(image_id: int, classes: list[str], uncertain: bool = False) -> None:
    if _stale(image_id):
        return
    me = who()
    note = st.session_state.get(f"note_{image_id}", "") or ""
    shown = _shown_suggestion(image_id)
    try:
        with get_sessionmaker()() as s, s.begin():
            image = s.get(Image, image_id)
            if image is None:
                raise StoreError(f"crop #{image_id} is no longer in the store")
            before = queues.label_of(s, image_id, me.annotator_id)
            store.set_label(s, image, s.get(Annotator, me.annotator_id), classes, uncertain=uncertain, note=note,
                            suggested=shown.key if shown else None, suggested_by=shown.checkpoint_id if shown else None)
    except (GlomError, SQLAlchemyError) as e:
        flash("error", f"Not saved — {e}. The crop stays here; try again.")
        return
    _count_label(before, classes, uncertain)
    st.session_state.get("pending", {}).pop(image_id, None)
    if before is None and st.session_state.get("suggest_after") == image_id:
        # "after" mode: the clinician's own label is saved; the model's now shows on this crop
        flash("info", "Your label is saved. The model's suggestion is shown now: **A** takes it, **→** moves on.")
        return
    st.session_state.trail.forward()


def on_accept(image_id: int) -> None:
    """Take the model's suggestion on screen as this crop's label (key A)."""
    shown = _shown_suggestion(image_id)
    if shown is None or _stale(image_id):
        return
    _save(image_id, [shown.key])


def _adjudicate(image_id: int, classes: list[str]) -> None:
    if _stale(image_id):
        return
    me = who()
    if not is_adjudicator(me):
        flash("error", f"{me.name} is not an adjudicator (an admin grants it: `glom user role NAME adjudicator`); nothing saved.")
        return
    note = st.session_state.get(f"note_{image_id}", "") or ""
    try:
        with get_sessionmaker()() as s, s.begin():
            store.adjudicate(s, s.get(Image, image_id), s.get(Annotator, me.annotator_id), classes, note=note)
    except (GlomError, SQLAlchemyError) as e:
        flash("error", f"Final label not saved — {e}.")
        return
    st.session_state.get("pending", {}).pop(image_id, None)
    st.session_state.trail.forward()


def on_class(image_id: int, key: str, multi: bool, adjudicating: bool) -> None:
    if multi:
        if _stale(image_id):
            return
        chosen = st.session_state.pending.setdefault(image_id, set())
        chosen.symmetric_difference_update({key})
    elif adjudicating:
        _adjudicate(image_id, [key])
    else:
        _save(image_id, [key])


def on_enter(image_id: int, keys: list[str], adjudicating: bool) -> None:
    chosen = [k for k in keys if k in st.session_state.pending.get(image_id, set())]
    if not chosen:
        flash("warning", "Pick at least one class (1…N) before Enter, or U for uncertain.")
        return
    if adjudicating:
        _adjudicate(image_id, chosen)
    else:
        _save(image_id, chosen)


def on_uncertain(image_id: int, keys: list[str]) -> None:
    chosen = [k for k in keys if k in st.session_state.get("pending", {}).get(image_id, set())]
    _save(image_id, chosen, uncertain=True)


def on_skip(image_id: int) -> None:
    if not _stale(image_id):
        st.session_state.trail.forward()


def on_back(image_id: int | None, spec: queues.QueueSpec) -> None:
    if image_id is not None and _stale(image_id):
        return
    if not st.session_state.trail.back(_older(spec)):
        flash("info", "Nothing before this crop yet.")


def on_restart() -> None:
    st.session_state.trail.restart()


def on_toggle(name: str) -> None:
    st.session_state[name] = not st.session_state[name]


# --- panels ---------------------------------------------------------------------------------------


def _with_key(label: str, key: str | None) -> str:
    """A button label showing its hotkey."""
    return f"{label} &nbsp; `{key}`" if key else label


def progress_panel(dataset: DatasetView) -> None:
    p = st.session_state.get("progress")
    if not p:
        return
    rate = st.session_state.get("rate", deque())
    cutoff = time.time() - 3600
    while rate and rate[0] < cutoff:
        rate.popleft()
    total = max(p["total"], 1)
    st.progress(
        min(p["done"] / total, 1.0),
        text=f"**{p['done']:,} / {p['total']:,}** labeled by you · {len(rate)} in the last hour",
    )
    counts = " · ".join(f"{c.display_name} **{p['per_class'].get(c.key, 0)}**" for c in dataset.classes)
    st.caption(counts + (f" · uncertain **{p['uncertain']}**" if p["uncertain"] else ""))


def crop_panel(dataset: DatasetView, info: queues.CropInfo, data: str) -> None:
    with st.container(key="crop", border=False, height=640 if st.session_state.zoom else "content"):
        st.image(data, width=info.width if st.session_state.zoom else CROP_WIDTH_PX, alt=crop_alt(info.image_id))
    # The file name only: folder names often carry an earlier label, and labeling here is blind.
    with st.container(key="crop_caption"):
        st.caption(f"`{PurePosixPath(info.path).name}` · #{info.image_id} · {info.width}×{info.height} px")
    c1, c2, _ = st.columns([3, 3, 1])
    c1.button(
        _with_key("Full resolution" if not st.session_state.zoom else "Fit to view", "Z"),
        key="zoom_btn", on_click=on_toggle, args=("zoom",), type="tertiary", icon=":material/zoom_in:",
    )
    c2.button(
        _with_key("Contrast " + ("on" if st.session_state.contrast else "off"), "K"),
        key="contrast_btn", on_click=on_toggle, args=("contrast",), type="tertiary",
        icon=":material/contrast:",
    )


def context_panel(info: queues.CropInfo) -> None:
    parts = [f"**Slide** {info.slide_name or '—'}"]
    if info.stain:
        parts.append(f"**Stain** {info.stain}")
    if info.box:
        x, y, w, h = info.box
        parts.append(f"**Position** x {x:,}, y {y:,} · {w}×{h} px (level 0)")
    st.markdown("  \n".join(parts))
    if info.slide_path:
        try:
            st.image(slide_thumbnail_with_box(info.slide_path, info.box), width=220)
        except (GlomError, OSError, ValueError, ImportError) as e:  # an unreadable slide must not block labeling
            st.caption(f"Slide thumbnail unavailable: {e}")


def votes_panel(image_id: int, dataset: DatasetView) -> None:
    with get_sessionmaker()() as s:
        votes = queues.votes_of(s, image_id)
        final = queues.adjudication_of(s, image_id)
    lines = [
        f"- **{name}**: {', '.join(dataset.display(k) for k in v.classes) or '—'}" + (" (uncertain)" if v.uncertain else "")
        for name, v in votes.items()
    ]
    st.markdown("**Votes**\n" + "\n".join(lines))
    if final:
        st.success(f"Final: {', '.join(dataset.display(k) for k in final[0])} — decided by {final[1]}")


def class_buttons_panel(
    dataset: DatasetView, image_id: int, mine: queues.LabelView | None, adjudicating: bool, may_decide: bool
) -> None:
    multi = dataset.multi_label
    pending = st.session_state.setdefault("pending", {})
    if multi and image_id not in pending:
        pending[image_id] = set(mine.classes) if (mine and not adjudicating) else set()
    selected = pending.get(image_id, set()) if multi else set(mine.classes if (mine and not adjudicating) else ())
    if adjudicating:
        st.markdown("**Final label**" + (" — toggle, then Enter" if multi else ""))
    elif multi:
        st.markdown("**Classes** — toggle any that apply, then Enter")
    for c in dataset.classes:
        st.button(
            _with_key(c.display_name, c.hotkey),
            key=f"class_{c.key}",
            help=c.key if c.key != c.display_name else None,
            type="primary" if c.key in selected else "secondary",
            icon=":material/check_box:" if (multi and c.key in selected) else (
                ":material/check_box_outline_blank:" if multi else None
            ),
            on_click=on_class,
            args=(image_id, c.key, multi, adjudicating),
            disabled=adjudicating and not may_decide,
            width="stretch",
        )
    if multi:
        st.button(
            _with_key("Save", "Enter"), key="save_enter", on_click=on_enter,
            args=(image_id, dataset.keys, adjudicating),
            width="stretch", icon=":material/save:", disabled=adjudicating and not may_decide,
        )


def actions_panel(
    dataset: DatasetView, image_id: int, spec: queues.QueueSpec, adjudicating: bool, trail: Trail
) -> None:
    a, b = st.columns(2)
    c, d = st.columns(2)
    a.button(_with_key("Uncertain", "U"), key="uncertain", on_click=on_uncertain, args=(image_id, dataset.keys),
             disabled=adjudicating, width="stretch")
    b.button(_with_key("Skip", "S"), key="skip", on_click=on_skip, args=(image_id,), width="stretch")
    c.button(_with_key("Previous", "←"), key="back", on_click=on_back, args=(image_id, spec), width="stretch")
    d.button(_with_key("Next", "→"), key="next", on_click=on_skip, args=(image_id,), width="stretch",
             disabled=trail.at_end)


def suggestion_panel(dataset: DatasetView, image_id: int, shown: suggestions.Suggestion) -> None:
    """The model's class and probability, and the key that takes it."""
    with st.container(key="suggestion", border=True):
        st.markdown(f"Model suggests **{dataset.display(shown.key)}** · {shown.probability:.0%}")
        st.button(_with_key("Accept suggestion", "A"), key="accept_suggestion", on_click=on_accept,
                  args=(image_id,), width="stretch", icon=":material/smart_toy:")


def _suggestion(s, dataset: DatasetView, image_id: int, mine: queues.LabelView | None,  # noqa: ANN001
                adjudicating: bool) -> suggestions.Suggestion | None:
    """The suggestion to show now (None: off, blind slice, "after" before my label, no prediction),
    remembered for the save; and in "after" mode, whether the first label should stay on the crop."""
    st.session_state.suggestion_shown = None
    st.session_state.suggest_after = None
    row = s.get(Dataset, dataset.id)
    if adjudicating or row is None or row.suggestions == "off":
        return None
    shown = suggestions.suggestion_to_show(s, row, image_id, labeled_by_me=mine is not None)
    if shown is not None:
        st.session_state.suggestion_shown = (image_id, shown)
    elif row.suggestions == "after" and mine is None and not suggestions.is_blind(image_id, row.blind_seed,
                                                                                  row.blind_share):
        ckpt = suggestions.suggestion_checkpoint(s, row)
        if ckpt and suggestions.prediction_for(s, image_id, ckpt):
            st.session_state.suggest_after = image_id
    return shown


def keyboard_panel(dataset: DatasetView, image_id: int, spec: queues.QueueSpec, adjudicating: bool,
                   suggested: bool = False) -> None:
    """Hotkeys, each bound to the crop on screen when pressed (see app/hotkeys.py)."""
    multi = dataset.multi_label
    actions = {
        c.hotkey.lower(): partial(on_class, key=c.key, multi=multi, adjudicating=adjudicating)
        for c in dataset.classes
        if c.hotkey
    }
    if multi:
        actions["Enter"] = partial(on_enter, keys=dataset.keys, adjudicating=adjudicating)
    if not adjudicating:
        actions["u"] = partial(on_uncertain, keys=dataset.keys)
    actions |= {
        "s": on_skip,
        "ArrowRight": on_skip,
        "ArrowLeft": partial(on_back, spec=spec),
        "Backspace": partial(on_back, spec=spec),
        "z": lambda _image_id: on_toggle("zoom"),
        "k": lambda _image_id: on_toggle("contrast"),
    }
    if suggested:
        actions["a"] = on_accept
    hotkey_layer(image_id, actions, crop_selector=".st-key-crop img")


def status_panel(mine: queues.LabelView | None, dataset: DatasetView, adjudicating: bool) -> None:
    if adjudicating:
        return
    if mine is None:
        st.caption("Not labeled by you yet.")
    else:
        text = ", ".join(dataset.display(k) for k in mine.classes) or "no class"
        st.caption(f"Your label: **{text}**" + (" · uncertain" if mine.uncertain else "") + " — saved")


def _next_readable(s, trail: Trail, spec: queues.QueueSpec, dataset: DatasetView):  # noqa: ANN001
    """The current crop and its image, skipping (and reporting) crops whose file vanished."""
    fetch = _fetch(s, spec)
    while (image_id := trail.current(fetch)) is not None:
        info = queues.crop_info(s, image_id)
        if info is None:
            trail.drop_current()
            continue
        try:
            return info, crop_data_url(str(dataset.abspath(info.path)), st.session_state.contrast)
        except OSError:
            flash(
                "warning",
                f"Image file missing: `{info.path}` (#{image_id}) is no longer under {dataset.root}. "
                "Skipped; the queue moved on.",
            )
            trail.drop_current()
    return None, None


@st.fragment
def labeling_panel() -> None:
    me, dataset = who(), current_dataset()
    spec = queue_spec(dataset, me)
    if spec is None:
        st.info("Pick a slide in the sidebar.")
        return
    trail = _trail(spec)
    with get_sessionmaker()() as s:
        info, data = _next_readable(s, trail, spec, dataset)
        mine = queues.label_of(s, info.image_id, me.annotator_id) if info else None
        adjudicating = spec.kind == "disagreements"
        shown = _suggestion(s, dataset, info.image_id, mine, adjudicating) if info else None
    show_flash()
    st.markdown(f"##### {dataset.name} · {queues.QUEUE_TITLES[spec.kind]}")
    progress_panel(dataset)
    if info is None:
        queue_done_panel(spec)
        return
    left, right = st.columns([3, 2], gap="large")
    with left:
        crop_panel(dataset, info, data)
    with right:
        if adjudicating:
            votes_panel(info.image_id, dataset)
        if shown is not None:
            suggestion_panel(dataset, info.image_id, shown)
        class_buttons_panel(dataset, info.image_id, mine, adjudicating, is_adjudicator(me))
        actions_panel(dataset, info.image_id, spec, adjudicating, trail)
        st.text_input(
            "Note", key=f"note_{info.image_id}", value=mine.note if mine else "",
            placeholder="Note (optional) · Esc: back to the keys", label_visibility="collapsed",
        )
        status_panel(mine, dataset, adjudicating)
        context_panel(info)
    keyboard_panel(dataset, info.image_id, spec, adjudicating, suggested=shown is not None)


def queue_done_panel(spec: queues.QueueSpec) -> None:
    if spec.kind == "uncertain":
        with get_sessionmaker()() as s:
            has_predictions = queues.latest_checkpoint(s, spec.dataset_id) is not None
        if not has_predictions:
            st.info("No model predictions are stored for this dataset yet, so there is nothing to rank.")
            return
    st.success("Nothing left in this queue. Well done.")
    c1, c2 = st.columns(2)
    c1.button(_with_key("Previous", "←"), key="back_done", on_click=on_back, args=(None, spec))
    c2.button("Go through the queue again (skipped crops)", key="restart", on_click=on_restart)


def page() -> None:
    me, dataset = who(), current_dataset()
    if dataset is None:
        st.info("Pick a dataset in the sidebar.")
        return
    refresh_progress(dataset, me)  # a full page run: exact counts; hotkeys update them in place
    labeling_panel()


if __name__ == "__main__":  # run by st.navigation as a page script
    page()
