"""Per-slide (per-biopsy) summaries of crop predictions, and a MEST-C-style rule summary.

The rule summary restates crop counts in the vocabulary of the Oxford classification so a
clinician can compare it with their own reading. It is decision support, not a diagnosis:
it sees only the glomeruli that were cropped, one predicted class per glomerulus, and nothing
of E (endocapillary hypercellularity) or T (tubular atrophy / interstitial fibrosis).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["SlideSummary", "MestcSummary", "summarize_slide", "mestc_summary", "summarize_by_slide",
           "MESTC_CLASSES", "DECISION_SUPPORT_NOTE"]

DECISION_SUPPORT_NOTE = (
    "Decision support, not a diagnosis: computed from the model's predictions on the cropped "
    "glomeruli only (one class per glomerulus); E and T are not assessed. Review every crop."
)

# Class keys the rules read (the glomerulus schema of annotation_db.classes.GLOMERULUS_CLASSES).
MESTC_CLASSES = ("mesangial_proliferation", "segmental_sclerosis", "crescent")


@dataclass
class SlideSummary:
    """Counts and percentages of predicted classes over one slide's glomeruli."""

    slide: str
    n_glomeruli: int
    counts: dict[str, int]
    percent: dict[str, float]
    mestc: MestcSummary | None = None

    def rows(self, display: Mapping[str, str] | None = None) -> list[list[object]]:
        """Table rows ``[class, count, percent]`` in schema order."""
        display = display or {}
        return [[display.get(k, k), n, round(self.percent[k], 1)] for k, n in self.counts.items()]


@dataclass
class MestcSummary:
    """M, S and C scores by rule, with the counts behind them."""

    m: str  # "M0" | "M1"
    s: str  # "S0" | "S1"
    c: str  # "C0" | "C1" | "C2"
    n_glomeruli: int
    evidence: dict[str, int] = field(default_factory=dict)
    note: str = DECISION_SUPPORT_NOTE

    @property
    def code(self) -> str:
        return f"{self.m} {self.s} {self.c} (E, T not assessed)"

    def explain(self) -> list[str]:
        """One sentence per score saying which rule fired."""
        n = self.n_glomeruli
        mp, ss, cr = (self.evidence.get(k, 0) for k in MESTC_CLASSES)
        pct = (lambda k: 100.0 * k / n) if n else (lambda k: 0.0)
        return [
            f"{self.m}: {mp}/{n} glomeruli ({pct(mp):.0f}%) show mesangial proliferation "
            f"(M1 when more than half).",
            f"{self.s}: {ss}/{n} show segmental sclerosis (S1 when any).",
            f"{self.c}: {cr}/{n} ({pct(cr):.0f}%) show crescents (C0 none, C1 under 25%, C2 25% or more).",
        ]


def mestc_summary(counts: Mapping[str, int]) -> MestcSummary | None:
    """MEST-C-style scores from class counts, or None when the schema lacks the classes it reads.

    M1 when more than half of the glomeruli show mesangial proliferation; S1 when any shows
    segmental sclerosis; C0 / C1 / C2 for crescents in none / under 25% / 25% or more.
    """
    if not all(k in counts for k in MESTC_CLASSES):
        return None
    n = sum(counts.values())
    if n == 0:
        return None
    mp, ss, cr = (int(counts[k]) for k in MESTC_CLASSES)
    m = "M1" if mp * 2 > n else "M0"
    s = "S1" if ss > 0 else "S0"
    c = "C0" if cr == 0 else ("C1" if cr * 4 < n else "C2")
    return MestcSummary(m, s, c, n, {"mesangial_proliferation": mp, "segmental_sclerosis": ss, "crescent": cr})


def summarize_slide(slide: str, predicted: Iterable[str], classes: Sequence[str]) -> SlideSummary:
    """Counts and percentages of ``predicted`` class keys over ``classes`` (all listed, zeros too)."""
    tally = Counter(predicted)
    unknown = set(tally) - set(classes)
    if unknown:
        raise ValueError(f"predicted classes {sorted(unknown)} are not in the schema {list(classes)}")
    n = sum(tally.values())
    counts = {k: int(tally.get(k, 0)) for k in classes}
    percent = {k: (100.0 * v / n if n else 0.0) for k, v in counts.items()}
    return SlideSummary(slide, n, counts, percent, mestc_summary(counts))


def summarize_by_slide(items: Iterable[tuple[str | None, str]], classes: Sequence[str],
                       no_slide: str = "(no slide)") -> list[SlideSummary]:
    """One summary per slide from ``(slide name or None, predicted class)`` pairs, by slide name."""
    groups: dict[str, list[str]] = {}
    for slide, predicted in items:
        groups.setdefault(slide or no_slide, []).append(predicted)
    return [summarize_slide(s, groups[s], classes) for s in sorted(groups)]
