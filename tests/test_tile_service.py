"""The slide workspace's tile service (core/tile_service.py) and its HTTP routes (app/slide_api.py)
on the real slide ``cmu-1-small-region.svs``: every Deep Zoom level's tiles are the JPEG of
``DeepZoomGenerator.get_tile`` byte for byte (and its pixels, through the PNG path); names are
confined to the slides root (``..``, absolute paths, symbolic links out refused); bad coordinates
are 404; a broken slide is a message, never a traceback; the cache stays within its bound; tokens
open one slide for one user and cannot be forged."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import openslide
import pytest
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image
from sqlalchemy import select
from starlette.applications import Starlette
from starlette.testclient import TestClient

from annotation_db import boxes as box_store
from annotation_db import store
from annotation_db.db import create_store_engine, make_sessionmaker, upgrade
from annotation_db.models import Image as ImageRow
from annotation_db.models import SlideBox
from core.tile_service import (
    TILE_OVERLAP,
    TILE_SIZE,
    TileCache,
    TileNotFound,
    TileService,
    TokenError,
    check_token,
    encode_jpeg,
    sign_token,
)
from core.wsi import SlideOpenError
from tests.findings import box_finding

SLIDE = "cmu-1-small-region.svs"


@pytest.fixture
def slides(tmp_path: Path, wsi_dir: Path) -> Path:
    """A slides root (in tmp) holding a copy of the real slide (2 MB), a link to it inside the root,
    a broken slide, and a link that leads out of the root."""
    root = tmp_path / "slides"
    root.mkdir()
    shutil.copy(wsi_dir / SLIDE, root / SLIDE)
    (root / "sub").mkdir()
    (root / "sub" / "again.svs").symlink_to(root / SLIDE)
    data = (wsi_dir / SLIDE).read_bytes()
    (root / "broken.svs").write_bytes(data[: len(data) // 3])  # a truncated copy: header fine, tiles gone
    outside = tmp_path / "private"
    outside.mkdir()
    shutil.copy(wsi_dir / SLIDE, outside / "patient.svs")
    (root / "escape.svs").symlink_to(outside / "patient.svs")
    return root


def test_every_level_is_deepzoomgenerator_get_tile(slides: Path):
    svc = TileService(slides)
    ref = DeepZoomGenerator(openslide.OpenSlide(str(slides / SLIDE)), tile_size=TILE_SIZE, overlap=TILE_OVERLAP,
                            limit_bounds=True)
    assert svc.slide(SLIDE).level_count == ref.level_count >= 10
    checked = 0
    for level in range(ref.level_count):
        cols, rows = ref.level_tiles[level]
        coords = {(c, r) for c in range(cols) for r in range(rows)} if cols * rows <= 16 else {
            (0, 0), (cols - 1, rows - 1), (cols // 2, rows // 2), (cols - 1, 0), (0, rows - 1)}
        for col, row in sorted(coords):
            want = ref.get_tile(level, (col, row))
            got = svc.tile(SLIDE, level, col, row)
            assert got == encode_jpeg(want, svc.quality), (level, col, row)
            assert Image.open(io.BytesIO(got)).size == want.size
            # the pixels DeepZoomTiles hands to the encoder are get_tile's own
            mine = svc.slide(SLIDE).tile_image(level, col, row)
            assert np.array_equal(np.asarray(mine), np.asarray(want)), (level, col, row)
            checked += 1
    assert checked > 25
    assert svc.opened == 1  # one handle for the process, however many tiles
    assert svc.dzi_xml(SLIDE) == ref.get_dzi("jpeg")


def test_names_are_confined_to_the_slides_root(slides: Path, tmp_path: Path):
    svc = TileService(slides)
    assert svc.resolve("sub/again.svs") == (slides / "sub" / "again.svs").resolve()
    for name in ["../private/patient.svs", "escape.svs", str(tmp_path / "private" / "patient.svs"),
                 "/etc/passwd", "sub/../../private/patient.svs", "", ".", "sub", "nothing.svs",
                 "..\\private\\patient.svs", "./" + SLIDE, "sub//again.svs"]:
        with pytest.raises(TileNotFound) as err:
            svc.tile(name, 0, 0, 0)
        assert str(err.value) == f"no slide {name!r} in the slides folder"  # the same, whether it exists or not


def test_bad_coordinates_are_not_found(slides: Path):
    svc = TileService(slides)
    top = svc.slide(SLIDE).level_count - 1
    cols, rows = svc.slide(SLIDE).generator.level_tiles[top]
    for level, col, row in [(top + 1, 0, 0), (-1, 0, 0), (top, cols, 0), (top, 0, rows), (top, -1, 0), (0, 1, 0)]:
        with pytest.raises(TileNotFound):
            svc.tile(SLIDE, level, col, row)


def test_a_broken_slide_is_a_named_error(slides: Path):
    svc = TileService(slides)
    with pytest.raises(SlideOpenError) as err:
        svc.tile("broken.svs", 0, 0, 0)
    assert "broken.svs" in str(err.value)


def test_the_cache_is_bounded_and_serves_repeats(slides: Path):
    svc = TileService(slides, cache_bytes=60_000)
    top = svc.slide(SLIDE).level_count - 1
    cols, _rows = svc.slide(SLIDE).generator.level_tiles[top]
    first = svc.tile(SLIDE, top, 0, 0)
    assert svc.tile(SLIDE, top, 0, 0) is first and svc.cache.hits == 1
    for c in range(cols):
        svc.tile(SLIDE, top, c, 1)
        assert svc.cache.bytes <= 60_000
    assert len(svc.cache) < cols  # older tiles were dropped
    cache = TileCache(10)
    cache.put(("a",), b"12345")
    cache.put(("b",), b"12345")
    cache.get(("a",))
    cache.put(("c",), b"12345")  # drops b, the least recently used
    assert cache.get(("b",)) is None and cache.get(("a",)) == b"12345" and cache.bytes == 10
    cache.put(("huge",), b"x" * 11)
    assert cache.get(("huge",)) is None


def test_tokens_open_one_slide_for_one_user(monkeypatch):
    monkeypatch.delenv("GLOM_TILE_SECRET", raising=False)
    t = sign_token("ana", SLIDE, now=1_000_000)
    assert check_token(t, SLIDE, now=1_000_000 + 3599) == "ana"
    assert t == sign_token("ana", SLIDE, now=1_000_000 + 10)  # stable: tile URLs stay cacheable
    for bad, slide, now in [(t, "other.svs", 1_000_000), (t, SLIDE, 1_000_000 + 3 * 3600), (None, SLIDE, 1_000_000),
                            ("x.y", SLIDE, 1_000_000), (t[:-2] + "AA", SLIDE, 1_000_000)]:
        with pytest.raises(TokenError):
            check_token(bad, slide, now=now)
    _body, _, mac = t.partition(".")
    import base64
    forged = base64.urlsafe_b64encode(b"admin\n" + SLIDE.encode() + b"\n9999999999").decode().rstrip("=")
    with pytest.raises(TokenError):
        check_token(f"{forged}.{mac}", SLIDE, now=1_000_000)
    monkeypatch.setenv("GLOM_TILE_SECRET", "another key")
    with pytest.raises(TokenError):
        check_token(t, SLIDE, now=1_000_000)


def test_a_verified_token_is_remembered_until_it_expires(monkeypatch):
    """Tile requests repeat one token: verified once (HMAC), then remembered with its expiry. A
    forged token is never remembered, an expired one is refused though remembered, and a token is
    remembered per key ($GLOM_TILE_SECRET) and per slide."""
    import hmac as hmac_module

    from core import tile_service

    monkeypatch.setenv("GLOM_TILE_SECRET", "remember key")
    monkeypatch.setattr(tile_service, "_VERIFIED", {})
    t = sign_token("ana", SLIDE, now=2_000_000)
    assert check_token(t, SLIDE, now=2_000_000) == "ana"
    with pytest.raises(TokenError):
        check_token(t[:-2] + "AA", SLIDE, now=2_000_000)
    assert list(tile_service._VERIFIED) == [(t, SLIDE, b"remember key")]

    def no_hmac(*a, **k):
        raise AssertionError("a remembered token was verified again")

    with monkeypatch.context() as m:
        m.setattr(hmac_module, "new", no_hmac)
        assert check_token(t, SLIDE, now=2_000_000 + 3000) == "ana"  # no HMAC this time
        with pytest.raises(AssertionError):
            check_token(t, "other.svs", now=2_000_000)  # another slide is checked in full
    with pytest.raises(TokenError):
        check_token(t, SLIDE, now=2_000_000 + 3 * 3600)  # remembered, but expired
    with pytest.raises(TokenError):
        check_token(t, "other.svs", now=2_000_000)


def test_cached_tiles_are_answered_without_the_disk_only_for_names_opened(slides: Path):
    svc = TileService(slides)
    top = svc.slide(SLIDE).level_count - 1
    assert TileService(slides).cached_tile(SLIDE, top, 0, 0) is None  # nothing opened, nothing cached
    assert svc.cached_tile(SLIDE, top, 0, 0) is None and svc.cache.misses == 0  # a peek counts no miss
    data = svc.tile(SLIDE, top, 0, 0)
    assert svc.cached_tile(SLIDE, top, 0, 0) is data
    # the link inside the root is its own name: a hit only once that name was opened itself
    assert svc.cached_tile("sub/again.svs", top, 0, 0) is None
    assert svc.tile("sub/again.svs", top, 0, 0) is data  # same file, same cache entry
    assert svc.cached_tile("sub/again.svs", top, 0, 0) is data
    for name in ["escape.svs", "../private/patient.svs", "./" + SLIDE, ""]:
        assert svc.cached_tile(name, top, 0, 0) is None
    (slides / SLIDE).unlink()  # the open handle keeps serving what it confined; new names are refused
    assert svc.cached_tile(SLIDE, top, 0, 0) is data
    with pytest.raises(TileNotFound):
        svc.tile(SLIDE, top, 1, 0)


@pytest.fixture
def client(slides: Path, tmp_path: Path, monkeypatch):
    from app import slide_api

    url = f"sqlite:///{tmp_path / 'store.db'}"
    engine = create_store_engine(url)
    upgrade(engine)
    engine.dispose()
    monkeypatch.setenv("GLOM_SLIDES_DIR", str(slides))
    monkeypatch.setenv("GLOM_DB", url)
    monkeypatch.setattr(slide_api, "_service", None)
    monkeypatch.setattr(slide_api, "_sessionmakers", {})
    with TestClient(Starlette(routes=slide_api.routes()), raise_server_exceptions=False) as c:
        c.store_url = url
        c.slides = slides
        yield c


def test_routes_serve_tiles_with_cache_headers_and_refuse_the_rest(client, slides):
    t = sign_token("ana", SLIDE)
    r = client.get("/api/slides/dzi", params={"slide": SLIDE, "t": t})
    assert r.status_code == 200 and 'Format="jpeg"' in r.text
    r = client.get("/api/slides/tile/9/0_0.jpeg", params={"slide": SLIDE, "t": t})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert "max-age" in r.headers["cache-control"]
    assert Image.open(io.BytesIO(r.content)).format == "JPEG"
    assert client.get("/api/slides/tile/9/0_0.jpeg", params={"slide": SLIDE}).status_code == 403
    assert client.get("/api/slides/tile/9/0_0.jpeg", params={"slide": "sub/again.svs", "t": t}).status_code == 403
    for path in ["/api/slides/tile/99/0_0.jpeg", "/api/slides/tile/9/99_0.jpeg", "/api/slides/tile/-1/0_0.jpeg",
                 "/api/slides/tile/9/a_0.jpeg"]:
        assert client.get(path, params={"slide": SLIDE, "t": t}).status_code == 404, path
    for name in ["../private/patient.svs", "escape.svs", "/etc/passwd"]:
        r = client.get("/api/slides/tile/9/0_0.jpeg", params={"slide": name, "t": sign_token("ana", name)})
        assert r.status_code == 404 and "Traceback" not in r.text
    r = client.get("/api/slides/tile/9/0_0.jpeg", params={"slide": "broken.svs", "t": sign_token("ana", "broken.svs")})
    assert r.status_code == 422 and "broken.svs" in r.text and "Traceback" not in r.text and str(slides) not in r.text
    r = client.get("/api/slides/vendor/openseadragon.min.js")
    assert r.status_code == 200 and "OpenSeadragon" in r.text[:2000]
    assert client.get("/api/slides/vendor/LICENSE.txt").status_code == 200


def test_a_repeated_tile_is_answered_from_the_cache_on_the_event_loop(client, monkeypatch):
    """The tile route sends a miss to a worker thread; a repeat comes from the LRU, the same bytes,
    without calling TileService.tile (no decoding, no disk)."""
    from app import slide_api

    t = sign_token("ana", SLIDE)
    first = client.get("/api/slides/tile/10/0_0.jpeg", params={"slide": SLIDE, "t": t})
    assert first.status_code == 200
    svc = slide_api.tile_service()

    def no_decoding(*a, **k):
        raise AssertionError("a cached tile went through TileService.tile")

    monkeypatch.setattr(svc, "tile", no_decoding)
    again = client.get("/api/slides/tile/10/0_0.jpeg", params={"slide": SLIDE, "t": t})
    assert again.status_code == 200 and again.content == first.content
    assert again.headers["cache-control"] == first.headers["cache-control"] == slide_api.TILE_CACHE_CONTROL
    r = client.get("/api/slides/tile/10/1_0.jpeg", params={"slide": SLIDE, "t": t})  # a miss: decoded
    assert r.status_code == 500 and "internal error" in r.text  # (by the stub: misses do reach TileService.tile)
    assert client.get("/api/slides/tile/10/0_0.jpeg", params={"slide": SLIDE, "t": "forged"}).status_code == 403


def test_overlays_per_viewport_and_drawn_boxes_attributed(client, tmp_path):
    t = sign_token("ana", SLIDE)
    engine = create_store_engine(client.store_url)
    Session = make_sessionmaker(engine)
    with Session() as s, s.begin():
        ds = store.create_dataset(s, "glom", ["a", "b"], root=tmp_path)
        slide = store.get_or_create_slide(s, "cmu-1-small-region", path=SLIDE)
        box_store.add_box(s, slide, (100, 100, 50, 50), created_by="bo", label="a")
        box_store.add_box(s, slide, (1500, 1500, 60, 60), created_by="bo")
        s.add(ImageRow(dataset_id=ds.id, path="x.png", sha256="0" * 64, width=8, height=8, slide_id=slide.id,
                       x0=120, y0=90, box_w=40, box_h=40))
    r = client.get("/api/slides/overlays", params={"slide": SLIDE, "t": t, "x": 0, "y": 0, "w": 500, "h": 500})
    assert r.status_code == 200
    body = r.json()
    assert body["counts"] == {"drawn": 2, "glomeruli": 1}
    layers = sorted((f["properties"]["layer"], tuple(f["properties"]["box"])) for f in body["features"])
    assert layers == [("drawn", (100, 100, 50, 50)), ("glomeruli", (120, 90, 40, 40))]
    r = client.post("/api/slides/boxes", params={"slide": SLIDE, "t": t}, json={"box": [10, 20, 30, 40], "label": "b"})
    assert r.status_code == 201
    with Session() as s:
        row = s.get(SlideBox, r.json()["id"])
        assert (row.box, row.label, row.created_by) == ((10, 20, 30, 40), "b", "ana")
    assert client.post("/api/slides/boxes", params={"slide": SLIDE, "t": "nope"}, json={"box": [1, 2, 3, 4]}).status_code == 403
    assert client.post("/api/slides/boxes", params={"slide": SLIDE, "t": t}, json={"box": [1, 2, 0, 4]}).status_code == 400
    assert client.get("/api/slides/overlays", params={"slide": SLIDE, "t": t, "x": "a"}).status_code == 400
    engine.dispose()


def test_decisions_are_attributed_undone_and_seen_by_another_reviewer(client, tmp_path, wsi_dir):
    from annotation_db.models import GlomerulusProposal
    from annotation_db.proposals import replace_proposals

    engine = create_store_engine(client.store_url)
    Session = make_sessionmaker(engine)
    with Session() as s, s.begin():
        ds = store.create_dataset(s, "glom", ["a", "b"], root=tmp_path)
        replace_proposals(s, ds, "cmu-1-small-region", [box_finding((100, 100, 80, 80), 0.9, area_um2=1.0),
                                                        box_finding((600, 600, 80, 80), 0.5, area_um2=1.0)],
                          source="model:x")
        replace_proposals(s, ds, "other-slide", [box_finding((1, 1, 50, 50), 0.8, area_um2=1.0)], source="model:x")
        other = s.scalar(select(GlomerulusProposal).where(GlomerulusProposal.score == 0.8)).id
    ana, bo = sign_token("ana", SLIDE), sign_token("bo", SLIDE)
    listed = client.get("/api/slides/proposals", params={"slide": SLIDE, "t": bo, "dataset": ds.id}).json()
    assert [(p["score"], p["status"]) for p in listed] == [(0.9, "proposed"), (0.5, "proposed")]
    first, second = listed[0]["id"], listed[1]["id"]

    def act(token, pid, action, label=None):
        return client.post(f"/api/slides/proposals/{pid}", params={"slide": SLIDE, "t": token},
                           json={"action": action, "label": label})

    r = act(ana, first, "accept", "a")
    assert r.status_code == 200 and (r.json()["status"], r.json()["by"]) == ("accepted", "ana")
    assert act(ana, second, "reject").json()["status"] == "rejected"
    # bo's next look shows ana's decisions
    seen = client.get("/api/slides/proposals", params={"slide": SLIDE, "t": bo}).json()
    assert [(p["status"], p["by"]) for p in seen] == [("accepted", "ana"), ("rejected", "ana")]
    with Session() as s:
        box = s.scalars(select(SlideBox)).one()
        assert (box.box, box.label, box.created_by) == ((100, 100, 80, 80), "a", "ana")
    r = client.post(f"/api/slides/proposals/{first}", params={"slide": SLIDE, "t": bo},
                    json={"action": "fix", "box": [90, 95, 100, 90.4]})
    assert r.status_code == 200 and (r.json()["box"], r.json()["status"], r.json()["by"]) == ([90, 95, 100, 90], "accepted", "bo")
    with Session() as s:
        p = s.get(GlomerulusProposal, first)
        assert p.polygon == [[90, 95], [190, 95], [190, 185], [90, 185]] and p.slide_box.box == (90, 95, 100, 90)
    for bad in ([1, 2, 0, 5], [1, 2, 3], None, ["a", 1, 2, 3]):
        assert client.post(f"/api/slides/proposals/{first}", params={"slide": SLIDE, "t": bo},
                           json={"action": "fix", "box": bad}).status_code == 400, bad
    assert act(bo, first, "undo").json()["status"] == "proposed"
    with Session() as s:
        assert s.scalars(select(SlideBox)).all() == []  # the acceptance's box went with it
    # a proposal of another slide, an unknown action, a bad token
    assert act(ana, other, "accept").status_code == 404
    assert act(ana, first, "maybe").status_code == 400
    assert act("forged", first, "accept").status_code == 403
    feats = client.get("/api/slides/overlays", params={"slide": SLIDE, "t": ana, "x": 0, "y": 0, "w": 300, "h": 300}).json()
    assert [(f["properties"]["layer"], f["properties"]["id"]) for f in feats["features"]] == [("proposals", first)]
    assert feats["counts"]["proposals_proposed"] == 1 and feats["counts"]["proposals_rejected"] == 1
    engine.dispose()


def test_a_drawn_box_is_clipped_to_the_slide_and_deleted_by_its_route_not_once_cropped(client, tmp_path):
    """POST /boxes keeps a level-0 box clipped to the slide (2220 × 2967 px); DELETE /boxes/{id}
    removes a drawn box of that slide, attributed in the answer, and refuses a cropped one, one of
    another slide, the acceptance of a proposal, and a bad token."""
    from annotation_db.models import GlomerulusProposal
    from annotation_db.proposals import accept_proposal, replace_proposals
    from core.slide_crops import crop_into_dataset

    t = sign_token("ana", SLIDE)
    params = {"slide": SLIDE, "t": t}
    engine = create_store_engine(client.store_url)
    Session = make_sessionmaker(engine)
    with Session() as s, s.begin():
        ds = store.create_dataset(s, "glom", ["a", "b"], root=tmp_path / "ds")
    posted = {}
    for key, box in {"left": [-50, 10, 100, 80.6], "right": [2100, 2900, 300, 300], "inside": [500, 600, 120, 110],
                     "kept": [900, 900, 150, 150], "crop": [1200, 1500, 200, 180]}.items():
        r = client.post("/api/slides/boxes", params=params, json={"box": box, "label": None})
        assert r.status_code == 201, (key, r.text)
        posted[key] = r.json()["id"]
    for off in ([2300, 10, 50, 50], [10, 3000, 50, 50], [-80, 10, 50, 50]):  # wholly off the slide
        r = client.post("/api/slides/boxes", params=params, json={"box": off})
        assert r.status_code == 400 and "off the slide" in r.text, (off, r.text)
    with Session() as s, s.begin():
        rows = {k: s.get(SlideBox, i) for k, i in posted.items()}
        assert rows["left"].box == (0, 10, 50, 81) and rows["right"].box == (2100, 2900, 120, 67)
        crop_into_dataset(s, "glom", client.slides / SLIDE, [rows["crop"]], annotator="ana")
        replace_proposals(s, ds, "cmu-1-small-region", [box_finding((1700, 300, 90, 90), 0.9, area_um2=1.0)], source="model:x")
        pid = s.scalar(select(GlomerulusProposal.id))
        accept_proposal(s, pid, reviewed_by="bo")
        accepted = s.get(GlomerulusProposal, pid).slide_box_id
        other = store.get_or_create_slide(s, "another-slide", path="another.svs")
        elsewhere = box_store.add_box(s, other, (1, 1, 40, 40), created_by="bo").id

    r = client.delete(f"/api/slides/boxes/{posted['inside']}", params={"slide": SLIDE, "t": sign_token("bo", SLIDE)})
    assert r.status_code == 200, r.text
    assert (r.json()["box"], r.json()["by"], r.json()["deleted_by"]) == ([500, 600, 120, 110], "ana", "bo")
    assert client.delete(f"/api/slides/boxes/{posted['inside']}", params=params).status_code == 404  # gone
    r = client.delete(f"/api/slides/boxes/{posted['crop']}", params=params)
    assert r.status_code == 400 and "cropped" in r.text
    r = client.delete(f"/api/slides/boxes/{accepted}", params=params)
    assert r.status_code == 400 and f"proposal {pid}" in r.text
    assert client.delete(f"/api/slides/boxes/{elsewhere}", params=params).status_code == 404
    assert client.delete(f"/api/slides/boxes/{posted['kept']}", params={"slide": SLIDE, "t": "forged"}).status_code == 403
    assert client.delete(f"/api/slides/boxes/{posted['kept']}",
                         params={"slide": "sub/again.svs", "t": sign_token("ana", "sub/again.svs")}).status_code == 404
    with Session() as s:
        left = set(s.scalars(select(SlideBox.id)))
        assert posted["inside"] not in left and {posted["kept"], posted["crop"], accepted, elsewhere} <= left
        assert s.get(SlideBox, posted["crop"]).image_id is not None
    engine.dispose()




def test_the_slides_folder_lists_only_files_openslide_opens(wsi_dir: Path, tmp_path: Path):
    """What the workspace's slide picker offers (core.wsi.list_slide_files): slides OpenSlide
    recognises, not every file with a slide's suffix."""
    from core.wsi import list_slide_files

    assert list_slide_files(wsi_dir) == ["cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs"]
    shutil.copy(wsi_dir / SLIDE, tmp_path / SLIDE)
    (tmp_path / "notes.svs").write_text("not a slide")
    (tmp_path / "readme.txt").write_text("x")
    assert list_slide_files(tmp_path) == [SLIDE]


