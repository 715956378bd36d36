"""The viewer's named API endpoints, driven with gradio_client against the live app on loopback,
with a temporary SQLite store; every write is checked in the store afterwards."""

from __future__ import annotations

import csv
import json
import subprocess
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import func, select

from annotation_db.classes import GLOMERULUS_CLASSES
from annotation_db.db import create_store_engine, make_sessionmaker, upgrade
from annotation_db.boxes import add_box
from annotation_db.models import Annotator, Image, Label, Prediction, SlideBox
from annotation_db.queues import QueueSpec, next_image_ids
from annotation_db.store import add_image, create_dataset, get_dataset, get_or_create_slide
from annotation_db.users import add_user
from core.annotations import Annotation, write_geojson
from core.demo import DEMO_CLASSES
from tests.demo_checkpoint import demo_checkpoint, demo_set
from tests.viewer_server import free_port, running_viewer

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

CMU, TCGA = "cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs"
PASSWORD = "correct horse battery"

pytestmark = pytest.mark.slow  # trains a tiny model and starts the app: ~20 s alone, more on a busy machine


@pytest.fixture(scope="module")
def world(tmp_path_factory, wsi_dir):
    """A trained 4-class checkpoint under runs/, a store with a 'demo' dataset on two slides,
    a slides folder (the two real slides and a damaged copy), and the app running on a free
    loopback port."""
    root = tmp_path_factory.mktemp("viewer")
    runs = root / "runs"
    demo_checkpoint(runs / "demo" / "best")
    crops = demo_set(root / "crops", 3, seed=2)  # 12 unseen crops
    url = f"sqlite:///{root / 'store.db'}"
    engine = create_store_engine(url)
    upgrade(engine)
    with make_sessionmaker(engine).begin() as s:
        add_user(s, "dr_lee", PASSWORD, "annotator")  # an account turns the viewer's login on
        ds = create_dataset(s, "demo", GLOMERULUS_CLASSES, root=root / "crops")
        for i, p in enumerate(crops.paths):
            add_image(s, ds, p, slide=get_or_create_slide(s, f"biopsy-{'AB'[i % 2]}"))
    slides = root / "slides"
    slides.mkdir()
    for f in (CMU, TCGA):
        (slides / f).symlink_to(wsi_dir / f)
    data = (wsi_dir / CMU).read_bytes()  # tiles zeroed, directory intact: listed, fails when read
    (slides / "broken.svs").write_bytes(data[:300_000] + bytes(600_000) + data[900_000:])
    try:
        with running_viewer(root, runs, url, slides=slides) as (base, proc):
            client = Client(base, auth=("dr_lee", PASSWORD), verbose=False, analytics_enabled=False,
                            download_files=str(root / "downloads"))
            yield {"root": root, "runs": runs, "ckpt": str(runs / "demo" / "best.safetensors"), "crops": crops,
                   "Session": make_sessionmaker(engine), "client": client, "proc": proc, "log": root / "viewer.log"}
    finally:
        engine.dispose()


def _rows(table_out: dict) -> list[list]:
    """Rows of a Dataframe output (a component update carries it under "value")."""
    value = table_out.get("value", table_out) if table_out.get("__type__") == "update" else table_out
    return value["data"]


def _top(label_out: dict) -> tuple[str, float]:
    return label_out["label"], max(c["confidence"] for c in label_out["confidences"])


def test_binds_loopback_and_exposes_named_endpoints(world):
    named = set(world["client"].view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/predict", "/cam", "/batch", "/store_batch", "/slide_batch", "/slides", "/disagree", "/slide_summary",
            "/checkpoints"} <= named
    port = world["client"].src.rstrip("/").rsplit(":", 1)[1]
    try:
        out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
    except FileNotFoundError:
        out = ""
    local = [line.split()[3] for line in out.splitlines() if line.strip()]
    if local:  # `ss` is there: the listening socket must be on loopback only
        assert all(addr.startswith("127.0.0.1:") for addr in local), local


def test_checkpoints_lists_the_run(world):
    out = world["client"].predict(api_name="/checkpoints")
    assert out["value"] == world["ckpt"]
    assert ["demo/best.safetensors", world["ckpt"]] in out["choices"]


