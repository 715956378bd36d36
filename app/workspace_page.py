"""Slide workspace: a deep-zoom view of a whole slide (OpenSeadragon over Deep Zoom tiles from the
app's own server, :mod:`app.slide_api`) with its glomeruli on the tissue.

Wheel zoom, drag pan, a thumbnail navigator, a 1:1 button (one slide pixel per screen pixel, at
the slide's µm/px) and a scale bar in µm. Overlays are fetched as GeoJSON for the viewport after
each move: boxes drawn and not cropped yet, and glomeruli cropped into a dataset, coloured by
their label or by the model's predicted class; each layer can be hidden, the legend counts them.
**D** (or the Draw button) draws a missed glomerulus with the mouse as a box; **O** (or the
Outline button) as its outline: click its vertices, double-click (the last vertex) or **Enter**
closes it, **Escape** drops it (a second Escape leaves outline mode). Either is stored at once
(an outline with its level-0 points, its box is its bounds), attributed to the signed-in user, and
cropped into the dataset from this page (an outline's crop is cut around its bounds). A click on
a drawn box or outline selects it; **Delete** (or the Delete box button) removes it while it is
not cropped yet. Outlines (drawn, imported, accepted proposals') are drawn as outlines. A
slide whose file records no µm/px asks for it (the scale bar and the crops need it).

The detector's proposals (``glom detect --dataset``, :mod:`annotation_db.proposals`) show dashed
with their score; **N** / **P** fly to the next / previous one still to review, **A** accepts
(a box drawn by the reviewer, cropped with the others), **R** rejects, **U** (or Ctrl+Z) undoes
the last decision. A key's decision and the next proposal's highlight are painted in the key's
frame, the flight follows; each decision is stored at once (in key order), attributed; the list
is read again after each N / P and every 5 s, so a decision by another reviewer shows on the next
move. Detector and classifier checkpoints are those of the runs folder (:func:`runs_dir`:
``$GLOM_RUNS``, else ``runs/``).

The browser part is one HTML document (``WORKSPACE_HTML``) in ``st.components.v1.html``; it talks
to the routes with the token :func:`core.tile_service.sign_token` gives the signed-in user for
this slide, so moving around never reruns the page. OpenSeadragon is vendored
(``app/static/vendor/openseadragon``), never fetched from a CDN.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import streamlit as st
import streamlit.components.v1 as components
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from annotation_db import boxes as box_store
from annotation_db import store
from annotation_db.models import Slide, Stain
from app.session import current_dataset, who
from app.slide_api import PREFIX, tile_service
from app.store_cache import get_sessionmaker
from core.errors import GlomError
from core.slide_crops import (
    SLIDE_CROP_SETTINGS,
    crop_into_dataset,
    export_boxes_geojson,
)
from core.slide_summary import summarize_slide
from core.tile_service import sign_token
from core.wsi import OPENSLIDE_FORMATS, list_slide_files, slide_name

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
RUNS_DIR = REPO / "runs"  # checkpoints offered: detectors (find glomeruli) and classifiers (classify crops)


def runs_dir() -> Path:
    """The folder whose checkpoints the page offers: ``$GLOM_RUNS`` (the same setting as the
    viewer's and the job runner's; a relative one starts at the repository), else ``runs/``."""
    env = os.environ.get("GLOM_RUNS")
    return (REPO / Path(env).expanduser()).resolve() if env else RUNS_DIR


def _shown(path: Path) -> str:
    """A checkpoint as the page names it (and passes it on): relative to the repository when inside it."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
VIEW_HEIGHT_PX = 640
CLASS_COLOURS = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6"]
DRAWN = "#00c8ff"

