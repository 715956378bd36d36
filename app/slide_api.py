"""HTTP routes of the slide workspace, served by the labeling app's own server (``st.App`` routes,
see :mod:`app.asgi`): Deep Zoom tiles, the ``.dzi`` descriptor, overlays as GeoJSON per viewport,
boxes drawn in the browser, and the vendored OpenSeadragon files.

Every slide route takes ``?slide=NAME`` (relative to the slides root) and ``&t=TOKEN``, the
short-lived HMAC token the signed-in workspace page embeds (:func:`core.tile_service.sign_token`):
Streamlit keeps its sign-in in the websocket session, which plain HTTP requests do not carry, so
the token is what says who asks, on loopback or not. Status codes: 403 bad token, 404 no such
slide / tile (same answer whether a file exists outside the root or not), 422 a slide OpenSlide
cannot read (a message naming the slide, never a traceback).

    GET  /api/slides/dzi?slide&t                       the .dzi descriptor (JPEG tiles)
    GET  /api/slides/tile/{level}/{col}_{row}.jpeg?slide&t
    GET  /api/slides/overlays?slide&t&x&y&w&h[&dataset] FeatureCollection in the level-0 rectangle
    POST /api/slides/boxes?slide&t  {"box": [x, y, w, h] | "polygon": [[x, y], ...], "label": key|null}
                                                       a drawn glomerulus: a box or an outline
    DELETE /api/slides/boxes/{id}?slide&t              remove a drawn box not cropped yet
    GET  /api/slides/proposals?slide&t[&dataset]       the detector's proposals, best score first
    POST /api/slides/proposals/{id}?slide&t  {"action": "accept"|"reject"|"undo"|"fix", "label", "box"}
    GET  /api/slides/vendor/...                        OpenSeadragon (app/static/vendor/openseadragon)
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from core.errors import GlomError
from core.roots import slides_root
from core.tile_service import (
    SLIDE_ERRORS,
    TileNotFound,
    TileService,
    TokenError,
    check_token,
)
from core.wsi import slide_name

log = logging.getLogger(__name__)

PREFIX = "/api/slides"
VENDOR_DIR = Path(__file__).resolve().parent / "static" / "vendor" / "openseadragon"
TILE_CACHE_CONTROL = "private, max-age=86400"  # the token in the URL changes at most hourly
MAX_FEATURES = 2000  # per viewport request; the legend's counts cover the whole slide
_TILE_HEADERS = {"Cache-Control": TILE_CACHE_CONTROL}

_service: TileService | None = None
_service_env: str | None = None  # the $GLOM_SLIDES_DIR _service was made for
_service_lock = threading.Lock()
_sessionmakers: dict[str, object] = {}


def tile_service() -> TileService:
    """The process's one tile service over the slides root (``$GLOM_SLIDES_DIR``)."""
    global _service, _service_env
    env = os.environ.get("GLOM_SLIDES_DIR")
    svc = _service
    if svc is not None and env and env == _service_env:
        return svc  # every tile request asks: no path resolution while the setting is the same
    with _service_lock:
        root = slides_root()
        if root is None:
            raise TileNotFound("no slides folder is configured ($GLOM_SLIDES_DIR)")
        if _service is None or _service.root != root:
            _service = TileService(root)
        _service_env = env
        return _service


def _sessionmaker():
    from annotation_db.db import open_store
    from app.store_cache import store_url

    url = store_url()
    with _service_lock:
        if url not in _sessionmakers:
            _sessionmakers[url] = open_store(url)
        return _sessionmakers[url]


def _error(e: Exception, name: str = "", *, store: str = "read", doing: str = "") -> Response:
    """The status and message for what went wrong on slide ``name``; ``store``: whether the request
    was reading or writing the annotation store (said in a 503 when the store fails)."""
    if isinstance(e, SQLAlchemyError):
        log.warning("slide api: store error %s %r: %s", doing or "on", name, e)
        return PlainTextResponse(f"the annotation store could not be {store}", status_code=503)
    if isinstance(e, TokenError):
        return PlainTextResponse(str(e), status_code=403)
    if isinstance(e, TileNotFound):
        return PlainTextResponse(str(e), status_code=404)
    if isinstance(e, SLIDE_ERRORS):
        root = str(_service.root) if _service else ""
        return PlainTextResponse(f"slide {name!r} cannot be shown: {str(e).replace(root + '/', '')}", status_code=422)
    if isinstance(e, (GlomError, ValueError)):
        return PlainTextResponse(str(e), status_code=400)
    log.exception("slide api: unexpected error for %r", name)
    return PlainTextResponse("internal error (logged on the server)", status_code=500)