def test_predict_is_right_calibrated_and_stored(world):
    crops, c = world["crops"], world["client"]
    right = 0
    for p, label in list(zip(crops.paths, crops.labels))[:4]:
        probs, md = c.predict(world["ckpt"], handle_file(str(p)), "", api_name="/predict")
        top, conf = _top(probs)
        right += top.endswith(f"({label})") or top == label
        assert "calibrated (temperature 1.50)" in md
        assert sum(x["confidence"] for x in probs["confidences"]) == pytest.approx(1.0, abs=1e-3)
    assert right >= 3
    with world["Session"]() as s:
        ds = get_dataset(s, "viewer-uploads")
        assert ds.class_keys == list(DEMO_CLASSES)
        stored = s.scalars(select(Image).where(Image.dataset_id == ds.id)).all()
        assert len(stored) == 4 and all((Path(ds.root) / im.path).is_file() for im in stored)
        assert all(len(Path(im.path).stem) == 64 for im in stored)  # content-hash names
        preds = s.scalars(select(Prediction).where(Prediction.image_id.in_([im.id for im in stored]))).all()
        assert len(preds) == 4 and all(p.checkpoint_id.startswith("demo/best@") for p in preds)


def test_cam_returns_heatmap_beside_original(world):
    p = world["crops"].paths[1]
    probs, md, original, heat = world["client"].predict(
        world["ckpt"], handle_file(str(p)), "gradcam++", "__predicted__", "normal", 0.6, api_name="/cam")
    orig, over = np.asarray(PILImage.open(original).convert("RGB")), np.asarray(PILImage.open(heat).convert("RGB"))
    assert orig.shape == over.shape == (96, 96, 3)
    assert np.abs(orig.astype(int) - over.astype(int)).mean() > 10  # the heatmap is drawn
    assert "Grad-CAM++" in md and "rather than" in md


def test_batch_gallery_sorted_by_uncertainty_with_csv(world):
    files = [handle_file(str(p)) for p in world["crops"].paths[:8]]
    gallery, csv_path, summary, table = world["client"].predict(world["ckpt"], files, "gradcam", 0.45,
                                                                api_name="/batch")
    assert len(gallery) == 8 and all(Path(g["image"]).is_file() for g in gallery)
    rows = list(csv.DictReader(open(csv_path)))
    assert len(rows) == 8 and {f"p_{k}" for k in DEMO_CLASSES} <= set(rows[0])
    margins = [float(r["margin"]) for r in rows]
    assert margins == sorted(margins) and [int(r["uncertainty_rank"]) for r in rows] == list(range(1, 9))
    assert gallery[0]["caption"].startswith("#1 ")
    assert "8 glomeruli" in summary and "MEST-C-style" in summary and "not a diagnosis" in summary
    with world["Session"]() as s:
        ids = [int(r["store_image_id"]) for r in rows]
        assert len(s.scalars(select(Prediction.id).where(Prediction.image_id.in_(ids))).all()) >= 8


def test_slide_summary_per_biopsy_from_the_store(world):
    md, table = world["client"].predict(world["ckpt"], "demo", "", api_name="/slide_summary")
    assert [r[0] for r in _rows(table)] == ["biopsy-A", "biopsy-B"]
    assert [r[1] for r in _rows(table)] == [6, 6]
    assert sum(int(cell.split()[0]) for r in _rows(table) for cell in r[2:6]) == 12
    assert "decision support" in md.lower() and "E, T not assessed" in md
    md_a, table_a = world["client"].predict(world["ckpt"], "demo", "biopsy-A", api_name="/slide_summary")
    assert [r[0] for r in _rows(table_a)] == ["biopsy-A"]


def _geojson(path: Path, boxes) -> Path:
    """A QuPath GeoJSON of (x, y, w, h, class) boxes."""
    return write_geojson([Annotation.rectangle(*b) for b in boxes], path)