def test_a_failing_store_is_a_503_that_says_read_or_written(client):
    """The store is there but broken (its tables gone): every route says whether reading or writing
    it failed, with no trace, and tiles (which need no store) still come."""
    from sqlalchemy import text

    engine = create_store_engine(client.store_url)
    with engine.begin() as conn:
        conn.execute(text("PRAGMA foreign_keys=OFF"))
        for table in ("slide_box", "glomerulus_proposal", "slide"):
            conn.execute(text(f"DROP TABLE {table}"))
    engine.dispose()
    t = sign_token("ana", SLIDE)
    q = {"slide": SLIDE, "t": t}
    reads = [client.get("/api/slides/overlays", params={**q, "x": 0, "y": 0, "w": 500, "h": 500}),
             client.get("/api/slides/proposals", params=q)]
    writes = [client.post("/api/slides/boxes", params=q, json={"box": [10, 20, 30, 40], "label": None}),
              client.request("DELETE", "/api/slides/boxes/1", params=q),
              client.post("/api/slides/proposals/1", params=q, json={"action": "accept"})]
    for r in reads:
        assert (r.status_code, r.text) == (503, "the annotation store could not be read"), r.text
    for r in writes:
        assert (r.status_code, r.text) == (503, "the annotation store could not be written"), r.text
    assert client.get("/api/slides/tile/9/0_0.jpeg", params=q).status_code == 200