def _authorised(request: Request) -> tuple[str, str]:
    """(slide name, user) of a request whose token opens that slide; TokenError otherwise."""
    name = request.query_params.get("slide", "")
    return name, check_token(request.query_params.get("t"), name)


def dzi(request: Request) -> Response:
    name = request.query_params.get("slide", "")
    try:
        _authorised(request)
        xml = tile_service().dzi_xml(name)
    except Exception as e:  # noqa: BLE001 - every error becomes a status and a message
        return _error(e, name)
    return Response(xml, media_type="application/xml", headers={"Cache-Control": TILE_CACHE_CONTROL})


async def tile(request: Request) -> Response:
    """A Deep Zoom tile. On the event loop: the token check (remembered once verified) and a tile
    the LRU holds (answered inline, no disk); only a miss goes to a worker thread to be read,
    decoded and encoded (``DeepZoomGenerator.get_tile`` + JPEG), so slow tiles never hold the loop."""
    from starlette.concurrency import run_in_threadpool

    name = request.query_params.get("slide", "")
    try:
        _authorised(request)
        p = request.path_params
        level, col, row = int(p["level"]), int(p["col"]), int(p["row"])
        svc = tile_service()
        data = svc.cached_tile(name, level, col, row)
        if data is None:
            data = await run_in_threadpool(svc.tile, name, level, col, row)
    except Exception as e:  # noqa: BLE001
        return _error(e, name)
    return Response(data, media_type="image/jpeg", headers=_TILE_HEADERS)


def _rect(request: Request) -> tuple[int, int, int, int]:
    q = request.query_params
    try:
        x, y, w, h = (int(float(q.get(k, "0"))) for k in ("x", "y", "w", "h"))
    except ValueError:
        raise ValueError("x, y, w, h must be numbers (level-0 pixels)") from None
    if w <= 0 or h <= 0:
        raise ValueError("w and h must be > 0")
    return x, y, w, h


def _feature(layer: str, box: tuple[int, int, int, int], props: dict, outline: list | None = None) -> dict:
    """A Polygon feature: ``outline`` (an open level-0 ring; ``properties.outline`` says so) or the box."""
    x, y, w, h = box
    ring = [*outline, outline[0]] if outline else [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"layer": layer, "box": [x, y, w, h], "outline": bool(outline), **props}}


def overlay_features(session, name: str, rect: tuple[int, int, int, int], limit: int = MAX_FEATURES,
                     dataset_id: int | None = None) -> dict:
    """The overlays of slide ``name`` that meet the level-0 ``rect``: drawn boxes (layer
    ``drawn``; a box with an outline as that Polygon), cropped glomeruli (layer ``glomeruli``, with
    their label and predicted class; the outline of the box they were cut from, if any) and
    the detector's proposals (layer ``proposals``: polygon, score, status, reviewer; of
    ``dataset_id`` when given), plus ``counts`` per layer over the whole slide (the legend)."""
    from annotation_db.models import (
        GlomerulusProposal,
        Image,
        Label,
        Prediction,
        Slide,
        SlideBox,
    )

    slide = session.scalar(select(Slide).where(Slide.name == slide_name(name)))
    out: dict = {"type": "FeatureCollection", "features": [], "counts": {}, "truncated": False}
    if slide is None:
        return out
    x, y, w, h = rect

    def meets(t):
        return (t.x0 < x + w) & (t.x0 + t.box_w > x) & (t.y0 < y + h) & (t.y0 + t.box_h > y)

    drawn = session.scalars(select(SlideBox).where(SlideBox.slide_id == slide.id, meets(SlideBox))
                            .order_by(SlideBox.id).limit(limit + 1)).all()
    images = session.scalars(select(Image).where(Image.slide_id == slide.id, Image.x0.is_not(None), meets(Image))
                             .order_by(Image.id).limit(limit + 1)).all()
    out["truncated"] = len(drawn) > limit or len(images) > limit
    ids = [i.id for i in images[:limit]]
    labels: dict[int, str] = {}
    predicted: dict[int, str] = {}
    outlines: dict[int, list] = {}
    if ids:
        for lab in session.scalars(select(Label).where(Label.image_id.in_(ids)).order_by(Label.updated_at)):
            if lab.classes:
                labels[lab.image_id] = lab.classes[0]  # the latest label wins on the map
        for pred in session.scalars(select(Prediction).where(Prediction.image_id.in_(ids)).order_by(Prediction.id)):
            predicted[pred.image_id] = pred.predicted
        for image_id, ring in session.execute(select(SlideBox.image_id, SlideBox.polygon).where(
                SlideBox.image_id.in_(ids), SlideBox.polygon.is_not(None))):
            outlines[image_id] = ring
    for b in drawn[:limit]:
        if b.image_id is None:  # a cropped box shows as its glomerulus
            out["features"].append(_feature("drawn", b.box, {"id": b.id, "label": b.label, "by": b.created_by,
                                                             "source": b.source}, b.polygon))
    for i in images[:limit]:
        out["features"].append(_feature("glomeruli", (i.x0, i.y0, i.box_w, i.box_h),
                                        {"id": i.id, "label": labels.get(i.id), "predicted": predicted.get(i.id)},
                                        outlines.get(i.id)))
    n_drawn = session.scalar(select(func.count()).select_from(SlideBox)
                             .where(SlideBox.slide_id == slide.id, SlideBox.image_id.is_(None)))
    n_glom = session.scalar(select(func.count()).select_from(Image).where(Image.slide_id == slide.id, Image.x0.is_not(None)))
    out["counts"] = {"drawn": int(n_drawn or 0), "glomeruli": int(n_glom or 0)}
    pq = select(GlomerulusProposal).where(GlomerulusProposal.slide_id == slide.id, meets(GlomerulusProposal))
    cq = select(GlomerulusProposal.status, func.count()).where(GlomerulusProposal.slide_id == slide.id)
    if dataset_id is not None:
        pq = pq.where(GlomerulusProposal.dataset_id == dataset_id)
        cq = cq.where(GlomerulusProposal.dataset_id == dataset_id)
    props = session.scalars(pq.order_by(GlomerulusProposal.score.desc()).limit(limit + 1)).all()
    out["truncated"] = out["truncated"] or len(props) > limit
    for p in props[:limit]:
        out["features"].append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [p.polygon]},
                                "properties": {"layer": "proposals", "id": p.id, "box": list(p.box),
                                               "score": round(p.score, 3), "status": p.status,
                                               "by": p.reviewed_by}})
    for status, n in session.execute(cq.group_by(GlomerulusProposal.status)):
        out["counts"][f"proposals_{status}"] = int(n)
    return out


