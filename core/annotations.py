"""Glomerulus annotations on slides: QuPath GeoJSON, Aperio ImageScope XML, ASAP XML and CSV.

Everything reads into :class:`Annotation` (level-0 pixel vertices, an optional class label and
where it came from); :func:`to_geojson` / :func:`write_geojson` write QuPath-compatible GeoJSON.

CSV: a header row, coordinates in level-0 pixels, one of these column sets (case-insensitive):
``x,y,w,h`` (or ``width,height``; top-left corner), ``x0,y0,x1,y1`` (or ``xmin,ymin,xmax,ymax``),
``cx,cy`` or plain ``x,y`` (a centre point). Optional ``label`` (or ``class``/``classification``)
and ``slide`` (file name or stem, to share one CSV between slides).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import uuid
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from core.errors import GlomError

log = logging.getLogger(__name__)

Kind = Literal["polygon", "rectangle", "ellipse", "point"]
FORMATS = ("geojson", "imagescope", "asap", "csv")


class AnnotationFormatError(GlomError, ValueError):
    """An annotation file cannot be read; the message names the file and the field."""


@dataclass(frozen=True)
class Annotation:
    """One annotated object: level-0 (x, y) vertices (one for a point), label, provenance."""

    kind: Kind
    vertices: tuple[tuple[float, float], ...]
    label: str | None = None
    slide: str | None = None
    source: str = ""

    @classmethod
    def rectangle(cls, x: float, y: float, w: float, h: float, label: str | None = None, **kw: Any) -> Annotation:
        return cls("rectangle", ((x, y), (x + w, y), (x + w, y + h), (x, y + h)), label, **kw)

    @classmethod
    def point(cls, x: float, y: float, label: str | None = None, **kw: Any) -> Annotation:
        return cls("point", ((x, y),), label, **kw)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(x_min, y_min, x_max, y_max) in level-0 pixels."""
        xs = [v[0] for v in self.vertices]
        ys = [v[1] for v in self.vertices]
        return (min(xs), min(ys), max(xs), max(ys))

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.bounds
        return ((x0 + x1) / 2, (y0 + y1) / 2)


def read_annotations(path: str | Path, fmt: str | None = None) -> list[Annotation]:
    """Annotations from ``path``; the format is ``fmt`` or guessed from suffix and XML root."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationFormatError(f"{path}: annotation file not found")
    fmt = fmt or guess_format(path)
    readers = {"geojson": read_geojson, "imagescope": read_imagescope_xml, "asap": read_asap_xml, "csv": read_csv}
    if fmt not in readers:
        raise AnnotationFormatError(f"{path}: unknown annotation format {fmt!r} (known: {', '.join(FORMATS)})")
    return readers[fmt](path)


def guess_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".geojson", ".json"):
        return "geojson"
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix == ".xml":
        root = _parse_xml(path)
        if root.tag == "ASAP_Annotations":
            return "asap"
        if root.tag == "Annotations":
            return "imagescope"
        raise AnnotationFormatError(
            f"{path}: XML root <{root.tag}> is neither Aperio ImageScope (<Annotations>) nor ASAP (<ASAP_Annotations>)"
        )
    raise AnnotationFormatError(
        f"{path}: cannot tell the annotation format from the suffix {suffix!r}; "
        "use .geojson/.json (QuPath), .xml (ImageScope or ASAP) or .csv"
    )


# --- GeoJSON (QuPath) -----------------------------------------------------------------------


def _number_pair(value: Any, where: str) -> tuple[float, float]:
    if not (isinstance(value, (list, tuple)) and len(value) >= 2):
        raise AnnotationFormatError(f"{where}: expected an [x, y] position, got {value!r}")
    try:
        x, y = float(value[0]), float(value[1])
    except (TypeError, ValueError):
        raise AnnotationFormatError(f"{where}: coordinates must be numbers, got {value!r}") from None
    if not (math.isfinite(x) and math.isfinite(y)):
        raise AnnotationFormatError(f"{where}: coordinates must be finite, got {value!r}")
    return (x, y)


def _ring(value: Any, where: str) -> list[tuple[float, float]]:
    if not isinstance(value, list) or not value:
        raise AnnotationFormatError(f"{where}: expected a non-empty list of positions")
    return [_number_pair(p, f"{where}[{i}]") for i, p in enumerate(value)]


def _is_axis_rectangle(ring: Sequence[tuple[float, float]]) -> bool:
    pts = list(dict.fromkeys(ring))
    return len(pts) == 4 and len({p[0] for p in pts}) == 2 and len({p[1] for p in pts}) == 2


def _geojson_label(props: Any) -> str | None:
    if not isinstance(props, dict):
        return None
    cls = props.get("classification")
    if isinstance(cls, dict):
        name = cls.get("name")
        if not name and isinstance(cls.get("names"), list):
            name = ": ".join(map(str, cls["names"]))
        return str(name) if name else None
    if isinstance(cls, str) and cls:
        return cls
    return None


def read_geojson(path: str | Path) -> list[Annotation]:
    """QuPath GeoJSON: a FeatureCollection, a list of Features or one Feature.

    Polygons and rectangles give their outline, Points/MultiPoints centres; the class name
    (``properties.classification.name``) becomes the label. Lines (rulers) are skipped.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AnnotationFormatError(f"{path}: not valid JSON ({e})") from None
    return annotations_from_geojson(data, source=str(path))


