#!/usr/bin/env python3
"""Render the TuckerSegment panel (a Qt Designer .ui using Slicer/CTK widgets) to a PNG, without Slicer.

Slicer's and CTK's custom widgets are not available outside Slicer, so the .ui XML is rewritten in
memory: each custom class becomes a plain Qt stand-in (``STAND_INS``), Slicer-only properties are
dropped, collapsible sections become expanded group boxes, and the loaded panel is filled with
example entries before it is grabbed offscreen. Needs PySide6-Essentials (in requirements/test.txt):

    bash scripts/setup.sh --test
    .venv/bin/python scripts/render_ui.py [--ui PATH] [--out PATH] [--width PIXELS]
"""
from __future__ import annotations

import argparse
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING

from TuckerSegmentLib.policies.methods import METHODS

if TYPE_CHECKING:
    from PySide6.QtWidgets import QWidget

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_UI = ROOT / "TuckerSegment" / "Resources" / "UI" / "TuckerSegment.ui"
DEFAULT_OUT = ROOT / "TuckerSegment" / "Resources" / "Screenshots" / "TuckerSegment_panel.png"

# Slicer/CTK class -> plain Qt class standing in for it in the screenshot.
STAND_INS: dict[str, str] = {
    "qMRMLWidget": "QWidget",
    "qMRMLNodeComboBox": "QComboBox",
    "qMRMLCheckableNodeComboBox": "QComboBox",
    "qMRMLTableView": "QTableWidget",
    "qMRMLPlotWidget": "QLabel",
    "ctkCollapsibleButton": "QGroupBox",
    "ctkPathLineEdit": "QLineEdit",
    "ctkSearchBox": "QLineEdit",
    "ctkSliderWidget": "QDoubleSpinBox",
}
# Properties a stand-in keeps (everything else on a custom widget is Slicer/CTK-only).
KEPT: dict[str, set[str]] = {
    "QDoubleSpinBox": {"singleStep", "minimum", "maximum", "value"},
    "QLineEdit": {"placeholderText"},
}
COMMON = {"toolTip", "enabled", "minimumSize", "maximumSize"}

# Example content as the Logic gives it on a fresh install without TotalSegmentator weights (CPU only):
# object name -> combo box entries (the first is shown).
COMBO_ITEMS: dict[str, list[str]] = {
    "inputVolumeSelector": ["CTChest"],
    "outputSegmentationSelector": ["Create new segmentation", "CTChest segmentation"],
    "taskComboBox": ["Auto", "total: TotalSegmentator v2 default: 117 structures, five 1.5 mm nnU-Net models merged "
                     "(not installed)", "Demo: chest CT (bundled, 3 mm) (4 ready)"],
    "variantComboBox": ["Auto: chest-demo-tucker-balanced", "chest-demo (bundled)",
                        "chest-demo-tucker-balanced (bundled)"],
    "deviceComboBox": ["Auto", "CPU", "GPU (CUDA)", "Apple GPU (MPS)"],
    "runtimeComboBox": ["Auto", "PyTorch", "OpenVINO (CPU)"],
    "precisionComboBox": ["Auto", "float32", "bfloat16 (CPU with native bf16)"],
    "policyComboBox": [method.label for method in METHODS],
    "calibrationVolumesSelector": ["CTChest"],
}
STRUCTURES: list[tuple[str, bool]] = [("ribs", False), ("cervical vertebral column", False),
                                      ("thoracic vertebral column", False), ("lumbar vertebral column", False),
                                      ("right lung", True), ("left lung", True), ("tissue", False)]
TEXTS: dict[str, str] = {
    "variantReasonLabel": "demo / chest-demo-tucker-balanced: CPU, 22.6 GiB free, needs 0.8 GiB (measured); 1.25x "
                          "faster than the original (measured on AMD EPYC (2 cores) in OpenVINO 2026.4.1 f32); "
                          "held-out Dice loss 0.4 points (largest 1.6, right lung)",
    "structureCountLabel": "2 of 7 structures",
    "statusLabel": "",
    "modelFolderPathLineEdit": "~/nnUNet_results/Dataset291_TotalSegmentator_part1/nnUNetTrainer__nnUNetPlans__3d_fullres",
    "outputParentPathLineEdit": "~/TuckerSegment",
    "outputNameLineEdit": "Dataset291-flops-0.5",
}
REPORT_COLUMNS = ["Quantity", "Original", "Compressed", "Ratio"]


