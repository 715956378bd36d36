"""Keyboard layer of the labeling page: one key press -> one action on the crop that was on screen.

Streamlit's ``st.button(shortcut=...)`` runs the callback bound in the last server run, so a key
pressed while the next crop is still on its way would label a crop the clinician never saw. This
``st.components.v2`` component sends the key *and the id of the crop on screen when it was
pressed*, read from the crop's ``alt`` text in the page (``#<image id>``) rather than from the
last data sent, which can arrive a few milliseconds after the image; actions for any other crop
are dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import streamlit as st

# One document listener for the page, whatever the number of renders: each render only swaps in
# the newest data and sender. Keys typed into text fields are left alone.
_JS = r"""
export default function (component) {
  const { data, setTriggerValue, parentElement } = component;
  const s = (window.__glomHotkeys = window.__glomHotkeys || { seq: 0 });
  s.data = data;
  s.send = setTriggerValue;
  s.el = parentElement;
  if (s.installed) return;
  s.installed = true;
  document.addEventListener("keydown", (e) => {
    const cur = window.__glomHotkeys;
    if (!cur.el || !cur.el.isConnected || !cur.data) return;
    if (e.ctrlKey || e.metaKey || e.altKey || e.isComposing) return;
    const t = e.target;
    const typing = t && (t.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(t.tagName));
    if (typing && e.key === "Escape") { t.blur(); return; }  // back to the keys after a note
    if (typing) return;
    const key = e.key.length === 1 ? e.key.toLowerCase() : e.key;
    if (!cur.data.keys.includes(key)) return;
    const img = document.querySelector(cur.data.crop_selector);
    const shown = img && img.alt && img.alt.match(/#(\d+)/);
    if (!shown) return;
    e.preventDefault();
    if (e.repeat) return;
    cur.seq += 1;
    cur.send("press", { key: key, image: Number(shown[1]), seq: cur.seq });
  }, true);
}
"""

_component = st.components.v2.component("glomlab_hotkeys", js=_JS, isolate_styles=False)

Action = Callable[[int], None]


def _on_press(state_key: str, actions: Mapping[str, Action]) -> None:
    press = (st.session_state.get(state_key) or {}).get("press") or {}
    action = actions.get(str(press.get("key", "")))
    if action is not None and isinstance(press.get("image"), int):
        action(press["image"])


def crop_alt(image_id: int) -> str:
    """The ``alt`` text of the crop image: the keyboard layer reads the id on screen from it."""
    return f"Glomerulus crop #{image_id}"


def hotkey_layer(
    image_id: int, actions: Mapping[str, Action], *, crop_selector: str, key: str = "hotkeys"
) -> None:
    """Listen for ``actions``' keys (``"1"``, ``"u"``, ``"Enter"``, ``"ArrowLeft"``, ...); each
    action is called with the id of the crop on screen (``crop_selector``, alt from
    :func:`crop_alt`) when the key went down."""
    _component(
        key=key,
        data={"image_id": image_id, "keys": list(actions), "crop_selector": crop_selector},
        on_press_change=lambda: _on_press(key, actions),
        height="content",
    )
