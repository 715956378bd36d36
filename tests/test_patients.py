"""Patients: which patient each slide comes from, so training splits keep a patient's biopsies
together. Filled from a CSV import's ``patient`` column or ``glom patients FILE.csv``; on SQLite
and PostgreSQL, with the real bueno crops (24 slides)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from sqlalchemy import func, select

from annotation_db import importer, store
from annotation_db.classes import InvalidLabelError
from annotation_db.formats import export_csv, read_csv
from annotation_db.models import Label, Slide
from core.cli import main as glom
from core.labeled_sets import load_from_csv, load_from_store
from core.splits import split_grouped


def _bueno_rows(bueno_dir: Path) -> list[dict]:
    return list(csv.DictReader((bueno_dir / "labels.csv").open()))


def _patient_of(slide: str, slides: list[str]) -> str:
    return f"P{slides.index(slide) // 3:02d}"  # three slides per patient: 8 patients


def _labels_with_patients(bueno_dir: Path, out: Path, extra: str = "") -> Path:
    rows = _bueno_rows(bueno_dir)
    slides = sorted({r["slide_id"] for r in rows})
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "slide", "patient"])
        for r in rows:
            w.writerow([r["path"], r["label"], r["slide_id"], _patient_of(r["slide_id"], slides)])
        f.write(extra)
    return out


def test_csv_import_records_patients_and_split_keeps_them_together(tmp_path, bueno_dir, Session, store_url):  # noqa: N803
    labels = _labels_with_patients(bueno_dir, tmp_path / "labels.csv")
    with Session() as s, s.begin():
        ds = importer.ensure_dataset(s, "bueno", class_names=["globally_sclerotic", "non_globally_sclerotic"],
                                     root=bueno_dir)
        importer.import_records(s, ds, read_csv(labels), annotator="dr-a", source="test")
    with Session() as s:
        patients = dict(s.execute(select(Slide.name, Slide.patient)).all())
    slides = sorted(patients)
    assert len(slides) == 24 and all(patients[sl] == _patient_of(sl, slides) for sl in slides)

    ls = load_from_store("bueno", "annotator:dr-a", db_url=store_url)
    assert {x.patient for x in ls.samples} == {f"P{i:02d}" for i in range(8)}
    split = split_grouped(ls, (0.6, 0.2, 0.2), seed=0, group_by="patient")
    patient_of_path = {x.path: x.patient for x in ls.samples}
    parts = [{patient_of_path[p] for p in part} for part in (split.train, split.val, split.test)]
    assert all(part for part in parts)
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2]), parts
    # A slide-grouped split of the same data can put two slides of one patient on both sides;
    # the patient split never does (checked above). Its groups are named by patient.
    assert all(g.startswith("patient:P") for g in split.groups["train"])

    # Export keeps the patient column; a fresh import from it gives the same patients.
    out = tmp_path / "export.csv"
    with Session() as s:
        export_csv(s, store.get_dataset(s, "bueno"), out, source="annotator:dr-a")
    back = read_csv(out)
    assert len(back) == 789 and {(r.slide, r.patient) for r in back} == set(patients.items())
    assert {r.patient for r in load_from_csv(out, root=bueno_dir).samples} == set(patients.values())


def test_a_slide_has_one_patient_and_a_bad_line_stores_nothing(tmp_path, bueno_dir, Session):  # noqa: N803
    rows = _bueno_rows(bueno_dir)
    first = rows[0]
    clash = tmp_path / "clash.csv"
    clash.write_text("image,label,slide,patient\n"
                     f"{rows[0]['path']},{first['label']},{first['slide_id']},P1\n"
                     f"{rows[1]['path']},{rows[1]['label']},{rows[1]['slide_id']},P1\n"
                     f"{rows[2]['path']},{rows[2]['label']},{first['slide_id']},P2\n")
    with Session() as s:
        with pytest.raises(InvalidLabelError, match=r"clash\.csv:4: field 'patient': slide .* is patient 'P1' at "
                                                    r".*clash\.csv:2, here 'P2'"):
            with s.begin():
                ds = importer.ensure_dataset(s, "b", class_names=["globally_sclerotic", "non_globally_sclerotic"],
                                             root=bueno_dir)
                importer.import_records(s, ds, read_csv(clash), annotator="dr-a", source="test")
    with Session() as s:
        assert s.scalar(select(func.count()).select_from(Slide)) == 0
        assert s.scalar(select(func.count()).select_from(Label)) == 0
    orphan = tmp_path / "orphan.csv"
    orphan.write_text(f"image,label,patient\n{rows[0]['path']},{first['label']},P1\n")
    with pytest.raises(Exception, match=r"orphan\.csv, line 2, field 'patient': a patient needs the slide"):
        read_csv(orphan)

    # A patient already in the store is not silently replaced by an import.
    with Session() as s, s.begin():
        store.get_or_create_slide(s, first["slide_id"], patient="P9")
    one = tmp_path / "one.csv"
    one.write_text(f"image,label,slide,patient\n{rows[0]['path']},{first['label']},{first['slide_id']},P1\n")
    with Session() as s:
        with pytest.raises(InvalidLabelError, match=r"one\.csv:2: field 'patient': slide .* belongs to patient 'P9'"):
            with s.begin():
                ds = importer.ensure_dataset(s, "b", class_names=["globally_sclerotic", "non_globally_sclerotic"],
                                             root=bueno_dir)
                importer.import_records(s, ds, read_csv(one), annotator="dr-a", source="test")


def test_glom_patients_assigns_all_or_nothing(tmp_path, bueno_dir, store_url, Session, capsys):  # noqa: N803
    rows = _bueno_rows(bueno_dir)
    slides = sorted({r["slide_id"] for r in rows})
    assert glom(["--db", store_url, "import", "csv", str(bueno_dir / "labels.csv"), "--dataset", "bueno"]) == 0
    mapping = tmp_path / "patients.csv"
    mapping.write_text("slide,patient\n" + "".join(f"{sl},{_patient_of(sl, slides)}\n" for sl in slides))
    assert glom(["--db", store_url, "patients", str(mapping)]) == 0
    assert "24 slides assigned to 8 patients" in capsys.readouterr().out
    with Session() as s:
        assert dict(s.execute(select(Slide.name, Slide.patient)).all()) == {sl: _patient_of(sl, slides) for sl in slides}

    bad = tmp_path / "bad.csv"
    bad.write_text(f"slide,patient\n{slides[0]},Q1\nno-such-slide,Q2\n")
    assert glom(["--db", store_url, "patients", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.csv:3: field 'slide': no slide 'no-such-slide' in the store" in err
    with Session() as s:  # the good first line did not land either
        assert s.scalar(select(Slide.patient).where(Slide.name == slides[0])) == _patient_of(slides[0], slides)
    twice = tmp_path / "twice.csv"
    twice.write_text(f"slide,patient\n{slides[0]},Q1\n{slides[0]},Q2\n")
    assert glom(["--db", store_url, "patients", str(twice)]) == 2
    assert "twice.csv, line 3, field 'patient'" in capsys.readouterr().err


def test_patient_grouping_falls_back_to_the_slide(bueno_dir, caplog):
    ls = load_from_csv(bueno_dir / "labels.csv")  # the shared file names slides, not patients
    with caplog.at_level("WARNING"):
        groups = ls.groups("patient")
    assert groups == [f"slide:{x.slide}" for x in ls.samples]
    assert "789 of 789 images have no patient" in caplog.text