def _dataset_id(request: Request) -> int | None:
    raw = request.query_params.get("dataset")
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError("dataset must be a dataset id") from None


def overlays(request: Request) -> Response:
    name = request.query_params.get("slide", "")
    try:
        _authorised(request)
        tile_service().resolve(name)
        rect = _rect(request)
        with _sessionmaker()() as s:
            body = overlay_features(s, name, rect, dataset_id=_dataset_id(request))
    except Exception as e:  # noqa: BLE001 - every error becomes a status and a message
        return _error(e, name, store="read", doing="for overlays of")
    return JSONResponse(body, headers={"Cache-Control": "no-store"})


async def add_box(request: Request) -> Response:
    """A glomerulus drawn in the workspace, as a box or as an outline: stored at once, attributed
    to the token's user."""
    from starlette.concurrency import run_in_threadpool

    name = request.query_params.get("slide", "")
    try:
        _, user = _authorised(request)
        body = json.loads(await request.body() or b"{}")
        if not isinstance(body, dict):
            raise ValueError('body must be a JSON object: {"box": [x, y, w, h]} or {"polygon": [[x, y], ...]}')  # noqa: TRY004 - a 400
        box, label, polygon = body.get("box"), body.get("label") or None, body.get("polygon")
        if polygon is None and not (isinstance(box, list) and len(box) == 4):
            raise ValueError('body must be {"box": [x, y, w, h]} or {"polygon": [[x, y], ...]} (level-0 px), '
                             'with "label": key or null')
        path = tile_service().resolve(name)
        box_id = await run_in_threadpool(_store_box, path, box, label, user, polygon)
    except Exception as e:  # noqa: BLE001 - every error becomes a status and a message
        return _error(e, name, store="written", doing="adding a box to")
    return JSONResponse({"id": box_id}, status_code=201)


def _store_box(path: Path, box: list | None, label: str | None, user: str, polygon: list | None = None) -> int:
    from annotation_db import boxes as box_store
    from annotation_db import store
    from core.extract import clip_box

    svc = tile_service()
    tiles = svc.slide(str(path.relative_to(svc.root)))
    if polygon is not None:
        return _store_outline(path, tiles, polygon, label, user)
    try:
        drawn = tuple(round(float(v)) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"box must be four numbers (level-0 x, y, w, h), got {box!r}") from None
    if drawn[2] <= 0 or drawn[3] <= 0:
        raise ValueError(f"box {list(drawn)} is empty (width and height must be > 0)")
    clipped = clip_box(drawn, tiles.slide.dimensions)
    if clipped is None:
        raise ValueError(f"box {list(drawn)} lies wholly off the slide ({tiles.slide.dimensions[0]}×"
                         f"{tiles.slide.dimensions[1]} px)")
    with _sessionmaker()() as s, s.begin():
        slide = store.get_or_create_slide(s, slide_name(path), path=str(path), mpp=tiles.slide.mpp)
        return box_store.add_box(s, slide, clipped, created_by=user, label=label).id