WORKSPACE_HTML = """<!doctype html><html><head><meta charset="utf-8"><style>
html,body{margin:0;height:100%;font:13px system-ui,sans-serif;color:#222}
#wrap{position:relative;height:__HEIGHT__px;background:#f4f2f5;border-radius:8px;overflow:hidden}
#osd{position:absolute;inset:0}
#ov{position:absolute;left:0;top:0;width:100%;height:100%;pointer-events:none;z-index:3}
#ov.drawing{pointer-events:auto;cursor:crosshair}
#bar{position:absolute;left:10px;top:8px;display:flex;gap:6px;align-items:center;z-index:5;flex-wrap:wrap;
 background:rgba(255,255,255,.88);padding:4px 8px;border-radius:6px;box-shadow:0 1px 4px rgba(0,0,0,.15)}
#bar button{font:inherit;padding:2px 8px;border:1px solid #bbb;border-radius:4px;background:#fff;cursor:pointer}
#bar button.on{background:#7b2d8e;color:#fff;border-color:#7b2d8e}
#legend{position:absolute;right:10px;bottom:10px;z-index:5;background:rgba(255,255,255,.9);padding:6px 10px;
 border-radius:6px;box-shadow:0 1px 4px rgba(0,0,0,.15);max-width:260px}
#legend .sw{display:inline-block;width:12px;height:12px;border-radius:2px;margin-right:5px;vertical-align:-2px}
#scale{position:absolute;left:10px;bottom:12px;z-index:5;background:rgba(255,255,255,.85);padding:2px 6px;border-radius:4px}
#scale div{height:6px;border:2px solid #222;border-top:none}
#review{position:absolute;left:50%;bottom:12px;transform:translateX(-50%);z-index:5;background:rgba(255,255,255,.92);
 padding:4px 10px;border-radius:6px;box-shadow:0 1px 4px rgba(0,0,0,.15)}
#msg{position:absolute;left:50%;top:8px;transform:translateX(-50%);z-index:6;background:#fde8e8;color:#8a1c1c;
 padding:4px 10px;border-radius:6px;display:none}
</style></head><body><div id="wrap" data-testid="workspace">
<div id="osd"></div><canvas id="ov"></canvas>
<div id="bar"><button id="b11" title="one slide pixel per screen pixel">1:1</button>
<button id="bfit" title="whole slide">Fit</button><button id="bdraw" title="draw a missed glomerulus (D)">Draw</button>
<button id="boutline" title="outline a missed glomerulus (O): click its vertices, double-click or Enter closes, Escape cancels">Outline</button>
<button id="bdel" title="delete the selected drawn box (Delete)" disabled>Delete box</button><span id="sel"></span>
<label><input type="checkbox" id="l_drawn" checked> drawn</label>
<label><input type="checkbox" id="l_glom" checked> glomeruli</label>
<label><input type="checkbox" id="l_prop" checked> proposals</label>
<label>colour by <select id="colourby"><option value="label">label</option><option value="predicted">predicted</option></select></label>
<span id="zoom"></span></div>
<div id="legend"></div><div id="review" data-testid="review"></div><div id="scale"><div id="scalebar"></div><span id="scaletext"></span></div><div id="msg"></div>
</div>
<script src="__PREFIX__/vendor/openseadragon.min.js"></script>
<script>
const CFG = __CFG__;
const q = s => `slide=${encodeURIComponent(CFG.slide)}&t=${encodeURIComponent(CFG.token)}` +
  (CFG.dataset != null ? `&dataset=${CFG.dataset}` : '') + (s || '');
const STATUS = {proposed: '#ff9800', accepted: '#2e7d32', rejected: '#9e9e9e'};
const state = window.__glomWorkspace = {tilesLoaded: 0, tileErrors: 0, features: [], counts: {}, overlayFetches: 0,
  drawn: 0, outlined: 0, deleted: 0, selected: null, ready: false, proposals: [], current: -1, decisions: 0, undone: 0, fixes: 0, keyMs: [], keyAt: [], paint: {}, storeMs: [], pending: 0};
const msg = t => { const m = document.getElementById('msg'); m.textContent = t; m.style.display = t ? 'block' : 'none'; };
const viewer = OpenSeadragon({
  element: document.getElementById('osd'), prefixUrl: CFG.prefix + '/vendor/images/',
  showNavigator: true, navigatorPosition: 'TOP_RIGHT', showNavigationControl: false,
  // drawer: the 2D canvas, not OpenSeadragon 5's default WebGL: without a GPU (VMs, remote desktops,
  // headless) WebGL is emulated in software and each frame of a flight took ~10x longer, which
  // held the paint of the next review key (bench_review_keys: 312 -> 32-40 ms p50, see BENCHMARKS.md)
  animationTime: 0.6, maxZoomPixelRatio: 4, visibilityRatio: 0.5, crossOriginPolicy: false, drawer: 'canvas',
  gestureSettingsMouse: {clickToZoom: false, dblClickToZoom: true},
  tileSources: {width: CFG.width, height: CFG.height, tileSize: CFG.tileSize, tileOverlap: CFG.overlap,
    getTileUrl: (l, x, y) => `${CFG.prefix}/tile/${l}/${x}_${y}.jpeg?` + q()},
});
// OpenSeadragon's own keys (w/a/s/d pan, r rotates, f flips, 0 home...) would fight the review keys: off.
viewer.addHandler('canvas-key', e => { e.preventDefaultAction = true; });
viewer.addHandler('tile-loaded', () => { state.tilesLoaded++; });
viewer.addHandler('tile-load-failed', e => { state.tileErrors++; msg('Some tiles could not be loaded: ' + (e.message || 'server error')); });
const canvas = document.getElementById('ov'), ctx = canvas.getContext('2d');
const colours = {}; CFG.classes.forEach((c, i) => colours[c.key] = CFG.palette[i % CFG.palette.length]);
const display = k => (CFG.classes.find(c => c.key === k) || {display: k}).display;
function imageZoom() { return scale()[1]; }  // screen px per slide px
// level-0 pixels <-> canvas pixels, from the viewport's current bounds (viewport units: the image is
// 1 wide); CFG.offset is the slide's bounds offset that DeepZoomGenerator(limit_bounds) cuts away.
function scale() { const b = viewer.viewport.getBounds(true); return [b, canvas.clientWidth / b.width / CFG.width]; }
function toScreen(x, y) { const [b, k] = scale(); return {x: (x - CFG.offset[0]) * k - b.x * canvas.clientWidth / b.width,
  y: (y - CFG.offset[1]) * k - b.y * canvas.clientWidth / b.width}; }
function toImage(px, py) { const [b, k] = scale(); return {x: (px + b.x * canvas.clientWidth / b.width) / k + CFG.offset[0],
  y: (py + b.y * canvas.clientWidth / b.width) / k + CFG.offset[1]}; }
function colourOf(f) {
  const p = f.properties; if (p.layer === 'drawn') return CFG.drawn;
  if (p.layer === 'proposals') return STATUS[p.status] || '#ff9800';
  const k = document.getElementById('colourby').value === 'predicted' ? p.predicted : p.label;
  return k ? (colours[k] || '#888') : '#888';
}
function draw() {
  // resize (which reallocates the canvas) only when the view's size changed, else just clear
  const cw = canvas.clientWidth, ch = canvas.clientHeight;
  if (canvas.width !== cw || canvas.height !== ch) { canvas.width = cw; canvas.height = ch; } else ctx.clearRect(0, 0, cw, ch);
  const show = {drawn: document.getElementById('l_drawn').checked, glomeruli: document.getElementById('l_glom').checked,
    proposals: document.getElementById('l_prop').checked};
  ctx.lineWidth = 2;
  const cur = state.proposals[state.current], byId = new Map(state.proposals.map(p => [p.id, p]));
  for (const f of state.features) {
    if (!show[f.properties.layer]) continue;
    if (f.properties.layer === 'proposals') {
      const p = byId.get(f.properties.id) || f.properties;  // the freshest state
      ctx.strokeStyle = STATUS[p.status] || '#ff9800'; ctx.setLineDash(p.status === 'proposed' ? [5, 4] : []);
      ctx.lineWidth = cur && cur.id === p.id ? 4 : 2;
      ctx.beginPath(); f.geometry.coordinates[0].forEach(([x, y], i) => { const s = toScreen(x, y); i ? ctx.lineTo(s.x, s.y) : ctx.moveTo(s.x, s.y); });
      ctx.closePath(); ctx.stroke(); ctx.lineWidth = 2;
      const a = toScreen(p.box[0], p.box[1]); ctx.fillStyle = ctx.strokeStyle; ctx.font = '12px system-ui';
      ctx.fillText(p.score.toFixed(2), a.x, a.y - 3);
      if (cur && cur.id === p.id) for (const h of handles(p)) ctx.fillRect(h.x - 5, h.y - 5, 10, 10);
      continue;
    }
    const [x, y, w, h] = f.properties.box, a = toScreen(x, y), b = toScreen(x + w, y + h);
    ctx.strokeStyle = colourOf(f); ctx.setLineDash(f.properties.layer === 'drawn' ? [6, 4] : []);
    const chosen = f.properties.layer === 'drawn' && f.properties.id === state.selected;
    if (chosen) { ctx.lineWidth = 4; ctx.setLineDash([]); }
    if (f.properties.outline) { tracePath(f.geometry.coordinates[0]); ctx.closePath(); ctx.stroke(); }
    else ctx.strokeRect(a.x, a.y, b.x - a.x, b.y - a.y);
    ctx.lineWidth = 2;
  }
  if (drawing && shape === 'outline' && verts.length) {  // the outline being drawn, to the mouse
    ctx.setLineDash([]); ctx.strokeStyle = CFG.drawn; tracePath(verts.map(v => [v.x, v.y]));
    if (hover) ctx.lineTo(hover.x, hover.y);
    ctx.stroke(); ctx.fillStyle = CFG.drawn;
    for (const v of verts) { const s = toScreen(v.x, v.y); ctx.fillRect(s.x - 3, s.y - 3, 6, 6); }
  }
  if (fixing) { const a = toScreen(fixing.box[0], fixing.box[1]), b = toScreen(fixing.box[0] + fixing.box[2], fixing.box[1] + fixing.box[3]);
    ctx.setLineDash([]); ctx.strokeStyle = STATUS.proposed; ctx.strokeRect(a.x, a.y, b.x - a.x, b.y - a.y); }
  if (drag) { ctx.setLineDash([]); ctx.strokeStyle = CFG.drawn; ctx.strokeRect(drag.x0, drag.y0, drag.x1 - drag.x0, drag.y1 - drag.y0); }
  scaleBar(); legend();
  const z = imageZoom(); setText('zoom', z >= 1 ? `${z.toFixed(1)}:1` : `1:${(1 / z).toFixed(1)}`);
}
const shown = {};  // element id -> the text or HTML it shows
function setText(id, t) { if (shown[id] !== t) { shown[id] = t; document.getElementById(id).textContent = t; } }
function setHtml(id, h) { if (shown[id] !== h) { shown[id] = h; document.getElementById(id).innerHTML = h; } }
let drawQueued = false;  // several changes in one frame: one draw
function scheduleDraw() { if (!drawQueued) { drawQueued = true; requestAnimationFrame(() => { drawQueued = false; draw(); }); } }
function tracePath(ring) {  // a level-0 ring as the current canvas path (not closed)
  ctx.beginPath(); ring.forEach(([x, y], i) => { const s = toScreen(x, y); i ? ctx.lineTo(s.x, s.y) : ctx.moveTo(s.x, s.y); });
}
function scaleBar() {
  const el = document.getElementById('scale');
  if (!CFG.mpp) { el.style.display = 'none'; return; }
  const umPerPx = CFG.mpp / imageZoom();
  let best = 1; for (const e of [-1, 0, 1, 2, 3, 4]) for (const m of [1, 2, 5]) { const v = m * 10 ** e; if (v / umPerPx <= 160) best = v; }
  const px = Math.round(best / umPerPx) + 'px';
  if (shown.scalebar !== px) { shown.scalebar = px; document.getElementById('scalebar').style.width = px; }
  setText('scaletext', best >= 1000 ? `${best / 1000} mm` : `${best} µm`);
}
function legend() {
  const counts = {}; const by = document.getElementById('colourby').value;
  for (const f of state.features) if (f.properties.layer === 'glomeruli') {
    const k = (by === 'predicted' ? f.properties.predicted : f.properties.label) || 'unlabelled'; counts[k] = (counts[k] || 0) + 1; }
  let h = `<b>On the slide</b><br><span class="sw" style="background:${CFG.drawn}"></span>drawn, not cropped: <b data-count="drawn">${state.counts.drawn || 0}</b><br>` +
    `glomeruli: <b data-count="glomeruli">${state.counts.glomeruli || 0}</b><br>` +
    ['proposed', 'accepted', 'rejected'].map(k => `<span class="sw" style="background:${STATUS[k]}"></span>${k}: <b data-count="${k}">${state.proposals.filter(p => p.status === k).length}</b>`).join('<br>') +
    `<br><b>In view</b> (by ${by})<br>`;
  for (const [k, n] of Object.entries(counts)) h += `<span class="sw" style="background:${colours[k] || '#888'}"></span>${display(k)}: ${n}<br>`;
  setHtml('legend', h);
}
let pending = null, seq = 0;
async function fetchOverlays() {
  const p0 = toImage(0, 0), p1 = toImage(canvas.clientWidth, canvas.clientHeight);
  const b = {x: p0.x, y: p0.y, width: p1.x - p0.x, height: p1.y - p0.y};
  const my = ++seq;
  try {
    const r = await fetch(`${CFG.prefix}/overlays?` + q(`&x=${Math.floor(b.x)}&y=${Math.floor(b.y)}&w=${Math.ceil(b.width) + 1}&h=${Math.ceil(b.height) + 1}`));
    if (!r.ok) { msg('Overlays: ' + await r.text()); return; }
    const body = await r.json(); if (my !== seq) return;
    state.features = body.features; state.counts = body.counts; state.overlayFetches++; msg('');
    if (state.selected != null && !drawnBox(state.selected)) select(null);  // cropped or deleted meanwhile
    draw();
  } catch (e) { msg('Overlays could not be loaded: ' + e); }
}
function scheduleOverlays() { clearTimeout(pending); pending = setTimeout(fetchOverlays, 120); }
viewer.addHandler('open', () => { state.ready = true; fetchOverlays(); loadProposals(); });
// --- proposal review: A accept, R reject, N / P next / previous (the view flies there), U undo; drag a corner handle to fix the box ---
async function loadProposals() {
  if (state.pending) return;  // decisions on their way: the server's list would undo them on screen
  try {
    const r = await fetch(`${CFG.prefix}/proposals?` + q());
    if (!r.ok) { msg('Proposals: ' + await r.text()); return; }
    const keep = state.proposals[state.current], fresh = await r.json();
    if (state.pending) return;
    state.proposals = fresh;
    state.current = keep ? state.proposals.findIndex(p => p.id === keep.id) : -1;
    review(); draw();
  } catch (e) { msg('Proposals could not be loaded: ' + e); }
}
function review() {
  const n = state.proposals.length, p = state.proposals[state.current];
  if (!n) { setHtml('review', 'No proposals on this slide.'); return; }
  setHtml('review', p ? `Proposal <b>${state.current + 1}</b>/${n} · score ${p.score.toFixed(2)} · <b data-status>${p.status}</b>` +
    (p.by ? ` by ${p.by}` : '') + ' · <b>A</b> accept · <b>R</b> reject · <b>N</b>/<b>P</b> next/previous · <b>U</b> undo'
    : `${n} proposals · <b>N</b> goes to the first one to review`);
}
function fly(i) {  // the view flies to proposal i (tiles for the new view follow)
  const p = state.proposals[i]; if (!p) return;
  const [x, y, w, h] = p.box, m = Math.max(w, h) * 1.5, u = v => v / CFG.width;  // level-0 px -> viewport units
  viewer.viewport.fitBounds(new OpenSeadragon.Rect(u(x - CFG.offset[0] + w / 2 - m), u(y - CFG.offset[1] + h / 2 - m), u(2 * m), u(2 * m)));
}
function nextIndex(d) {  // the next (d = 1) / previous (-1) proposal still to review; -1 if none
  const n = state.proposals.length; if (!n) return -1;
  let i = state.current;
  for (let k = 0; k < n; k++) { i = (i + d + n) % n; if (state.proposals[i].status === 'proposed') return i; }
  return Math.min(Math.max(state.current + d, 0), n - 1);  // all decided: plain stepping
}
const undoStack = [];
let busy = false;
// --- fixing a proposal's box: drag one of its corner handles (the current proposal's) ---
let fixing = null;
function handles(p) {  // corners in canvas px: 0 top-left, 1 top-right, 2 bottom-right, 3 bottom-left
  const [x, y, w, h] = p.box;
  return [[x, y], [x + w, y], [x + w, y + h], [x, y + h]].map(([u, v], i) => Object.assign(toScreen(u, v), {i}));
}
const wrapEl = document.getElementById('wrap');
wrapEl.addEventListener('pointerdown', e => {
  const p = state.proposals[state.current];
  if (drawing || !p || !document.getElementById('l_prop').checked) return;
  const r = canvas.getBoundingClientRect(), px = e.clientX - r.left, py = e.clientY - r.top;
  const h = handles(p).find(h => Math.abs(h.x - px) <= 8 && Math.abs(h.y - py) <= 8);
  if (!h) return;
  e.stopPropagation(); e.preventDefault();  // the drag moves the corner, not the slide
  fixing = {p, corner: h.i, box: p.box.slice()};
}, true);
document.addEventListener('pointermove', e => {
  if (!fixing) return;
  const r = canvas.getBoundingClientRect(), m = toImage(e.clientX - r.left, e.clientY - r.top);
  const [x, y, w, h] = fixing.p.box, c = fixing.corner;
  let x0 = x, y0 = y, x1 = x + w, y1 = y + h;
  if (c === 0 || c === 3) x0 = m.x; else x1 = m.x;
  if (c === 0 || c === 1) y0 = m.y; else y1 = m.y;
  fixing.box = [Math.min(x0, x1), Math.min(y0, y1), Math.abs(x1 - x0), Math.abs(y1 - y0)];
  draw();
}, true);
document.addEventListener('pointerup', async e => {
  if (!fixing) return;
  const f = fixing; fixing = null; e.stopPropagation();
  if (busy || f.box.every((v, i) => Math.abs(v - f.p.box[i]) < 1)) { draw(); return; }
  busy = true;
  try {
    const r = await fetch(`${CFG.prefix}/proposals/${f.p.id}?` + q(), {method: 'POST', headers: {'Content-Type': 'application/json'},
      body: JSON.stringify({action: 'fix', box: f.box})});
    if (!r.ok) { msg('Not stored: ' + await r.text()); return; }
    Object.assign(f.p, await r.json()); state.fixes++; msg('');
    await loadProposals(); fetchOverlays();
  } finally { busy = false; }
}, true);
// A decision shows at once and is stored right away; stores run one after another in key order
// (a queue), and one the server refuses is put back and said on the page.
let storing = Promise.resolve();
const SHOWN = {accept: 'accepted', reject: 'rejected', undo: 'proposed'};
function decideCurrent(action, id, paint = true) {
  const p = id != null ? state.proposals.find(x => x.id === id) : state.proposals[state.current];
  if (!p) return false;
  const before = {status: p.status, by: p.by};
  p.status = SHOWN[action]; p.by = action === 'undo' ? null : CFG.user;
  if (action !== 'undo') undoStack.push(p.id);
  state.pending++;
  storing = storing.then(async () => {
    const t0 = performance.now();
    try {
      const r = await fetch(`${CFG.prefix}/proposals/${p.id}?` + q(), {method: 'POST',
        headers: {'Content-Type': 'application/json'}, body: JSON.stringify({action, label: CFG.drawLabel})});
      if (!r.ok) throw new Error(await r.text());
      Object.assign(p, await r.json()); msg('');
      state.storeMs.push(performance.now() - t0);
      if (action === 'undo') state.undone++; else state.decisions++;
    } catch (err) {
      Object.assign(p, before); msg('Not stored: ' + err.message);
    } finally {
      state.pending--;
      if (!state.pending) fetchOverlays();
      review(); scheduleDraw();
    }
  });
  if (paint) { review(); draw(); }
  return true;
}
// keys are handled one at a time (a box being fixed holds them); decisions queue, see decideCurrent
document.addEventListener('keydown', e => {
  if (busy) return;
  const t0 = performance.now(), k = e.key.length === 1 ? e.key.toLowerCase() : '';
  if (k && 'arnp'.includes(k) && !(e.ctrlKey || e.metaKey || e.altKey)) { state.keyAt.push(e.timeStamp); reviewKey(k, t0); return; }
  busy = true;
  onKey(e).finally(() => { busy = false; });
});
// A / R / N / P: the decision and the next proposal's highlight are drawn at once (one overlay
// draw), in the frame of the key; the flight to it starts only after that frame is painted (its
// tile requests and decoding would delay the paint), and nothing is fetched on the way (N / P
// re-read the list after). Measured (bench/bench_review_keys.py): keyMs, from the handler to the
// start of that frame (its requestAnimationFrame); paint[keyAt[i]], the browser's own Event Timing
// of the keydown: from the key event to the paint after it, input delay included (the browser
// reports only those of 16 ms or more).
if (window.PerformanceObserver && (PerformanceObserver.supportedEntryTypes || []).includes('event'))
  new PerformanceObserver(list => { for (const en of list.getEntries())
    if (en.name === 'keydown' && state.keyAt.includes(en.startTime)) state.paint[en.startTime] = en.duration; })
    .observe({type: 'event', durationThreshold: 16, buffered: true});
function reviewKey(k, t0) {
  let i = -1;
  if (k === 'n' || k === 'p') i = nextIndex(k === 'n' ? 1 : -1);
  else if (decideCurrent(k === 'a' ? 'accept' : 'reject', null, false)) i = nextIndex(1);
  if (i >= 0) state.current = i;
  review(); draw();
  requestAnimationFrame(() => { state.keyMs.push(performance.now() - t0); setTimeout(() => {
    if (i >= 0) fly(i);
    if ((k === 'n' || k === 'p') && !state.pending) loadProposals();  // others' decisions
  }, 0); });
}
async function onKey(e) {
  if (e.ctrlKey || e.metaKey || e.altKey) { if ((e.key === 'z' || e.key === 'Z') && undoStack.length) decideCurrent('undo', undoStack.pop()); return; }
  const k = e.key.toLowerCase();
  if (k === 'u' && undoStack.length) decideCurrent('undo', undoStack.pop());
  else if ((e.key === 'Delete' || e.key === 'Backspace') && state.selected != null) await deleteSelected();
}
// --- a drawn box: a click selects it, Delete removes it (the server refuses a cropped one) ---
const drawnBox = id => state.features.find(f => f.properties.layer === 'drawn' && f.properties.id === id);
function select(id) {
  state.selected = id; const f = id != null && drawnBox(id);
  document.getElementById('bdel').disabled = !f;
  document.getElementById('sel').textContent = f ? `box #${id} · ${f.properties.label ? display(f.properties.label) : 'no class'}` +
    ` · by ${f.properties.by}` : '';
  draw();
}
viewer.addHandler('canvas-click', e => {
  if (!e.quick || drawing || !document.getElementById('l_drawn').checked) return;
  const m = toImage(e.position.x, e.position.y);
  const hit = state.features.filter(f => f.properties.layer === 'drawn').find(f => {
    const [x, y, w, h] = f.properties.box; return m.x >= x && m.x <= x + w && m.y >= y && m.y <= y + h; });
  select(hit ? hit.properties.id : null);
});
async function deleteSelected() {
  const id = state.selected; if (id == null) return;
  const r = await fetch(`${CFG.prefix}/boxes/${id}?` + q(), {method: 'DELETE'});
  if (!r.ok) { msg('Not deleted: ' + await r.text()); return; }
  state.deleted++; msg(''); state.features = state.features.filter(f => !(f.properties.layer === 'drawn' && f.properties.id === id));
  select(null); await fetchOverlays();
}
document.getElementById('bdel').onclick = () => deleteSelected();
viewer.addHandler('update-viewport', draw);
// Others' decisions and crops made from the page (which does not reload this view) show within 5 s.
setInterval(() => { if (!document.hidden && !busy && !fixing && !drag && !state.pending && state.ready) { fetchOverlays(); loadProposals(); } }, 5000);
viewer.addHandler('animation-finish', scheduleOverlays);
viewer.addHandler('open-failed', e => msg('The slide could not be opened: ' + (e.message || '')));
new ResizeObserver(draw).observe(canvas);
for (const id of ['l_drawn', 'l_glom', 'l_prop', 'colourby']) document.getElementById(id).addEventListener('change', draw);
document.getElementById('b11').onclick = () => viewer.viewport.zoomTo(viewer.viewport.getZoom(true) / imageZoom());
document.getElementById('bfit').onclick = () => viewer.viewport.goHome();
// --- drawing a missed glomerulus: a box (D, drag) or its outline (O, click the vertices) ---
let drawing = false, shape = 'box', drag = null, verts = [], hover = null;
function setDrawing(on, kind = shape) {
  drawing = on; shape = kind; verts = []; hover = null;
  canvas.classList.toggle('drawing', on); viewer.setMouseNavEnabled(!on);
  document.getElementById('bdraw').classList.toggle('on', on && shape === 'box');
  document.getElementById('boutline').classList.toggle('on', on && shape === 'outline');
  draw();
}
const toggle = kind => setDrawing(!(drawing && shape === kind), kind);
document.getElementById('bdraw').onclick = () => toggle('box');
document.getElementById('boutline').onclick = () => toggle('outline');
document.addEventListener('keydown', e => {
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  if (e.key === 'd' || e.key === 'D') toggle('box');
  else if (e.key === 'o' || e.key === 'O') toggle('outline');
  else if (e.key === 'Enter' && verts.length) closeOutline();
  else if (e.key === 'Escape') { if (verts.length) { verts = []; hover = null; draw(); } else setDrawing(false); }
});
// canvas px -> level-0 px through OpenSeadragon's viewport -> image mapping (plus the cut-away bounds offset)
function imagePoint(px, py) {
  const p = viewer.viewport.viewerElementToImageCoordinates(new OpenSeadragon.Point(px, py));
  return {x: p.x + CFG.offset[0], y: p.y + CFG.offset[1]};
}
canvas.addEventListener('click', e => {  // a vertex; the second click of a double-click closes instead
  if (!drawing || shape !== 'outline' || e.detail > 1) return;
  verts.push(imagePoint(e.offsetX, e.offsetY)); draw();
});
canvas.addEventListener('dblclick', e => { if (drawing && shape === 'outline') { e.preventDefault(); closeOutline(); } });
canvas.addEventListener('mousemove', e => { if (drawing && shape === 'outline' && verts.length) { hover = {x: e.offsetX, y: e.offsetY}; draw(); } });
async function closeOutline() {
  const pts = verts.filter((v, i) => !i || Math.hypot(v.x - verts[i - 1].x, v.y - verts[i - 1].y) > 0.5);
  verts = []; hover = null; draw();
  if (pts.length < 3) { msg('An outline needs 3 points or more: click them, then double-click or press Enter'); return; }
  const r = await fetch(`${CFG.prefix}/boxes?` + q(), {method: 'POST', headers: {'Content-Type': 'application/json'},
    body: JSON.stringify({polygon: pts.map(v => [v.x, v.y]), label: CFG.drawLabel})});
  if (!r.ok) { msg('Not stored: ' + await r.text()); return; }
  state.outlined++; msg(''); fetchOverlays();
}
canvas.addEventListener('mousedown', e => { if (!drawing || shape !== 'box') return; drag = {x0: e.offsetX, y0: e.offsetY, x1: e.offsetX, y1: e.offsetY}; });
canvas.addEventListener('mousemove', e => { if (drag) { drag.x1 = e.offsetX; drag.y1 = e.offsetY; draw(); } });
canvas.addEventListener('mouseup', async e => {
  if (!drag) return; const d = drag; drag = null; draw();
  if (Math.abs(d.x1 - d.x0) < 6 || Math.abs(d.y1 - d.y0) < 6) return;  // a slip of the mouse
  const a = toImage(Math.min(d.x0, d.x1), Math.min(d.y0, d.y1)), b = toImage(Math.max(d.x0, d.x1), Math.max(d.y0, d.y1));
  const r = await fetch(`${CFG.prefix}/boxes?` + q(), {method: 'POST', headers: {'Content-Type': 'application/json'},
    body: JSON.stringify({box: [a.x, a.y, b.x - a.x, b.y - a.y], label: CFG.drawLabel})});
  if (!r.ok) { msg('Not stored: ' + await r.text()); return; }
  state.drawn++; fetchOverlays();
});
</script></body></html>"""