def test_a_slide_with_its_annotations_is_cut_predicted_and_summarised(world, tmp_path):
    c = world["client"]
    listed = c.predict(api_name="/slides")
    assert [name for name, _ in listed["choices"]] == ["broken.svs", CMU, TCGA]
    boxes = [(100, 200, 300, 260, "normal"), (900, 1200, 280, 240, "crescent"), (1500, 400, 300, 300, "Glomerulus"),
             (300, 2000, 260, 260, None), (2100, 2800, 300, 260, "normal")]
    ann = handle_file(str(_geojson(tmp_path / "cmu.geojson", boxes)))
    gallery, csv_path, summary, table, *_ = c.predict(world["ckpt"], CMU, ann, None, "gradcam", 0.45, 3,
                                                      api_name="/slide_batch")
    assert len(gallery) == 3 and all(Path(g["image"]).is_file() for g in gallery)  # the 3 most uncertain
    rows = list(csv.DictReader(open(csv_path)))
    assert len(rows) == 5 and {r["slide"] for r in rows} == {"cmu-1-small-region"}
    assert [float(r["margin"]) for r in rows] == sorted(float(r["margin"]) for r in rows)
    assert sorted(r["annotated"] for r in rows) == ["", "", "crescent", "normal", "normal"]
    assert [r[0] for r in _rows(table)] == ["cmu-1-small-region"] and _rows(table)[0][1] == 5
    assert "5 glomeruli from 5 annotations (cmu.geojson)" in summary and "1 clipped at the slide edge" in summary
    assert "Glomerulus ×1" in summary and "of 3** annotated glomeruli" in summary and "MEST-C-style" in summary
    assert "the 3 most uncertain of 5" in summary
    with world["Session"]() as s:
        ds = get_dataset(s, "viewer-slides")
        images = s.scalars(select(Image).where(Image.dataset_id == ds.id).order_by(Image.x0)).all()
        assert [(im.x0, im.y0) for im in images] == [(84, 184), (284, 1984), (884, 1184), (1484, 384), (2084, 2784)]
        assert all(im.slide.name == "cmu-1-small-region" and (Path(ds.root) / im.path).is_file() for im in images)
        assert sorted(int(r["store_image_id"]) for r in rows) == sorted(im.id for im in images)
        n_pred = s.scalar(select(func.count()).select_from(Prediction).where(Prediction.image_id.in_([im.id for im in images])))
        assert n_pred == 5
        assert not s.scalars(select(Label.id).where(Label.image_id.in_([im.id for im in images]))).all()
    # A slide crop opened from the gallery can be disagreed with like any store crop.
    first = next(r for r in rows if r["annotated"] == "crescent")
    with world["Session"]() as s:
        img = s.get(Image, int(first["store_image_id"]))
        path, ref = Path(get_dataset(s, "viewer-slides").root) / img.path, f"store:{img.id}"
    chosen = next(k for k in DEMO_CLASSES if k != first["predicted"])
    msg = c.predict(world["ckpt"], handle_file(str(path)), chosen, ref, api_name="/disagree")
    assert "dataset `viewer-slides`" in msg and "disagreement queue" in msg
    # Again: the crops are reused (no new rows), the predictions recorded again.
    _, _, summary2, _, *_ = c.predict(world["ckpt"], CMU, ann, None, "", 0.45, 64, api_name="/slide_batch")
    assert "0 crops cut now, 5 reused" in summary2
    with world["Session"]() as s:
        assert s.scalar(select(func.count()).select_from(Image).where(Image.dataset_id == ds.id)) == 5


def test_a_slide_without_a_file_uses_the_boxes_drawn_in_the_labeling_app(world):
    c = world["client"]
    with pytest.raises(AppError, match=r"tcga-cr-7395-01a-01-ts1\.svs has no annotations: upload"):
        c.predict(world["ckpt"], TCGA, None, 0.25, "", 0.45, 64, api_name="/slide_batch")
    with world["Session"]() as s, s.begin():
        slide = get_or_create_slide(s, "tcga-cr-7395-01a-01-ts1", path=str(world["root"] / "slides" / TCGA))
        add_box(s, slide, (2000, 1500, 400, 400), created_by="dr-a", label="crescent")
        add_box(s, slide, (3000, 2500, 380, 360), created_by="dr-a")
        add_box(s, slide, (5000, 3000, 380, 360), created_by="dr-a")  # beyond the slide's 4443 x 3567
    with pytest.raises(AppError, match=r"tcga-cr-7395-01a-01-ts1\.svs records no µm/px: enter it under 'Slide µm/px'"):
        c.predict(world["ckpt"], TCGA, None, None, "", 0.45, 64, api_name="/slide_batch")
    _, csv_path, summary, table, *_ = c.predict(world["ckpt"], TCGA, None, 0.25, "gradcam", 0.45, 64,
                                                api_name="/slide_batch")
    rows = list(csv.DictReader(open(csv_path)))
    assert len(rows) == 2 and sorted(r["annotated"] for r in rows) == ["", "crescent"]
    assert "2 glomeruli from 3 annotations (3 boxes drawn in the labeling app)" in summary
    assert "1 refused: " in summary and "outside the slide" in summary
    with world["Session"]() as s:  # the drawn boxes stay "not cropped" for the labeling app's dataset
        assert s.scalars(select(SlideBox.image_id)).all() == [None, None, None]


