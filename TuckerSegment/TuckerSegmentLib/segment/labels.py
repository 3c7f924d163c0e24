"""Segment names, colours and terminology (SNOMED CT codes) for a model's output labels.

A model folder may hold ``terminology.csv`` (the column layout of SlicerTotalSegmentator's
``totalsegmentator_snomed_mapping.csv``); otherwise names are looked up in TotalSegmentator's
mapping bundled in ``Resources/Terminology`` (Apache-2.0 data, see its NOTICE). A name found in
neither gets a generic "Anatomical Structure" entry without a type code and a palette colour.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from ..errors import ModelFolderError, TaskError
from ..nnunet.layout import TERMINOLOGY_CSV
from ..paths import TERMINOLOGY_DIR

TOTALSEGMENTATOR_CSV = TERMINOLOGY_DIR / "totalsegmentator_snomed_mapping.csv"
TOTALSEGMENTATOR_TERM_JSON = TERMINOLOGY_DIR / "SegmentationCategoryTypeModifier-TotalSegmentator.term.json"
PARTS = ("Category", "Type", "TypeModifier", "Region", "RegionModifier")
TERMINOLOGY_COLUMNS = ["Name"] + [f"{part}_{field}" for part in PARTS
                                  for field in ("CodingScheme", "CodeValue", "CodeMeaning")] + ["Color_R", "Color_G", "Color_B"]
DICOM_CONTEXT = "Segmentation category and type - DICOM master list"
TOTALSEGMENTATOR_CONTEXT = "Segmentation category and type - Total Segmentator"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
ANATOMICAL_STRUCTURE = ("SCT", "123037004", "Anatomical Structure")
PALETTE = ((0.90, 0.49, 0.13), (0.25, 0.60, 0.85), (0.55, 0.80, 0.30), (0.85, 0.30, 0.55), (0.95, 0.85, 0.25),
           (0.45, 0.35, 0.80), (0.30, 0.80, 0.75), (0.80, 0.55, 0.40))

Code = tuple[str, str, str]  # coding scheme, code value, code meaning
Color = tuple[float, float, float]  # RGB in 0-1


@dataclass(frozen=True)
class Terminology:
    """A Slicer terminology entry (DICOM SEG style codes)."""

    context: str
    category: Code
    type: Code
    type_modifier: Code | None = None
    region: Code | None = None
    region_modifier: Code | None = None

    def to_slicerio(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"contextName": self.context, "category": list(self.category), "type": list(self.type),
                                 "anatomicContextName": ANATOMIC_CONTEXT}
        for key, code in (("typeModifier", self.type_modifier), ("anatomicRegion", self.region),
                          ("anatomicRegionModifier", self.region_modifier)):
            if code:
                entry[key] = list(code)
        return entry

    def to_slicer_string(self) -> str:
        """The ``TerminologyEntry`` tag Slicer stores on a segment."""
        def code(c: Code | None) -> str:
            return "^".join(c) if c else "^^"
        return "~".join([self.context, code(self.category), code(self.type), code(self.type_modifier),
                         ANATOMIC_CONTEXT, code(self.region), code(self.region_modifier)])


@dataclass(frozen=True)
class SegmentLabel:
    """One output label of a model: value in the label map, name, RGB colour (0-1), terminology."""

    value: int
    name: str
    color: Color
    terminology: Terminology | None


def _code(row: dict[str, str], part: str) -> Code | None:
    values = tuple((row.get(f"{part}_{field}") or "").strip() for field in ("CodingScheme", "CodeValue", "CodeMeaning"))
    return values if values[1] else None  # type: ignore[return-value]


@cache
def _totalsegmentator_type_codes() -> frozenset[str]:
    """Type codes defined by TotalSegmentator's own terminology context (missing from DICOM's list)."""
    def walk(node: Any) -> Iterable[str]:
        if isinstance(node, dict):
            if "CodeValue" in node and "Type" not in node:
                yield str(node["CodeValue"])
            for value in node.values():
                yield from walk(value)
        elif isinstance(node, list):
            for value in node:
                yield from walk(value)
    if not TOTALSEGMENTATOR_TERM_JSON.is_file():
        return frozenset()
    return frozenset(walk(json.loads(TOTALSEGMENTATOR_TERM_JSON.read_text())["SegmentationCodes"]))


@cache
def read_terminology_csv(path: Path, context: str | None = None) -> dict[str, tuple[Terminology, Color | None]]:
    """name → (terminology, colour or None) from a CSV with ``TERMINOLOGY_COLUMNS``."""
    table: dict[str, tuple[Terminology, Color | None]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            name, category, kind = (row.get("Name") or "").strip(), _code(row, "Category"), _code(row, "Type")
            if not name or not category or not kind:
                continue
            row_context = context or (TOTALSEGMENTATOR_CONTEXT if kind[1] in _totalsegmentator_type_codes()
                                      else DICOM_CONTEXT)
            terminology = Terminology(row_context, category, kind, _code(row, "TypeModifier"), _code(row, "Region"),
                                      _code(row, "RegionModifier"))
            rgb = [(row.get(f"Color_{c}") or "").strip() for c in "RGB"]
            color = tuple(float(c) / 255.0 for c in rgb) if all(rgb) else None
            table[name] = (terminology, color)  # type: ignore[assignment]
    return table


def terminology_row(segment: dict[str, Any]) -> list[str]:
    """A ``TERMINOLOGY_COLUMNS`` row from a slicerio segment entry (name, colour, terminology)."""
    terminology = segment.get("terminology") or {}
    row = [segment["name"]]
    for key in ("category", "type", "typeModifier", "anatomicRegion", "anatomicRegionModifier"):
        row += list(terminology.get(key) or ["", "", ""])
    return row + [str(round(255 * c)) for c in segment["color"]]


def _dataset_labels(dataset_json: dict[str, Any], source: str) -> dict[str, int]:
    labels = dataset_json.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise ModelFolderError(f"{source} has no 'labels'; an nnU-Net v2 dataset.json maps label names to values")
    if any(not isinstance(v, int) for v in labels.values()):
        raise ModelFolderError(f"{source} defines region-based labels (lists of values); TuckerSegment segments "
                               "label-map models only")
    return {str(name): int(value) for name, value in labels.items() if int(value) != 0}


def label_values(segments: Sequence[SegmentLabel], names: Sequence[str]) -> list[int]:
    """The label values of the structures ``names``; ``TaskError`` naming any the segments lack."""
    by_name = {s.name: s.value for s in segments}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise TaskError(f"unknown structure(s) {', '.join(unknown)}; this model segments: {', '.join(by_name)}")
    return [by_name[n] for n in names]


def segment_labels(dataset_json: dict[str, Any], model_path: Path | None = None) -> list[SegmentLabel]:
    """The foreground labels of a model with names, colours and terminology, by label value."""
    own = model_path / TERMINOLOGY_CSV if model_path is not None else None
    tables = []
    if own is not None and own.is_file():
        tables.append(read_terminology_csv(own, None))
    if TOTALSEGMENTATOR_CSV.is_file():
        tables.append(read_terminology_csv(TOTALSEGMENTATOR_CSV, None))
    result = []
    for index, (name, value) in enumerate(sorted(_dataset_labels(dataset_json, "dataset.json").items(),
                                                 key=lambda item: item[1])):
        terminology, color = next((table[name] for table in tables if name in table), (None, None))
        result.append(SegmentLabel(value, name, color or PALETTE[index % len(PALETTE)], terminology))
    return result