def annotations_from_geojson(data: Any, *, source: str = "<geojson>") -> list[Annotation]:
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features, base = data.get("features"), "features"
        if not isinstance(features, list):
            raise AnnotationFormatError(f"{source}: 'features' must be a list")
    elif isinstance(data, list):
        features, base = data, ""
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features, base = [data], ""
    else:
        raise AnnotationFormatError(f"{source}: expected a GeoJSON FeatureCollection, Feature or list of Features")
    out: list[Annotation] = []
    for i, feature in enumerate(features):
        where = f"{source}: {base}[{i}]"
        if not isinstance(feature, dict) or not isinstance(feature.get("geometry"), dict):
            raise AnnotationFormatError(f"{where}: a Feature needs a 'geometry' object")
        label = _geojson_label(feature.get("properties"))
        geom = feature["geometry"]
        gtype, coords = geom.get("type"), geom.get("coordinates")
        gwhere = f"{where}.geometry.coordinates"
        src = f"{source}#{i}"
        if gtype == "Point":
            out.append(Annotation("point", (_number_pair(coords, gwhere),), label, source=src))
        elif gtype == "MultiPoint":
            out.extend(Annotation("point", (p,), label, source=src) for p in _ring(coords, gwhere))
        elif gtype == "Polygon":
            if not isinstance(coords, list) or not coords:
                raise AnnotationFormatError(f"{gwhere}: a Polygon needs at least one ring")
            ring = _ring(coords[0], f"{gwhere}[0]")
            kind: Kind = "rectangle" if _is_axis_rectangle(ring) else "polygon"
            out.append(Annotation(kind, tuple(ring), label, source=src))
        elif gtype == "MultiPolygon":
            if not isinstance(coords, list) or not coords:
                raise AnnotationFormatError(f"{gwhere}: a MultiPolygon needs at least one polygon")
            ring = [p for j, poly in enumerate(coords) for p in _ring(poly[0] if poly else None, f"{gwhere}[{j}][0]")]
            out.append(Annotation("polygon", tuple(ring), label, source=src))
        elif gtype in ("LineString", "MultiLineString"):
            log.warning("%s: skipping a %s (a line is not a region)", where, gtype)
        else:
            raise AnnotationFormatError(
                f"{where}.geometry.type: unsupported {gtype!r} (use Polygon, MultiPolygon, Point or MultiPoint)"
            )
    return out


def geojson_feature(a: Annotation, *, color: Sequence[int] | None = None, **properties: Any) -> dict:
    """One QuPath annotation Feature: a Point, or a Polygon of the closed outline; classification
    from the label (``color``, else a stable colour per class name); ``properties`` are added
    (e.g. ``measurements={"score": 0.9}``)."""
    if a.kind == "point":
        geometry = {"type": "Point", "coordinates": list(_plain(a.vertices[0]))}
    else:
        ring = [list(_plain(v)) for v in a.vertices]
        if ring[0] != ring[-1]:
            ring.append(ring[0])
        geometry = {"type": "Polygon", "coordinates": [ring]}
    props: dict[str, Any] = {"objectType": "annotation"}
    if a.label:
        props["classification"] = {"name": a.label, "color": list(color) if color else _label_color(a.label)}
    props.update(properties)
    return {"type": "Feature", "id": str(uuid.uuid4()), "geometry": geometry, "properties": props}


