"""Per-slide counts and the MEST-C-style rules at their thresholds."""

from __future__ import annotations

import pytest

from core.slide_summary import DECISION_SUPPORT_NOTE, mestc_summary, summarize_by_slide, summarize_slide

GLOM = ["normal", "segmental_sclerosis", "mesangial_proliferation", "crescent"]


def _counts(normal=0, ss=0, mp=0, cr=0):
    return {"normal": normal, "segmental_sclerosis": ss, "mesangial_proliferation": mp, "crescent": cr}


def test_counts_and_percentages_include_absent_classes():
    s = summarize_slide("S1", ["normal"] * 3 + ["crescent"], GLOM)
    assert s.n_glomeruli == 4
    assert s.counts == _counts(normal=3, cr=1)
    assert s.percent["normal"] == pytest.approx(75.0) and s.percent["segmental_sclerosis"] == 0.0
    assert s.rows({"normal": "Normal"})[0] == ["Normal", 3, 75.0]


@pytest.mark.parametrize("counts,m", [(_counts(normal=5, mp=5), "M0"), (_counts(normal=4, mp=6), "M1"),
                                      (_counts(normal=5, mp=6), "M1"), (_counts(normal=1), "M0")])
def test_m1_needs_more_than_half(counts, m):
    assert mestc_summary(counts).m == m


def test_s1_when_any_segmental_sclerosis():
    assert mestc_summary(_counts(normal=20)).s == "S0"
    assert mestc_summary(_counts(normal=20, ss=1)).s == "S1"


@pytest.mark.parametrize("cr,normal,c", [(0, 10, "C0"), (1, 9, "C1"), (2, 7, "C1"), (1, 3, "C2"), (3, 7, "C2"),
                                         (5, 15, "C2")])
def test_crescent_thresholds(cr, normal, c):
    # 1/10 → C1; 2/9 = 22% → C1; 1/4 = 25% → C2; 3/10 → C2; 5/20 = 25% → C2
    assert mestc_summary(_counts(normal=normal, cr=cr)).c == c


def test_code_and_explanation_say_what_fired_and_what_is_missing():
    m = mestc_summary(_counts(normal=2, ss=1, mp=6, cr=1))
    assert m.code == "M1 S1 C1 (E, T not assessed)"
    text = " ".join(m.explain())
    assert "6/10" in text and "more than half" in text and "1/10" in text
    assert "not a diagnosis" in m.note and m.note == DECISION_SUPPORT_NOTE


def test_no_mestc_for_other_schemas_or_empty_slides():
    s = summarize_slide("S", ["globally_sclerotic"], ["globally_sclerotic", "non_globally_sclerotic"])
    assert s.mestc is None and s.counts == {"globally_sclerotic": 1, "non_globally_sclerotic": 0}
    assert mestc_summary(_counts()) is None


def test_grouped_by_slide_and_unknown_classes_refused():
    out = summarize_by_slide([("B", "normal"), ("A", "crescent"), (None, "normal"), ("A", "normal")], GLOM)
    assert [s.slide for s in out] == ["(no slide)", "A", "B"]
    assert out[1].n_glomeruli == 2 and out[1].mestc.c == "C2"
    with pytest.raises(ValueError, match="not in the schema"):
        summarize_slide("S", ["oops"], GLOM)
