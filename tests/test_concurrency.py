"""Two annotators in two processes writing at once: every label is stored, none is lost."""

import subprocess
import sys
import textwrap

from PIL import Image as PILImage
from sqlalchemy import func, select

from annotation_db import store
from annotation_db.classes import GLOMERULUS_CLASSES
from annotation_db.db import create_store_engine, make_sessionmaker, upgrade
from annotation_db.label_resolution import dataset_images, labels_per_annotator
from annotation_db.models import Label, LabelEvent

N_IMAGES = 60

WRITER = textwrap.dedent(
    """
    import sys
    from annotation_db.db import open_store
    from annotation_db import store
    from annotation_db.classes import GLOMERULUS_CLASSES
    url, who, offset = sys.argv[1], sys.argv[2], int(sys.argv[3])
    Session = open_store(url, create=False)
    classes = [c.key for c in GLOMERULUS_CLASSES]
    print("ready", flush=True)
    sys.stdin.readline()  # start together
    for rnd in range(2):  # label everything, then change every label: edits must not be lost either
        for i in range(%d):
            with Session() as s, s.begin():  # one transaction per click, as in the app
                ds = store.get_dataset(s, "g")
                img = store.find_image(s, ds, f"{i}.png")
                store.set_label(s, img, who, [classes[(i + offset + rnd) %% 4]])
    print("done", flush=True)
    """
    % N_IMAGES
)


def test_two_processes_label_at_once_and_lose_nothing(store_url, tmp_path):
    for i in range(N_IMAGES):
        PILImage.new("RGB", (4, 4), (i, 0, 0)).save(tmp_path / f"{i}.png")
    engine = create_store_engine(store_url)
    upgrade(engine)
    Session = make_sessionmaker(engine)
    with Session() as s, s.begin():
        ds = store.create_dataset(s, "g", GLOMERULUS_CLASSES, root=tmp_path)
        for i in range(N_IMAGES):
            store.add_image(s, ds, f"{i}.png")

    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, store_url, who, str(k)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for k, who in enumerate(["dr_li", "dr_wang"])
    ]
    for p in procs:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0 and "done" in out, err

    classes = [c.key for c in GLOMERULUS_CLASSES]
    with Session() as s:
        assert s.scalar(select(func.count()).select_from(Label)) == 2 * N_IMAGES
        assert s.scalar(select(func.count()).select_from(LabelEvent)) == 2 * 2 * N_IMAGES
        votes = labels_per_annotator(s, store.get_dataset(s, "g"))
        paths = {img.id: img.path for img, _ in dataset_images(s, store.get_dataset(s, "g"))}
        for image_id, v in votes.items():
            i = int(paths[image_id].split(".")[0])
            assert v == {"dr_li": [classes[(i + 1) % 4]], "dr_wang": [classes[(i + 2) % 4]]}
    engine.dispose()