def to_geojson(annotations: Iterable[Annotation]) -> dict:
    """A QuPath-compatible FeatureCollection (annotations; classification from the label)."""
    return {"type": "FeatureCollection", "features": [geojson_feature(a) for a in annotations]}


def write_geojson(annotations: Iterable[Annotation], path: str | Path) -> Path:
    """Write :func:`to_geojson` to ``path`` atomically (a temp file renamed into place)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(to_geojson(annotations), indent=1), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _plain(v: tuple[float, float]) -> tuple[float | int, float | int]:
    return tuple(int(c) if float(c).is_integer() else c for c in v)  # type: ignore[return-value]


def _label_color(label: str) -> list[int]:
    # A stable colour per class name (str hash is salted per process; crc32 is not).
    h = zlib.crc32(label.encode("utf-8"))
    return [64 + h % 192, 64 + (h >> 8) % 192, 64 + (h >> 16) % 192]


# --- XML (Aperio ImageScope, ASAP) -----------------------------------------------------------


def _parse_xml(path: Path) -> ET.Element:
    try:
        return ET.parse(path).getroot()
    except ET.ParseError as e:
        raise AnnotationFormatError(f"{path}: not well-formed XML ({e})") from None


def _finite_float(raw: str, what: str) -> float:
    """``raw`` as a finite number; else an error that starts with ``what`` (file, line or element, value)."""
    try:
        value = float(raw)
    except ValueError:
        raise AnnotationFormatError(f"{what} is not a number") from None
    if not math.isfinite(value):
        raise AnnotationFormatError(f"{what} is not finite")
    return value


def _xml_float(el: ET.Element, attr: str, where: str) -> float:
    raw = el.get(attr)
    if raw is None:
        raise AnnotationFormatError(f"{where}: missing attribute {attr!r}")
    return _finite_float(raw, f"{where}: attribute {attr}={raw!r}")


# Aperio region types: 0 free-hand/polygon, 1 rectangle, 2 ellipse, 3 arrow, 4 ruler, 5 point.
_IMAGESCOPE_KIND: dict[str, Kind | None] = {"0": "polygon", "1": "rectangle", "2": "ellipse", "3": None, "4": None, "5": "point"}


def read_imagescope_xml(path: str | Path) -> list[Annotation]:
    """Aperio ImageScope XML: ``Annotation/Regions/Region/Vertices/Vertex@X,Y`` (level-0 px).

    The label is the region's ``Text``, else its annotation layer's ``Name``.
    """
    path = Path(path)
    root = _parse_xml(path)
    if root.tag != "Annotations":
        raise AnnotationFormatError(f"{path}: root element is <{root.tag}>, ImageScope XML has <Annotations>")
    out: list[Annotation] = []
    for ai, layer in enumerate(root.findall("Annotation")):
        layer_name = (layer.get("Name") or "").strip() or None
        for ri, region in enumerate(layer.iter("Region")):
            where = f"{path}: Annotation[{ai}]/Region[{ri}] (Id={region.get('Id')})"
            kind = _IMAGESCOPE_KIND.get(region.get("Type", "0"), "polygon")
            if kind is None:
                log.warning("%s: skipping an arrow/ruler region", where)
                continue
            verts = [
                (_xml_float(v, "X", f"{where}/Vertex[{vi}]"), _xml_float(v, "Y", f"{where}/Vertex[{vi}]"))
                for vi, v in enumerate(region.iter("Vertex"))
            ]
            if not verts:
                raise AnnotationFormatError(f"{where}: region has no vertices")
            if len(verts) == 1:
                kind = "point"
            label = (region.get("Text") or "").strip() or layer_name
            out.append(Annotation(kind, tuple(verts), label, source=f"{path}#{ai}.{ri}"))
    return out


_ASAP_KIND: dict[str, Kind] = {"polygon": "polygon", "rectangle": "rectangle", "spline": "polygon", "dot": "point"}


def read_asap_xml(path: str | Path) -> list[Annotation]:
    """ASAP XML: ``Annotations/Annotation[@Type,@PartOfGroup]/Coordinates/Coordinate@X,Y``.

    The group (``PartOfGroup``, unless ``None``) becomes the label; a PointSet gives one point
    per coordinate.
    """
    path = Path(path)
    root = _parse_xml(path)
    if root.tag != "ASAP_Annotations":
        raise AnnotationFormatError(f"{path}: root element is <{root.tag}>, ASAP XML has <ASAP_Annotations>")
    out: list[Annotation] = []
    for ai, ann in enumerate(root.iter("Annotation")):
        where = f"{path}: Annotation[{ai}] (Name={ann.get('Name')!r})"
        group = (ann.get("PartOfGroup") or "").strip()
        label = None if group in ("", "None", "_None") else group
        coords = sorted(ann.iter("Coordinate"), key=lambda c: float(c.get("Order", 0) or 0))
        verts = [
            (_xml_float(c, "X", f"{where}/Coordinate[{ci}]"), _xml_float(c, "Y", f"{where}/Coordinate[{ci}]"))
            for ci, c in enumerate(coords)
        ]
        if not verts:
            raise AnnotationFormatError(f"{where}: annotation has no coordinates")
        atype = (ann.get("Type") or "Polygon").lower()
        src = f"{path}#{ai}"
        if atype == "pointset":
            out.extend(Annotation("point", (v,), label, source=src) for v in verts)
            continue
        if atype not in _ASAP_KIND:
            raise AnnotationFormatError(f"{where}: unsupported Type={ann.get('Type')!r} (Polygon, Rectangle, Spline, Dot, PointSet)")
        kind = "point" if len(verts) == 1 else _ASAP_KIND[atype]
        out.append(Annotation(kind, tuple(verts), label, source=src))
    return out


# --- CSV --------------------------------------------------------------------------------------

_CSV_LAYOUTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("xywh", ("x", "y", "w", "h")),
    ("xywh", ("x", "y", "width", "height")),
    ("xyxy", ("x0", "y0", "x1", "y1")),
    ("xyxy", ("xmin", "ymin", "xmax", "ymax")),
    ("centre", ("cx", "cy")),
    ("centre", ("x", "y")),
)
_CSV_LABEL = ("label", "class", "classification")


def read_csv(path: str | Path) -> list[Annotation]:
    """Boxes or centres from a CSV with a header (see the module docstring for the columns)."""
    path = Path(path)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if not reader.fieldnames:
            raise AnnotationFormatError(f"{path}: empty CSV (a header row is required)")
        columns = {name.strip().lower(): name for name in reader.fieldnames if name}
        layout = next(((kind, cols) for kind, cols in _CSV_LAYOUTS if all(c in columns for c in cols)), None)
        if layout is None:
            raise AnnotationFormatError(
                f"{path}: header {reader.fieldnames} has no coordinate columns; expected x,y,w,h or "
                "x0,y0,x1,y1 (boxes) or cx,cy / x,y (centres), in level-0 pixels"
            )
        kind, cols = layout
        label_col = next((columns[c] for c in _CSV_LABEL if c in columns), None)
        slide_col = columns.get("slide")
        out: list[Annotation] = []
        for row_no, row in enumerate(reader, start=2):
            values = []
            for c in cols:
                raw = (row.get(columns[c]) or "").strip()
                values.append(_finite_float(raw, f"{path}: line {row_no}, column {columns[c]!r}: {raw!r}"))
            label = (row.get(label_col) or "").strip() or None if label_col else None
            slide = (row.get(slide_col) or "").strip() or None if slide_col else None
            src = f"{path}:{row_no}"
            if kind == "centre":
                out.append(Annotation.point(values[0], values[1], label, slide=slide, source=src))
            else:
                x0, y0, a, b = values
                w, h = (a, b) if kind == "xywh" else (a - x0, b - y0)
                if w < 0 or h < 0:
                    raise AnnotationFormatError(f"{path}: line {row_no}: negative box size ({w} x {h})")
                out.append(Annotation.rectangle(x0, y0, w, h, label, slide=slide, source=src))
    return out


def annotations_for_slide(annotations: Sequence[Annotation], slide_file: str | Path) -> list[Annotation]:
    """Those of ``annotations`` that belong to ``slide_file`` (no ``slide`` field: all of them)."""
    p = Path(slide_file)
    names = {p.name, p.stem}
    return [a for a in annotations if a.slide is None or a.slide in names or Path(a.slide).name in names]
