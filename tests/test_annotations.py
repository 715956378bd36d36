"""Annotation files: QuPath GeoJSON, ImageScope XML, ASAP XML, CSV; GeoJSON round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.annotations import (
    Annotation,
    AnnotationFormatError,
    annotations_for_slide,
    read_annotations,
    to_geojson,
    write_geojson,
)

QUPATH_GEOJSON = {
    "type": "FeatureCollection",
    "features": [
        {
            "type": "Feature",
            "id": "a",
            "geometry": {"type": "Polygon", "coordinates": [[[100, 200], [160, 190], [170, 260], [95, 250], [100, 200]]]},
            "properties": {"objectType": "annotation", "classification": {"name": "crescent", "color": [1, 2, 3]}},
        },
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[10.5, 20], [50.5, 20], [50.5, 60], [10.5, 60], [10.5, 20]]]},
            "properties": {"objectType": "annotation"},
        },
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [500, 600]}, "properties": {"classification": "normal"}},
        {"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": [[1, 2], [3, 4]]}, "properties": {}},
        {"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[0, 0], [9, 9]]}, "properties": {}},
    ],
}

IMAGESCOPE_XML = """<?xml version="1.0" encoding="utf-8"?>
<Annotations MicronsPerPixel="0.499000">
  <Annotation Id="1" Name="normal" ReadOnly="0" LineColor="65280">
    <Attributes><Attribute Name="Description" Id="0" Value=""/></Attributes>
    <Regions>
      <RegionAttributeHeaders/>
      <Region Id="1" Type="1" Text="" NegativeROA="0">
        <Vertices>
          <Vertex X="100" Y="120" Z="0"/><Vertex X="300" Y="120" Z="0"/>
          <Vertex X="300" Y="260" Z="0"/><Vertex X="100" Y="260" Z="0"/>
        </Vertices>
      </Region>
      <Region Id="2" Type="0" Text="crescent">
        <Vertices><Vertex X="1000.5" Y="40"/><Vertex X="1100" Y="90.25"/><Vertex X="1020" Y="130"/></Vertices>
      </Region>
      <Region Id="3" Type="4" Text="ruler">
        <Vertices><Vertex X="0" Y="0"/><Vertex X="10" Y="0"/></Vertices>
      </Region>
    </Regions>
  </Annotation>
</Annotations>
"""

ASAP_XML = """<?xml version="1.0"?>
<ASAP_Annotations>
  <Annotations>
    <Annotation Name="Annotation 0" Type="Rectangle" PartOfGroup="sclerotic" Color="#F4FA58">
      <Coordinates>
        <Coordinate Order="2" X="80" Y="90"/><Coordinate Order="0" X="10" Y="20"/>
        <Coordinate Order="1" X="80" Y="20"/><Coordinate Order="3" X="10" Y="90"/>
      </Coordinates>
    </Annotation>
    <Annotation Name="Annotation 1" Type="Dot" PartOfGroup="None" Color="#F4FA58">
      <Coordinates><Coordinate Order="0" X="5.5" Y="6.5"/></Coordinates>
    </Annotation>
    <Annotation Name="Annotation 2" Type="PointSet" PartOfGroup="normal" Color="#F4FA58">
      <Coordinates><Coordinate Order="0" X="1" Y="1"/><Coordinate Order="1" X="2" Y="2"/></Coordinates>
    </Annotation>
  </Annotations>
  <AnnotationGroups><Group Name="sclerotic" PartOfGroup="None" Color="#64FE2E"/></AnnotationGroups>
</ASAP_Annotations>
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_qupath_geojson(tmp_path: Path) -> None:
    anns = read_annotations(_write(tmp_path, "s.geojson", json.dumps(QUPATH_GEOJSON)))
    assert [a.kind for a in anns] == ["polygon", "rectangle", "point", "point", "point"]  # line skipped
    assert [a.label for a in anns] == ["crescent", None, "normal", None, None]
    assert anns[0].bounds == (95, 190, 170, 260)
    assert anns[1].bounds == (10.5, 20, 50.5, 60)
    assert anns[2].vertices == ((500, 600),)
    assert anns[0].source.endswith("s.geojson#0")


def test_imagescope_xml(tmp_path: Path) -> None:
    anns = read_annotations(_write(tmp_path, "s.xml", IMAGESCOPE_XML))
    assert len(anns) == 2  # the ruler is not a glomerulus
    assert anns[0].kind == "rectangle" and anns[0].label == "normal"  # layer name when Text is empty
    assert anns[0].bounds == (100, 120, 300, 260)
    assert anns[1].label == "crescent" and anns[1].bounds == (1000.5, 40, 1100, 130)


def test_asap_xml(tmp_path: Path) -> None:
    anns = read_annotations(_write(tmp_path, "s.xml", ASAP_XML))
    assert [(a.kind, a.label) for a in anns] == [
        ("rectangle", "sclerotic"),
        ("point", None),
        ("point", "normal"),
        ("point", "normal"),
    ]
    assert anns[0].vertices[0] == (10, 20)  # sorted by Order
    assert anns[0].bounds == (10, 20, 80, 90)


