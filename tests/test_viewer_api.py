"""The viewer's named API endpoints, driven with gradio_client against the live app on loopback,
with a temporary SQLite store; every write is checked in the store afterwards."""

from __future__ import annotations

import csv
import json
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import select

from annotation_db.db import create_store_engine, make_sessionmaker, upgrade
from annotation_db.models import Annotator, Image, Label, Prediction
from annotation_db.queues import QueueSpec, next_image_ids
from annotation_db.store import GLOMERULUS_CLASSES, add_image, create_dataset, get_dataset, get_or_create_slide
from core.demo import DEMO_CLASSES
from tests.demo_checkpoint import demo_checkpoint, demo_set
from tests.viewer_server import free_port, running_viewer

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

pytestmark = pytest.mark.slow  # trains a tiny model and starts the app: ~20 s alone, more on a busy machine


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A trained 4-class checkpoint under runs/, a store with a 'demo' dataset on two slides,
    and the app running on a free loopback port."""
    root = tmp_path_factory.mktemp("viewer")
    runs = root / "runs"
    demo_checkpoint(runs / "demo" / "best")
    crops = demo_set(root / "crops", 3, seed=2)  # 12 unseen crops
    url = f"sqlite:///{root / 'store.db'}"
    engine = create_store_engine(url)
    upgrade(engine)
    with make_sessionmaker(engine).begin() as s:
        ds = create_dataset(s, "demo", GLOMERULUS_CLASSES, root=root / "crops")
        for i, p in enumerate(crops.paths):
            add_image(s, ds, p, slide=get_or_create_slide(s, f"biopsy-{'AB'[i % 2]}"))
    try:
        with running_viewer(root, runs, url) as (base, proc):
            client = Client(base, verbose=False, analytics_enabled=False, download_files=str(root / "downloads"))
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
    info = json.loads(urllib.request.urlopen(world["client"].src + "gradio_api/info").read())
    named = set(info["named_endpoints"])
    assert {"/predict", "/cam", "/batch", "/store_batch", "/disagree", "/slide_summary", "/checkpoints"} <= named
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


def test_disagree_puts_the_crop_in_the_disagreement_queue(world):
    c, p = world["client"], world["crops"].paths[5]
    probs, _ = c.predict(world["ckpt"], handle_file(str(p)), "", api_name="/predict")
    predicted = probs["label"].rsplit("(", 1)[-1].rstrip(")")
    chosen = next(k for k in DEMO_CLASSES if k != predicted)
    msg = c.predict(world["ckpt"], handle_file(str(p)), chosen, "dr_lee", "", api_name="/disagree")
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
                            .where(Label.annotator_id == me))
        assert image_id in [i for _, i in queue]
    with pytest.raises(AppError, match="nothing to disagree"):
        c.predict(world["ckpt"], handle_file(str(p)), predicted, "dr_lee", "", api_name="/disagree")
    with pytest.raises(AppError, match="say who you are"):
        c.predict(world["ckpt"], handle_file(str(p)), chosen, "  ", "", api_name="/disagree")


def test_disagree_on_a_store_crop_labels_that_crop(world):
    c = world["client"]
    with world["Session"]() as s:
        ds = get_dataset(s, "demo")
        img = s.scalars(select(Image).where(Image.dataset_id == ds.id).order_by(Image.id)).first()
        path, image_id = Path(ds.root) / img.path, img.id
    probs, _ = c.predict(world["ckpt"], handle_file(str(path)), f"store:{image_id}", api_name="/predict")
    predicted = probs["label"].rsplit("(", 1)[-1].rstrip(")")
    chosen = next(k for k in DEMO_CLASSES if k != predicted)
    c.predict(world["ckpt"], handle_file(str(path)), chosen, "dr_kim", f"store:{image_id}", api_name="/disagree")
    with world["Session"]() as s:
        names = set(s.scalars(select(Annotator.name).join(Label, Label.annotator_id == Annotator.id)
                              .where(Label.image_id == image_id)))
        assert "dr_kim" in names and any(n.startswith("model:") for n in names)
    other = world["crops"].paths[-1]
    with pytest.raises(AppError, match="not the store crop"):
        c.predict(world["ckpt"], handle_file(str(other)), chosen, "dr_kim", f"store:{image_id}", api_name="/disagree")


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
