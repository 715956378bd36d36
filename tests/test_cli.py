"""The `glom` store verbs, as a user types them."""

import json
import subprocess
import sys
from pathlib import Path

from core.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_demo_stats_export_agreement(capsys, sqlite_url, tmp_path):
    demo = tmp_path / "demo"
    code, out, _ = run(capsys, "--db", sqlite_url, "demo", "--out", str(demo), "--n-per-class", "3")
    assert code == 0 and "12 synthetic images" in out
    pngs = sorted(demo.rglob("*.png"))
    assert len(pngs) == 12 and all(p.name.startswith("synthetic_") for p in pngs)
    # Second call with --if-empty adds nothing.
    assert run(capsys, "--db", sqlite_url, "demo", "--if-empty", "--out", str(demo))[1].startswith("the store already")

    code, out, _ = run(capsys, "stats", "--json", "--db", sqlite_url)
    stats = json.loads(out)
    assert stats[0]["images"] == 12 and stats[0]["final_per_class"] == {
        "normal": 3, "segmental_sclerosis": 3, "mesangial_proliferation": 3, "crescent": 3
    }

    out_file = tmp_path / "demo.jsonl"
    assert run(capsys, "--db", sqlite_url, "export", "jsonl", str(out_file), "--dataset", "demo")[0] == 0
    lines = out_file.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 12 and json.loads(lines[0])["正常肾小球"] == 1

    # A second annotator disagrees on one image; agreement lists it.
    second = tmp_path / "second.csv"
    second.write_text("image,label,annotator\nnormal/synthetic_normal_0000.png,crescent,dr_b\n"
                      "crescent/synthetic_crescent_0000.png,crescent,dr_b\n")
    assert run(capsys, "--db", sqlite_url, "import", "csv", str(second), "--dataset", "demo", "--root", str(demo))[0] == 0
    code, out, _ = run(capsys, "--db", sqlite_url, "agreement", "--dataset", "demo", "--json")
    report = json.loads(out)
    assert report["method"] == "cohen" and report["items"] == 2
    assert [d["path"] for d in report["disagreements"]] == ["normal/synthetic_normal_0000.png"]
    code, out, _ = run(capsys, "--db", sqlite_url, "agreement", "--dataset", "demo")
    assert "1 disagreements" in out and "dr_b=crescent" in out


def test_import_records_slides_with_their_stain(capsys, sqlite_url, bueno_dir):
    code, out, _ = run(capsys, "--db", sqlite_url, "import", "csv", str(bueno_dir / "labels.csv"),
                       "--dataset", "bueno", "--stain", "PAS")
    assert code == 0 and "789 images added" in out
    from annotation_db.db import open_store
    from annotation_db.models import Slide
    from sqlalchemy import select

    with open_store(sqlite_url)() as s:
        stains = set(s.scalars(select(Slide.stain)))
        assert len(s.scalars(select(Slide)).all()) == 24 and {st.value for st in stains} == {"PAS"}


def test_bad_input_is_a_clear_error_not_a_traceback(capsys, sqlite_url, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image_name": "a.png", "正常肾小球": 1}\n{oops\n', encoding="utf-8")
    code, _, err = run(capsys, "--db", sqlite_url, "import", "jsonl", str(bad), "--dataset", "x")
    assert code == 2 and f"{bad}, line 2" in err and "Traceback" not in err
    code, _, err = run(capsys, "--db", sqlite_url, "export", "csv", str(tmp_path / "o.csv"), "--dataset", "nope")
    assert code == 2 and "No dataset named 'nope'" in err


def test_console_script_is_installed(tmp_path):
    glom = Path(sys.executable).with_name("glom")
    out = subprocess.run([str(glom), "db", "init", "--db", f"sqlite:///{tmp_path}/c.db"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "schema at 0" in out.stdout, out.stderr


def test_every_help_page_renders():
    """`glom --help` and each verb's --help format (a bare '%' in a help text broke `glom --help`)."""
    import argparse
    from core.cli import build_parser
    parser = build_parser()
    assert "train-detector" in parser.format_help()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in verbs.choices.items():
        assert sub.format_help().startswith("usage: glom " + name), name