@pytest.mark.parametrize(
    ("header", "row", "bounds", "kind"),
    [
        ("x,y,w,h,label", "10,20,30,40,normal", (10, 20, 40, 60), "rectangle"),
        ("X0,Y0,X1,Y1,class", "10,20,30,40,normal", (10, 20, 30, 40), "rectangle"),
        ("cx,cy,label", "15,25,normal", (15, 25, 15, 25), "point"),
        ("x,y,label", "15,25,normal", (15, 25, 15, 25), "point"),
    ],
)
def test_csv_layouts(tmp_path: Path, header: str, row: str, bounds, kind: str) -> None:
    (a,) = read_annotations(_write(tmp_path, "boxes.csv", f"{header}\n{row}\n"))
    assert a.bounds == bounds and a.kind == kind and a.label == "normal"


def test_csv_with_slide_column_is_split_per_slide(tmp_path: Path) -> None:
    anns = read_annotations(_write(tmp_path, "b.csv", "slide,x,y,w,h\na.svs,1,2,3,4\nb,5,6,7,8\n"))
    assert [a.bounds for a in annotations_for_slide(anns, "/slides/a.svs")] == [(1, 2, 4, 6)]
    assert [a.bounds for a in annotations_for_slide(anns, "b.ndpi")] == [(5, 6, 12, 14)]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.csv", "x,y,w,h\n1,2,three,4\n", r"bad\.csv: line 2, column 'w': 'three' is not a number"),
        ("bad.csv", "x,y,w,h\n1,2,3,4\n1,inf,3,4\n", r"bad\.csv: line 3, column 'y': 'inf' is not finite"),
        ("bad.xml", "<Annotations><Annotation><Regions><Region><Vertices><Vertex X='1' Y='two'/></Vertices></Region></Regions></Annotation></Annotations>", r"bad\.xml: .*Vertex\[0\]: attribute Y='two' is not a number"),
        ("bad.xml", "<Annotations><Annotation><Regions><Region><Vertices><Vertex X='nan' Y='1'/></Vertices></Region></Regions></Annotation></Annotations>", r"bad\.xml: .*Vertex\[0\]: attribute X='nan' is not finite"),
        ("bad.csv", "a,b\n1,2\n", r"bad\.csv: header .* no coordinate columns"),
        ("bad.geojson", "{not json", r"bad\.geojson: not valid JSON"),
        (
            "bad.geojson",
            json.dumps({"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[["a", 1]]]}}]}),
            r"bad\.geojson: features\[0\]\.geometry\.coordinates\[0\]\[0\]: coordinates must be numbers",
        ),
        (
            "bad.geojson",
            json.dumps([{"type": "Feature", "geometry": {"type": "Circle", "coordinates": [1, 2]}}]),
            r"unsupported 'Circle'",
        ),
        ("bad.xml", "<Annotations><Annotation><Regions><Region><Vertices><Vertex X='1'/></Vertices></Region></Regions></Annotation></Annotations>", r"bad\.xml: .*Vertex\[0\]: missing attribute 'Y'"),
        ("bad.xml", "<Other/>", r"neither Aperio ImageScope"),
        ("bad.xml", "<Annotations>", r"not well-formed XML"),
        ("boxes.txt", "x", r"cannot tell the annotation format"),
    ],
)
def test_bad_files_name_file_and_field(tmp_path: Path, name: str, text: str, message: str) -> None:
    with pytest.raises(AnnotationFormatError, match=message):
        read_annotations(_write(tmp_path, name, text))


def test_geojson_round_trip_keeps_coordinates_and_labels(tmp_path: Path) -> None:
    original = read_annotations(_write(tmp_path, "in.geojson", json.dumps(QUPATH_GEOJSON)))
    original += [Annotation.rectangle(1234, 5678, 301, 255, "segmental_sclerosis")]
    path = write_geojson(original, tmp_path / "out.geojson")
    again = read_annotations(path)
    assert [(a.kind, a.label) for a in again] == [(a.kind, a.label) for a in original]
    for a, b in zip(original, again, strict=True):
        ring_a = list(dict.fromkeys(a.vertices))
        ring_b = list(dict.fromkeys(b.vertices))
        assert ring_a == ring_b
    # What QuPath needs: Features with geometry and an annotation object type.
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection"
    rect = data["features"][-1]
    assert rect["geometry"]["coordinates"] == [[[1234, 5678], [1535, 5678], [1535, 5933], [1234, 5933], [1234, 5678]]]
    assert rect["properties"]["classification"]["name"] == "segmental_sclerosis"
    assert rect["properties"]["objectType"] == "annotation"
    assert not list(tmp_path.glob(".*.tmp"))


def test_to_geojson_points() -> None:
    data = to_geojson([Annotation.point(3.5, 4, "normal")])
    assert data["features"][0]["geometry"] == {"type": "Point", "coordinates": [3.5, 4]}