def test_an_outline_drawn_in_the_workspace_is_stored_and_drawn_back_as_its_polygon(client):
    """POST /boxes with a polygon: stored with its points (a vertex past the slide's edge moved onto
    it), the box is its bounds, the overlay gives it back as that Polygon; a crossed or degenerate
    outline is a 400 saying what is wrong, and stores nothing."""
    t = sign_token("ana", SLIDE)
    q = {"slide": SLIDE, "t": t}
    ring = [[300, 200], [420, 230], [440, 330], [350, 380], [280, 300]]
    r = client.post("/api/slides/boxes", params=q, json={"polygon": ring, "label": None})
    assert r.status_code == 201, r.text
    edge = client.post("/api/slides/boxes", params=q, json={"polygon": [[2100, 10], [2230, 40], [2150, 120]]})
    assert edge.status_code == 201, edge.text  # 2230 is past the 2220 px edge
    for bad, says in [([[0, 0], [100, 100], [100, 0], [0, 120]], "no simple polygon (Self-intersection"),
                      ([[0, 0], [10, 10]], "at least 3 distinct points"),
                      ([[0, 0], [10, "x"], [0, 10]], "point 1 is not [x, y] numbers"),
                      ("10,10 20,20", "a list of [x, y] points"),
                      ([[9000, 9000], [9100, 9000], [9000, 9100]], "wholly off the slide")]:
        r = client.post("/api/slides/boxes", params=q, json={"polygon": bad})
        assert r.status_code == 400 and says in r.text, (bad, r.text)
    assert client.post("/api/slides/boxes", params=q, json=[1, 2]).status_code == 400
    engine = create_store_engine(client.store_url)
    with make_sessionmaker(engine)() as s:
        rows = s.scalars(select(SlideBox).order_by(SlideBox.id)).all()
        assert [(r.polygon, r.box, r.created_by, r.source) for r in rows] == [
            (ring, (280, 200, 160, 180), "ana", "drawn"),
            ([[2100, 10], [2220, 40], [2150, 120]], (2100, 10, 120, 110), "ana", "drawn")]
    engine.dispose()
    body = client.get("/api/slides/overlays", params={**q, "x": 0, "y": 0, "w": 600, "h": 600}).json()
    (f,) = body["features"]
    assert f["properties"]["outline"] and f["properties"]["box"] == [280, 200, 160, 180]
    assert f["geometry"] == {"type": "Polygon", "coordinates": [[*ring, ring[0]]]}
    gone = client.delete(f"/api/slides/boxes/{f['properties']['id']}", params=q)  # deleted like a box
    assert gone.status_code == 200 and body["counts"]["drawn"] == 2