def _store_outline(path: Path, tiles, polygon, label: str | None, user: str) -> int:
    """Store an outline drawn in the workspace (its box is its bounds). A vertex clicked just past
    the slide's edge is moved onto it; an outline wholly off the slide is refused."""
    from annotation_db import boxes as box_store
    from annotation_db import store
    from core.extract import clip_box

    try:
        ring = box_store.outline_ring(polygon)
    except box_store.OutlineError as e:
        raise ValueError(f"slide {slide_name(path)}: {e}") from None
    width, height = tiles.slide.dimensions
    if clip_box(box_store.outline_box(ring), (width, height)) is None:
        raise ValueError(f"the outline lies wholly off the slide ({width}×{height} px)")
    ring = [[min(max(x, 0.0), float(width)), min(max(y, 0.0), float(height))] for x, y in ring]
    with _sessionmaker()() as s, s.begin():
        slide = store.get_or_create_slide(s, slide_name(path), path=str(path), mpp=tiles.slide.mpp)
        return box_store.add_box(s, slide, None, polygon=ring, created_by=user, label=label).id


def remove_box(session, name: str, box_id: int, user: str) -> dict:
    """Delete drawn box ``box_id`` of slide ``name`` for ``user`` (logged with their name). A box of
    another slide is refused like a missing one; a box cropped into a dataset already, or drawn by
    accepting a detector proposal (undo or reject the proposal instead), is refused."""
    from annotation_db.boxes import BoxError
    from annotation_db.models import GlomerulusProposal, SlideBox

    box = session.get(SlideBox, box_id)
    if box is None or box.slide.name != slide_name(name):
        raise TileNotFound(f"no drawn box {box_id} on slide {name!r}")
    if box.image_id is not None:
        raise BoxError(f"box {box_id} was cropped into the dataset already (image {box.image_id}): "
                       "remove the crop there instead")
    proposal = session.scalar(select(GlomerulusProposal.id).where(GlomerulusProposal.slide_box_id == box_id))
    if proposal is not None:
        raise BoxError(f"box {box_id} is the acceptance of proposal {proposal}: undo (U) or reject the proposal instead")
    gone = {"id": box.id, "box": list(box.box), "label": box.label, "by": box.created_by, "deleted_by": user}
    session.delete(box)
    session.flush()
    log.info("slide %s: drawn box %d %s (by %s) deleted by %s", slide_name(name), box_id, gone["box"],
             gone["by"], user)
    return gone


async def delete_box(request: Request) -> Response:
    """A drawn box removed in the workspace (Delete key on the selected box), attributed to the token's user."""
    from starlette.concurrency import run_in_threadpool

    name = request.query_params.get("slide", "")
    try:
        _, user = _authorised(request)
        tile_service().resolve(name)

        def apply() -> dict:
            with _sessionmaker()() as s, s.begin():
                return remove_box(s, name, int(request.path_params["bid"]), user)

        gone = await run_in_threadpool(apply)
    except Exception as e:  # noqa: BLE001 - every error becomes a status and a message
        return _error(e, name, store="written", doing="deleting a box on")
    return JSONResponse(gone)


def proposal_list(session, name: str, dataset_id: int | None) -> list[dict]:
    """Every proposal of slide ``name`` (of ``dataset_id`` when given), best score first: what the
    review steps through with N / P (boxes and states only, no polygons)."""
    from annotation_db.proposals import list_proposals

    return [{"id": p.id, "box": list(p.box), "score": round(p.score, 3), "status": p.status, "by": p.reviewed_by}
            for p in list_proposals(session, slide_name(name), dataset_id and _dataset(session, dataset_id))]


def _dataset(session, dataset_id: int):
    from annotation_db.models import Dataset

    ds = session.get(Dataset, dataset_id)
    if ds is None:
        raise ValueError(f"no dataset with id {dataset_id}")
    return ds


