"""Keyboard layer of the labeling page: one key press -> one action on the crop that was on screen.

Streamlit's ``st.button(shortcut=...)`` runs the callback bound in the last server run, so a key
pressed while the next crop is still on its way would label a crop the clinician never saw. This
``st.components.v2`` component sends the key *and the id of the crop shown when it was pressed*;
actions for any other crop are dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import streamlit as st

# One document listener for the page, whatever the number of renders: each render only swaps in
# the newest data and sender. Keys typed into text fields are left alone.
_JS = """
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
    if (t && (t.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(t.tagName))) return;
    const key = e.key.length === 1 ? e.key.toLowerCase() : e.key;
    if (!cur.data.keys.includes(key)) return;
    e.preventDefault();
    if (e.repeat) return;
    cur.seq += 1;
    cur.send("press", { key: key, image: cur.data.image_id, seq: cur.seq });
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


def hotkey_layer(image_id: int, actions: Mapping[str, Action], *, key: str = "hotkeys") -> None:
    """Listen for ``actions``' keys (``"1"``, ``"u"``, ``"Enter"``, ``"ArrowLeft"``, ...); each
    action is called with the id of the crop that was on screen when the key went down."""
    _component(
        key=key,
        data={"image_id": image_id, "keys": list(actions)},
        on_press_change=lambda: _on_press(key, actions),
        height="content",
    )