def workspace_html(*, slide: str, token: str, width: int, height: int, mpp: float | None, tile_size: int,
                   overlap: int, classes: list[dict], draw_label: str | None, dataset_id: int | None = None,
                   offset: tuple[int, int] = (0, 0), user: str = "",
                   height_px: int = VIEW_HEIGHT_PX) -> str:
    """The workspace document for one slide (all values JSON-encoded into the page)."""
    cfg = {"slide": slide, "token": token, "user": user, "dataset": dataset_id, "offset": list(offset), "width": width, "height": height, "mpp": mpp, "tileSize": tile_size,
           "overlap": overlap, "prefix": PREFIX, "classes": classes, "palette": CLASS_COLOURS, "drawn": DRAWN,
           "drawLabel": draw_label}
    return (WORKSPACE_HTML.replace("__HEIGHT__", str(height_px)).replace("__PREFIX__", PREFIX)
            .replace("__CFG__", json.dumps(cfg).replace("</", "<\\/")))


def slide_names(svc) -> list[str]:
    """The slides of the slides folder OpenSlide opens, less links that lead out of it."""
    out = []
    for name in list_slide_files(svc.root):
        try:
            svc.resolve(name)
        except GlomError:
            continue
        out.append(name)
    return out


def _slide_row(s, name: str) -> Slide | None:
    return s.scalar(select(Slide).where(Slide.name == slide_name(name)))


