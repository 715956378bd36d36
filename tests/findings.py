"""Detector findings made by hand, for tests and benchmarks that need proposals without training a
detector: the :class:`core.detection.instances.Instance` that ``glom detect`` hands
:func:`annotation_db.proposals.replace_proposals`."""

from __future__ import annotations

from core.detection.instances import Instance


def box_finding(box: tuple[int, int, int, int], score: float, *, area_um2: float = 5000.0,
                diamond: bool = False) -> Instance:
    """A finding whose outline is its box (or, ``diamond``, the box's inscribed diamond, so an
    outline and its box are told apart on screen)."""
    x, y, w, h = box
    if diamond:
        polygon = [(x + w / 2, y), (x + w, y + h / 2), (x + w / 2, y + h), (x, y + h / 2)]
    else:
        polygon = [(x, y), (x + w, y), (x + w, y + h), (x, y + h)]
    return Instance(polygon=polygon, box=tuple(box), area_um2=area_um2, score=score)