def to_stand_ins(ui_xml: bytes) -> bytes:
    """The .ui with every Slicer/CTK widget replaced by its plain Qt stand-in, ready for QUiLoader."""
    root = ET.fromstring(ui_xml)
    for tag in ("customwidgets", "connections"):
        for element in root.findall(tag):
            root.remove(element)
    for parent in root.iter():  # the bottom spacer only adds blank space to a panel grabbed at its size hint
        for item in parent.findall("item"):
            if item.find("spacer") is not None:
                parent.remove(item)
    for widget in root.iter("widget"):
        custom = widget.get("class", "")
        for prop in widget.findall("property"):
            name = prop.get("name", "")
            if prop.get("stdset") == "0" and name == "SlicerParameterName":
                widget.remove(prop)
        if custom not in STAND_INS:
            continue
        stand_in = STAND_INS[custom]
        widget.set("class", stand_in)
        for prop in widget.findall("property"):
            name = prop.get("name", "")
            if stand_in == "QGroupBox" and name == "text":
                prop.set("name", "title")
            elif name not in COMMON | KEPT.get(stand_in, set()):
                widget.remove(prop)
    return ET.tostring(root, encoding="utf-8")


def fill_examples(panel: QWidget) -> None:
    """Put example nodes, choices and structures into the loaded panel (PySide6 widgets)."""
    from PySide6.QtCore import Qt
    from PySide6.QtWidgets import QComboBox, QFrame, QHeaderView, QLabel, QLineEdit, QListWidget, QListWidgetItem, QPushButton, QTableWidget

    for name, items in COMBO_ITEMS.items():
        combo = panel.findChild(QComboBox, name)
        combo.addItems(items)
    structures = panel.findChild(QListWidget, "structureListWidget")
    for structure, checked in STRUCTURES:
        item = QListWidgetItem(structure, structures)
        item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
        item.setCheckState(Qt.CheckState.Checked if checked else Qt.CheckState.Unchecked)
    for name, text in TEXTS.items():
        widget = panel.findChild(QLabel, name) or panel.findChild(QLineEdit, name)
        widget.setText(text)
        if isinstance(widget, QLineEdit):
            widget.setCursorPosition(0)
    panel.findChild(QLabel, "dependenciesLabel").hide()  # shown in Slicer only when packages are missing
    for name in ("applyButton", "compressButton"):
        panel.findChild(QPushButton, name).setEnabled(True)
    table = panel.findChild(QTableWidget, "reportTableView")
    table.setColumnCount(len(REPORT_COLUMNS))
    table.setHorizontalHeaderLabels(REPORT_COLUMNS)
    table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
    table.verticalHeader().hide()
    plot = panel.findChild(QLabel, "paretoPlotWidget")
    plot.setText("Pareto plot: Dice vs original against FLOPs per patch")
    plot.setAlignment(Qt.AlignmentFlag.AlignCenter)
    plot.setWordWrap(True)
    plot.setFrameShape(QFrame.Shape.StyledPanel)
    plot.setStyleSheet("background: white; color: gray;")


def render(ui_path: Path, out_path: Path, width: int = 420) -> tuple[int, int]:
    """Render ``ui_path`` to ``out_path`` (PNG) at ``width`` pixels; returns the image size."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import QBuffer, QByteArray, QIODevice
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])
    app.setStyle("Fusion")
    data = QByteArray(to_stand_ins(ui_path.read_bytes()))  # kept referenced while the buffer reads it
    buffer = QBuffer(data)
    buffer.open(QIODevice.OpenModeFlag.ReadOnly)
    loader = QUiLoader()
    panel = loader.load(buffer)
    if panel is None:
        raise RuntimeError(f"QUiLoader could not load {ui_path}")
    fill_examples(panel)
    panel.setFixedWidth(width)
    panel.setFixedHeight(panel.sizeHint().height())
    panel.show()
    app.processEvents()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    image = panel.grab()
    if not image.save(str(out_path), "PNG"):
        raise RuntimeError(f"could not write {out_path}")
    return image.width(), image.height()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ui", type=Path, default=DEFAULT_UI, help="Qt Designer file (default: the module's panel)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG to write (default: Resources/Screenshots)")
    parser.add_argument("--width", type=int, default=420, help="panel width in pixels")
    args = parser.parse_args(argv)
    w, h = render(args.ui, args.out, args.width)
    print(f"wrote {args.out} ({w}x{h})")


if __name__ == "__main__":
    main()