def classifier_checkpoints(root: Path | None = None) -> list[str]:
    """Classifier checkpoints under the runs folder (:func:`runs_dir`; sidecars with classes, not
    detectors), newest first."""
    from core.diagnosis import find_checkpoints

    out = []
    for weights in find_checkpoints(root or runs_dir()):
        try:
            meta = json.loads(weights.with_suffix(".json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and meta.get("kind", "classifier") == "classifier" and meta.get("classes"):
            out.append(_shown(weights))
    return out


def classify_crops(Session, image_ids: list[int], checkpoint: str) -> int:
    """Predict the crops ``image_ids`` with ``checkpoint`` (as the page names it) and store a
    ``Prediction`` row each (:func:`core.diagnosis.classify_crops`); how many were stored."""
    from core.diagnosis import classify_crops as classify

    return len(classify(Session, image_ids, REPO / checkpoint, runs_dir()))


def _mpp_key(name: str) -> str:
    return f"ws_mpp_{name}"  # one per slide: a value typed for one slide never applies to another


def record_mpp(name: str, mpp: float | None) -> None:
    """Store ``mpp`` (µm/px typed on the page) as slide ``name``'s, for a slide file that records none."""
    path = tile_service().resolve(name)
    with get_sessionmaker()() as s, s.begin():
        store.get_or_create_slide(s, slide_name(name), path=str(path)).mpp = mpp


def _on_mpp(name: str) -> None:
    try:
        record_mpp(name, st.session_state.get(_mpp_key(name)))
    except (GlomError, SQLAlchemyError) as e:
        st.session_state.ws_flash = ("error", f"µm/px not stored — {e}")


def mpp_panel(name: str, col) -> float | None:
    """The µm/px of a slide whose file records none: typed on the page (the store keeps it, so the
    next visit and other users see it). None until it is given."""
    key = _mpp_key(name)
    if key not in st.session_state:
        with get_sessionmaker()() as s:
            row = _slide_row(s, name)
            st.session_state[key] = row.mpp if row is not None else None
    col.number_input("µm per pixel of this slide", key=key, min_value=0.01, max_value=20.0, step=0.01,
                     format="%.4f", placeholder="e.g. 0.25", on_change=_on_mpp, args=(name,))
    mpp = st.session_state.get(key)
    if not mpp:
        st.warning("This slide does not record its µm per pixel. Enter it (from the scanner's report): the scale "
                   f"bar needs it, and crops are cut at {SLIDE_CROP_SETTINGS.mpp} µm/px.")
    return mpp or None


def _crop_drawn(name: str, dataset_name: str, user: str, checkpoint: str | None = None, mpp: float | None = None,
                stain: str | None = None) -> None:
    """Crop the slide's drawn boxes into the dataset. ``mpp``: typed µm/px of a slide whose file has none
    (stored as the slide's); ``stain``: recorded on the slide and its crops."""
    path = tile_service().resolve(name)
    try:
        with get_sessionmaker()() as s, s.begin():
            slide = _slide_row(s, name)
            todo = box_store.list_boxes(s, slide, uncropped_only=True) if slide else []
            if not todo:
                st.session_state.ws_flash = ("info", "No drawn box waits to be cropped.")
                return
            if mpp:
                slide.mpp = mpp
            done = crop_into_dataset(s, dataset_name, path, todo, annotator=user, settings=SLIDE_CROP_SETTINGS,
                                     mpp=mpp, stain=stain, source="app:workspace")
    except GlomError as e:
        st.session_state.ws_flash = ("error", f"Nothing cropped — {e}")
        return
    except SQLAlchemyError as e:
        log.warning("workspace: store error while cropping %s: %s", name, e)
        st.session_state.ws_flash = ("error", "Nothing cropped — the annotation store could not be written; try again.")
        return
    classified = ""
    if checkpoint and done.crops:
        try:
            n_pred = classify_crops(get_sessionmaker(), [c.image_id for c in done.crops], checkpoint)
            classified = f", {n_pred} classified with {checkpoint}"
        except GlomError as e:  # the crops stay: say they were cut and why they are not classified
            classified = f" (not classified — {e})"
        except SQLAlchemyError as e:
            log.warning("workspace: store error while storing predictions for %s: %s", name, e)
            classified = " (not classified — the predictions could not be stored)"
    st.session_state.ws_flash = ("success", (f"{len(done.crops)} glomeruli cropped into {dataset_name}{classified}: "
                                             "they are in the Label queue."))
    st.session_state.ws_warnings = [str(p) for p in done.report.clipped + done.report.refused]


# --- running the detector from the page --------------------------------------------------------

@dataclass
class DetectRun:
    """One ``glom detect`` subprocess for one slide (at most one per slide per server process)."""

    slide: str
    checkpoint: str
    by: str
    proc: subprocess.Popen
    log_path: Path
    started: float = field(default_factory=time.time)

    def status(self) -> tuple[str, str]:
        """("running" | "done" | "failed", the log's last line)."""
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            lines = []
        last = lines[-1][-300:] if lines else ""
        code = self.proc.poll()
        return ("running" if code is None else "done" if code == 0 else "failed"), last


_RUNS: dict[str, DetectRun] = {}
_RUNS_LOCK = threading.Lock()


def detector_checkpoints(root: Path | None = None) -> list[str]:
    """Detector checkpoints (``kind: detector`` sidecars beside their weights) under the runs folder
    (:func:`runs_dir`)."""
    root = root or runs_dir()
    out = []
    for sidecar in sorted(root.glob("*/*.json")) if root.is_dir() else []:
        try:
            kind = json.loads(sidecar.read_text()).get("kind")
        except (OSError, ValueError, AttributeError):
            continue
        if kind == "detector" and sidecar.with_suffix(".safetensors").is_file():
            out.append(_shown(sidecar.with_suffix("")))
    return out


def start_detection(slide_path: Path, checkpoint: str, dataset: str, user: str, store: str) -> DetectRun:
    """Start ``glom detect SLIDE --checkpoint C --dataset D`` in the background (its findings become
    proposals; still-proposed ones of an earlier run are replaced, decisions are kept)."""
    with _RUNS_LOCK:
        run = _RUNS.get(str(slide_path))
        if run is not None and run.proc.poll() is None:
            return run
        if run is not None:  # the finished run this one replaces: its log and GeoJSON copy go
            shutil.rmtree(run.log_path.parent, ignore_errors=True)
        # a folder per run (the GeoJSON copy and the log; the store holds the rest): slides of the same
        # name in different folders, or two servers, never write over each other's
        out = Path(tempfile.mkdtemp(prefix="glomlab-workspace-detect-"))
        log_path = out / f"{slide_path.stem}.log"
        argv = [sys.executable, "-m", "core.cli", "detect", str(slide_path), "--checkpoint", checkpoint,
                "--dataset", dataset, "--db", store, "--out", str(out), "--no-resume", "--workers", "1",
                "--threads", "1", "--device", "auto"]
        with log_path.open("w") as log:
            proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        run = DetectRun(str(slide_path), checkpoint, user, proc, log_path)
        _RUNS[str(slide_path)] = run
        return run


@st.fragment(run_every=2)
def _detect_status(slide_path: str) -> None:
    run = _RUNS.get(slide_path)
    if run is None:
        return
    state, last = run.status()
    took = time.time() - run.started
    if state == "running":
        st.info(f"Detector running on this slide for {took:.0f} s (started by {run.by}) — keep reviewing; "
                f"press **N** in the view when it is done. {last}", icon=":material/hourglass_top:")
    elif state == "done":
        st.success(f"Detector finished ({run.checkpoint}): new proposals are in — press **N** in the view.")
    else:
        st.error(f"The detector stopped on this slide: {last or 'see ' + str(run.log_path)}")


def _glomeruli_summary(s, name: str, dataset) -> tuple[object, str] | None:
    """The per-biopsy summary of this slide's cropped glomeruli (label, else predicted class) and
    its CSV; None when none is cropped yet."""
    from annotation_db.models import Image, Label, Prediction

    slide = _slide_row(s, name)
    if slide is None or dataset is None:
        return None
    ids = list(s.scalars(select(Image.id).where(Image.slide_id == slide.id, Image.dataset_id == dataset.id)))
    if not ids:
        return None
    cls: dict[int, str] = {}
    for p in s.scalars(select(Prediction).where(Prediction.image_id.in_(ids)).order_by(Prediction.id)):
        cls[p.image_id] = p.predicted
    for lab in s.scalars(select(Label).where(Label.image_id.in_(ids)).order_by(Label.updated_at)):
        if lab.classes:
            cls[lab.image_id] = lab.classes[0]  # a clinician's label over the model's class
    summary = summarize_slide(slide.name, [cls[i] for i in ids if i in cls], dataset.keys)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["slide", "class", "count", "percent"])
    for row in summary.rows({c.key: c.display_name for c in dataset.classes}):
        w.writerow([slide.name, *row])
    w.writerow([slide.name, "glomeruli cropped", len(ids), ""])
    w.writerow([slide.name, "without label or prediction", len(ids) - len(cls), ""])
    return summary, buf.getvalue()


def page() -> None:
    me = who()
    dataset = current_dataset()
    st.subheader("Slide workspace")
    try:
        svc = tile_service()
    except GlomError as e:
        st.info(f"{e}. Set $GLOM_SLIDES_DIR to the folder of your slides ({OPENSLIDE_FORMATS}).")
        return
    names = slide_names(svc)
    if not names:
        st.info(f"No slide ({OPENSLIDE_FORMATS}) in {svc.root}.")
        return
    if "ws_slide" not in st.session_state and st.session_state.get("ws_slide_kept") in names:
        st.session_state.ws_slide = st.session_state.ws_slide_kept  # Streamlit drops a widget's key on another page
    name = st.selectbox("Slide", names, key="ws_slide")
    st.session_state.ws_slide_kept = name
    try:
        info = svc.info(name)
    except GlomError as e:
        st.error(f"This slide cannot be shown — {e}")
        return
    classes = [{"key": c.key, "display": c.display_name} for c in dataset.classes] if dataset else []
    c1, c2, c3 = st.columns([2, 2, 3], vertical_alignment="bottom")
    draw_label = c1.selectbox("Class of boxes you draw or accept", [None, *[c["key"] for c in classes]], key="ws_draw_label",
                              format_func=lambda k: "no class (label later)" if k is None else dataset.display(k))
    o1, o2 = st.columns([2, 5], vertical_alignment="bottom")
    stains = [s.value for s in Stain]
    stain = o1.selectbox("Stain (recorded with the crops)", stains, key="ws_stain", index=stains.index(Stain.PAS.value))
    mpp = info.mpp or mpp_panel(name, o2)
    mpp_text = (f"{info.mpp:.3f} µm/px" if info.mpp else f"{mpp:.4f} µm/px (entered)" if mpp
                else "no µm/px recorded")
    st.caption(f"{info.width:,} × {info.height:,} px · {mpp_text} · wheel zooms, drag pans, **D** draws a box, "
               "**O** an outline, **1:1** shows one slide pixel per screen pixel")
    components.html(workspace_html(slide=name, token=sign_token(me.name, name), width=info.width, height=info.height,
                                   mpp=mpp, tile_size=info.tile_size, overlap=info.overlap, classes=classes,
                                   draw_label=draw_label, dataset_id=dataset.id if dataset else None,
                                   offset=info.offset, user=me.name),
                    height=VIEW_HEIGHT_PX + 8)
    def geojson_now() -> str:  # read when clicked: boxes drawn in the view since the last rerun count too
        with get_sessionmaker()() as s:
            slide = _slide_row(s, name)
            return json.dumps(export_boxes_geojson(s, slide, dataset) if slide
                              else {"type": "FeatureCollection", "features": []}, indent=1)

    if dataset:
        classifiers = classifier_checkpoints()
        checkpoint = st.selectbox("Classify the crops with", [None, *classifiers], key="ws_classifier",
                                  format_func=lambda c: "no model (label them yourself)" if c is None else c)
        c2.button(f"Crop the drawn boxes into {dataset.name}", key="ws_crop", help="boxes drawn or accepted in the "
                  "view and not cropped yet" + ("" if mpp else " (enter the slide's µm per pixel first)"),
                  on_click=_crop_drawn, args=(name, dataset.name, me.name, checkpoint, None if info.mpp else mpp, stain),
                  type="primary", disabled=not mpp)
    c3.download_button("QuPath GeoJSON of the glomeruli", geojson_now, file_name=f"{slide_name(name)}.geojson",
                       mime="application/geo+json", key="ws_geojson", on_click="ignore", icon=":material/download:",
                       help="boxes and outlines drawn, imported or accepted (an outline as its polygon), and the "
                            "detector's still-proposed findings as 'Glomerulus (proposed)' with their score; "
                            "rejected ones are left out")
    if dataset:
        _detector_panel(svc.root / name, name, dataset.name, me.name)
        with get_sessionmaker()() as s:
            got = _glomeruli_summary(s, name, dataset)
        if got is not None:
            summary, csv_text = got
            st.markdown(f"**Per-biopsy summary** · {summary.n_glomeruli} glomeruli with a label or a prediction")
            st.dataframe([{"class": r[0], "count": r[1], "%": r[2]} for r in summary.rows(
                {c.key: c.display_name for c in dataset.classes})], hide_index=True)
            if summary.mestc is not None:
                st.caption(f"{summary.mestc.code} — {summary.mestc.note}")
            st.download_button("Summary CSV", csv_text, file_name=f"{slide_name(name)}-summary.csv", mime="text/csv",
                               key="ws_summary_csv", on_click="ignore", icon=":material/download:")
    flash = st.session_state.pop("ws_flash", None)
    if flash:
        getattr(st, flash[0])(flash[1])
    for warning in st.session_state.pop("ws_warnings", []):
        st.warning(warning)


def _detector_panel(path: Path, name: str, dataset_name: str, user: str) -> None:
    from app.store_cache import store_url

    ckpts = detector_checkpoints()
    with st.expander("Find glomeruli with the detector", expanded=False):
        if not ckpts:
            st.caption(f"No detector checkpoint under {runs_dir()} yet: train one with `glom train-detector` "
                       "($GLOM_RUNS names another folder).")
            return
        c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
        ckpt = c1.selectbox("Detector checkpoint", ckpts, key="ws_detector")
        run = _RUNS.get(str(path))
        busy = run is not None and run.proc.poll() is None
        if c2.button("Run on this slide", key="ws_detect", disabled=busy, type="primary"):
            run = start_detection(path, ckpt, dataset_name, user, store_url())
        if run is not None:  # poll only once a run exists: a fragment rerun every 2 s closes an open checkpoint list
            _detect_status(str(path))


if __name__ == "__main__":
    page()