def test_bad_slides_and_annotation_files_get_clear_messages(world, tmp_path):
    c = world["client"]
    ann = handle_file(str(_geojson(tmp_path / "a.geojson", [(100, 100, 200, 200, None), (1000, 1500, 64, 64, None)])))
    with pytest.raises(AppError, match=r"'\.\./\.\./etc/passwd' is not a slide in"):
        c.predict(world["ckpt"], "../../etc/passwd", ann, None, "", 0.45, 64, api_name="/slide_batch")
    with pytest.raises(AppError, match=r"broken\.svs.*Not a JPEG file"):  # its tiles are zeros
        c.predict(world["ckpt"], "broken.svs", ann, None, "", 0.45, 64, api_name="/slide_batch")
    notes = tmp_path / "notes.txt"
    notes.write_text("x,y\n1,2\n")
    with pytest.raises(AppError, match=r"Invalid file type.*'\.geojson'"):  # Gradio refuses it before we see it
        c.predict(world["ckpt"], CMU, handle_file(str(notes)), None, "", 0.45, 64, api_name="/slide_batch")
    bad = tmp_path / "bad.geojson"
    bad.write_text('{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": '
                   '{"type": "Polygon", "coordinates": [[["a", 1]]]}}]}')
    with pytest.raises(AppError, match=r"bad\.geojson.*coordinates must be numbers"):
        c.predict(world["ckpt"], CMU, handle_file(str(bad)), None, "", 0.45, 64, api_name="/slide_batch")
    many = _geojson(tmp_path / "many.geojson", [(10 * (i % 200), 10 * (i // 200), 8, 8, None) for i in range(1001)])
    with pytest.raises(AppError, match=r"1001 annotations on cmu-1-small-region\.svs: at most 1000 per slide here"):
        c.predict(world["ckpt"], CMU, handle_file(str(many)), None, "", 0.45, 64, api_name="/slide_batch")
    with world["Session"]() as s:
        assert not s.scalars(select(Image.id).where(Image.slide.has(name="broken"))).all()
    assert not list((world["root"] / "data").rglob("broken*.png"))  # no crop of the failed slide stays
    assert world["proc"].poll() is None, "the app must survive bad inputs"


def test_disagree_puts_the_crop_in_the_disagreement_queue(world):
    c, p = world["client"], world["crops"].paths[5]
    probs, _ = c.predict(world["ckpt"], handle_file(str(p)), "", api_name="/predict")
    predicted = probs["label"].rsplit("(", 1)[-1].rstrip(")")
    chosen = next(k for k in DEMO_CLASSES if k != predicted)
    msg = c.predict(world["ckpt"], handle_file(str(p)), chosen, "", api_name="/disagree")
    assert "Recorded" in msg and "dr_lee" in msg
    with world["Session"]() as s:
        ds = get_dataset(s, "viewer-uploads")
        labels = dict(s.execute(select(Annotator.name, Label.classes).join(Label, Label.annotator_id == Annotator.id)
                                .join(Image, Image.id == Label.image_id).where(Image.dataset_id == ds.id)).all())
        assert labels["dr_lee"] == [chosen]
        model_names = [n for n in labels if n.startswith("model:demo/best@")]
        assert len(model_names) == 1 and labels[model_names[0]] == [predicted]
        me = s.scalar(select(Annotator.id).where(Annotator.name == "dr_lee"))
        queue = next_image_ids(s, QueueSpec("disagreements", ds.id, me), limit=50)
        image_id = s.scalar(select(Image.id).join(Label, Label.image_id == Image.id)
                            .where(Label.annotator_id == me, Image.dataset_id == ds.id))
        assert image_id in [i for _, i in queue]
    with pytest.raises(AppError, match="nothing to disagree"):
        c.predict(world["ckpt"], handle_file(str(p)), predicted, "", api_name="/disagree")


def test_disagree_on_a_store_crop_labels_that_crop(world):
    c = world["client"]
    with world["Session"]() as s:
        ds = get_dataset(s, "demo")
        img = s.scalars(select(Image).where(Image.dataset_id == ds.id).order_by(Image.id)).first()
        path, image_id = Path(ds.root) / img.path, img.id
    probs, _ = c.predict(world["ckpt"], handle_file(str(path)), f"store:{image_id}", api_name="/predict")
    predicted = probs["label"].rsplit("(", 1)[-1].rstrip(")")
    chosen = next(k for k in DEMO_CLASSES if k != predicted)
    c.predict(world["ckpt"], handle_file(str(path)), chosen, f"store:{image_id}", api_name="/disagree")
    with world["Session"]() as s:
        names = set(s.scalars(select(Annotator.name).join(Label, Label.annotator_id == Annotator.id)
                              .where(Label.image_id == image_id)))
        assert "dr_lee" in names and any(n.startswith("model:") for n in names)
    other = world["crops"].paths[-1]
    with pytest.raises(AppError, match="not the store crop"):
        c.predict(world["ckpt"], handle_file(str(other)), chosen, f"store:{image_id}", api_name="/disagree")


def test_bad_images_get_clear_messages(world, tmp_path):
    c = world["client"]
    fake = tmp_path / "notes.png"
    fake.write_text("patient notes, not an image")
    with pytest.raises(AppError, match="not a PNG, JPEG"):
        c.predict(world["ckpt"], handle_file(str(fake)), "", api_name="/predict")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(world["crops"].paths[0].read_bytes()[:300])
    with pytest.raises(AppError, match="damaged or truncated"):
        c.predict(world["ckpt"], handle_file(str(truncated)), "", api_name="/predict")
    bomb = tmp_path / "bomb.png"
    PILImage.new("1", (9000, 9000)).save(bomb)  # ~10 kB on disk, 81 megapixels decoded
    assert bomb.stat().st_size < 200_000
    with pytest.raises(AppError, match="megapixels"):
        c.predict(world["ckpt"], handle_file(str(bomb)), "", api_name="/predict")


def test_broken_or_foreign_checkpoints_get_clear_messages(world, tmp_path):
    c, p = world["client"], handle_file(str(world["crops"].paths[0]))
    broken = world["runs"] / "broken" / "best"
    broken.parent.mkdir()
    (broken.with_suffix(".json")).write_text((world["runs"] / "demo" / "best.json").read_text())
    (broken.with_suffix(".safetensors")).write_bytes(b"\x00" * 64)
    with pytest.raises(AppError, match="could not be loaded"):
        c.predict(str(broken.with_suffix(".safetensors")), p, "", api_name="/predict")
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes((world["runs"] / "demo" / "best.safetensors").read_bytes())
    (tmp_path / "elsewhere.json").write_text((world["runs"] / "demo" / "best.json").read_text())
    with pytest.raises(AppError, match="not a checkpoint under the runs folder"):
        c.predict(str(outside), p, "", api_name="/predict")
    assert world["proc"].poll() is None, "the app must survive bad inputs"
    assert "Traceback" not in json.dumps(c.view_api(print_info=False, return_format="dict"))


def test_parse_auth():
    from app.viewer import parse_auth

    assert parse_auth(None) is None
    assert parse_auth("ann:pw1, bob:pw:2") == [("ann", "pw1"), ("bob", "pw:2")]
    with pytest.raises(SystemExit):
        parse_auth("nopassword")


def test_login_from_environment_guards_the_api(monkeypatch, tmp_path):
    """With GLOM_VIEWER_AUTH set the API answers only a logged-in client (in-process launch)."""
    from app.viewer import demo, parse_auth

    monkeypatch.setenv("GLOM_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("GLOM_DB", f"sqlite:///{tmp_path / 'auth.db'}")
    monkeypatch.delenv("GLOM_VIEWER_CHECKPOINT", raising=False)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                auth=parse_auth("clinician:s3cret"), ssr_mode=False)
    try:
        base = f"http://127.0.0.1:{port}/"
        with pytest.raises(Exception):
            Client(base, verbose=False, analytics_enabled=False)
        with pytest.raises(Exception):
            Client(base, auth=("clinician", "wrong"), verbose=False, analytics_enabled=False)
        ok = Client(base, auth=("clinician", "s3cret"), verbose=False, analytics_enabled=False)
        assert ok.predict(api_name="/checkpoints")["choices"] == []
    finally:
        demo.close()


def test_the_store_accounts_guard_the_api(world):
    with pytest.raises(Exception):
        Client(world["client"].src, verbose=False, analytics_enabled=False)
    with pytest.raises(Exception):
        Client(world["client"].src, auth=("dr_lee", "wrong password"), verbose=False, analytics_enabled=False)


def _in_process(monkeypatch, world, store_db: Path, **env) -> None:
    """Point the viewer's handlers (called in this process) at ``world``'s runs and a fresh store."""
    monkeypatch.setenv("GLOM_RUNS", str(world["runs"]))
    monkeypatch.setenv("GLOM_DB", f"sqlite:///{store_db}")
    monkeypatch.setenv("GLOM_DATA_ROOT", str(store_db.parent / "data"))
    for name in ("GLOM_VIEWER_CHECKPOINT", "GLOM_SINGLE_USER", "GLOM_VIEWER_MAX_UPLOADS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def test_disagree_without_a_login_writes_nothing_in_anyones_name(world, tmp_path, monkeypatch):
    import gradio as gr

    from app import viewer

    _in_process(monkeypatch, world, tmp_path / "nologin.db")
    p = str(world["crops"].paths[2])
    with pytest.raises(gr.Error, match="sign in to record a disagreement"):
        viewer.disagree(world["ckpt"], p, DEMO_CLASSES[0], "", None)
    engine = create_store_engine(f"sqlite:///{tmp_path / 'nologin.db'}")
    upgrade(engine)
    with make_sessionmaker(engine)() as s:
        assert s.scalar(select(func.count()).select_from(Label)) == 0
        assert s.scalar(select(func.count()).select_from(Annotator)) == 0
    engine.dispose()
    # Single-user mode (loopback, asked for): the local user, never a name from the request.
    monkeypatch.setenv("GLOM_SINGLE_USER", "1")
    monkeypatch.setenv("GLOM_LOCAL_USER", "dr_local")
    probs, _ = viewer.predict(world["ckpt"], p, "")
    predicted = probs and max(probs, key=probs.get).rsplit("(", 1)[-1].rstrip(")")
    chosen = next(k for k in DEMO_CLASSES if k != predicted)
    assert "dr_local" in viewer.disagree(world["ckpt"], p, chosen, "", None)


def test_stored_uploads_are_bounded(world, tmp_path, monkeypatch):
    from app import viewer

    _in_process(monkeypatch, world, tmp_path / "cap.db", GLOM_VIEWER_MAX_UPLOADS="2")
    paths = [str(p) for p in world["crops"].paths[:4]]
    notes = [viewer.predict(world["ckpt"], p, "")[1] for p in paths + paths]
    assert ["not kept" in n for n in notes] == [False, False, True, True] * 2
    engine = create_store_engine(f"sqlite:///{tmp_path / 'cap.db'}")
    with make_sessionmaker(engine)() as s:
        ds = get_dataset(s, "viewer-uploads")
        stored = s.scalars(select(Image.path).where(Image.dataset_id == ds.id)).all()
        assert len(stored) == 2, "the same crop twice is one file, and no more than the cap"
        assert s.scalar(select(func.count()).select_from(Prediction)) == 4  # kept crops only, each predicted twice
    engine.dispose()
    assert len([f for f in (tmp_path / "data").rglob("*.png")]) == 2


def test_a_datasets_active_model_is_offered_first(world):
    """The Models page's "make active" reaches the viewer: that checkpoint comes first and is named
    so, even when a newer one is under the runs folder."""
    from annotation_db.store import get_dataset
    from annotation_db.suggestions import set_active_checkpoint

    newer = world["runs"] / "newer" / "best"
    newer.parent.mkdir()
    for suffix in (".safetensors", ".json"):
        shutil.copy(world["ckpt"].replace(".safetensors", suffix), newer.with_suffix(suffix))
    try:
        out = world["client"].predict(api_name="/checkpoints")
        assert out["value"] == str(newer.with_suffix(".safetensors"))  # newest first while none is active
        with world["Session"].begin() as s:
            set_active_checkpoint(s, get_dataset(s, "demo"), world["ckpt"], "demo/best")
        out = world["client"].predict(api_name="/checkpoints")
        assert out["value"] == world["ckpt"]
        assert out["choices"][0] == ["demo/best.safetensors (active model of demo)", world["ckpt"]]
        assert [c[1] for c in out["choices"]].count(world["ckpt"]) == 1
    finally:
        with world["Session"].begin() as s:
            set_active_checkpoint(s, get_dataset(s, "demo"), None, None)
        shutil.rmtree(newer.parent)