def proposals(request: Request) -> Response:
    name = request.query_params.get("slide", "")
    try:
        _authorised(request)
        tile_service().resolve(name)
        with _sessionmaker()() as s:
            body = proposal_list(s, name, _dataset_id(request))
    except Exception as e:  # noqa: BLE001 - every error becomes a status and a message
        return _error(e, name, store="read", doing="listing proposals of")
    return JSONResponse(body, headers={"Cache-Control": "no-store"})


def decide(session, name: str, proposal_id: int, action: str, user: str, label: str | None = None,
           box: list | None = None) -> dict:
    """Apply a reviewer's ``action`` (accept / reject / undo / fix) to a proposal of slide ``name``
    and return its new state. ``undo`` puts it back to proposed (removing the box an acceptance
    drew, unless it was cropped already); ``fix`` moves its box to ``box`` (level-0 x, y, w, h; the
    outline is scaled from the old box into the new one, the box an acceptance drew and its outline
    follow, the fixer is recorded as its reviewer). A proposal of another slide is refused like a
    missing one."""
    from annotation_db.boxes import move_box, scale_outline
    from annotation_db.models import GlomerulusProposal
    from annotation_db.proposals import ProposalError, accept_proposal, reject_proposal

    p = session.get(GlomerulusProposal, proposal_id)
    if p is None or p.slide.name != slide_name(name):
        raise TileNotFound(f"no proposal {proposal_id} on slide {name!r}")
    if action == "accept":
        accept_proposal(session, proposal_id, reviewed_by=user, label=label)
    elif action == "reject":
        reject_proposal(session, proposal_id, reviewed_by=user)
    elif action == "fix":
        try:
            x, y, w, h = (round(float(v)) for v in box)
        except (TypeError, ValueError):
            raise ValueError('fix needs "box": [x, y, w, h] in level-0 pixels') from None
        if w < 4 or h < 4 or x + w <= 0 or y + h <= 0:
            raise ValueError(f"fix: box {[x, y, w, h]} is empty or off the slide")
        if p.slide_box is not None and p.slide_box.image_id is not None:
            raise ProposalError(f"proposal {proposal_id} was cropped into the dataset already: its box is final")
        if p.slide_box is not None:
            move_box(p.slide_box, (x, y, w, h))
        p.polygon = scale_outline(p.polygon, p.box, (x, y, w, h)) if p.polygon else \
            [[x, y], [x + w, y], [x + w, y + h], [x, y + h]]
        p.x0, p.y0, p.box_w, p.box_h = x, y, w, h
        p.reviewed_by = user
    elif action == "undo":
        if p.slide_box is not None:
            if p.slide_box.image_id is not None:
                raise ProposalError(f"proposal {proposal_id} was cropped into the dataset already: "
                                    "remove the crop there instead")
            session.delete(p.slide_box)
            p.slide_box_id = None
        p.status, p.reviewed_by, p.reviewed_at = "proposed", None, None
    else:
        raise ValueError(f"action must be accept, reject, undo or fix, not {action!r}")
    session.flush()
    return {"id": p.id, "box": list(p.box), "score": round(p.score, 3), "status": p.status, "by": p.reviewed_by}


async def decision(request: Request) -> Response:
    """A reviewer's decision on one proposal, stored at once and attributed to the token's user."""
    from starlette.concurrency import run_in_threadpool

    name = request.query_params.get("slide", "")
    try:
        _, user = _authorised(request)
        body = json.loads(await request.body() or b"{}")
        tile_service().resolve(name)

        def apply() -> dict:
            with _sessionmaker()() as s, s.begin():
                return decide(s, name, int(request.path_params["pid"]), str(body.get("action")), user,
                              body.get("label") or None, body.get("box"))

        state = await run_in_threadpool(apply)
    except Exception as e:  # noqa: BLE001 - every error becomes a status and a message
        return _error(e, name, store="written", doing="deciding a proposal on")
    return JSONResponse(state)


def routes() -> list:
    """The workspace's routes, for ``st.App(..., routes=routes())``."""
    return [
        Route(f"{PREFIX}/dzi", dzi),
        Route(f"{PREFIX}/tile/{{level:int}}/{{col:int}}_{{row:int}}.jpeg", tile),
        Route(f"{PREFIX}/overlays", overlays),
        Route(f"{PREFIX}/boxes", add_box, methods=["POST"]),
        Route(f"{PREFIX}/boxes/{{bid:int}}", delete_box, methods=["DELETE"]),
        Route(f"{PREFIX}/proposals", proposals),
        Route(f"{PREFIX}/proposals/{{pid:int}}", decision, methods=["POST"]),
        Mount(f"{PREFIX}/vendor", app=StaticFiles(directory=VENDOR_DIR, check_dir=False), name="osd"),
    ]
