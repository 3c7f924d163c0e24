"""TuckerSegment's engine: Tucker compression of nnU-Net v2 models and CT segmentation, without Slicer or Qt.

The names below are the public API; each is imported on first use, so ``TuckerSegmentLib.dependencies``,
``paths`` and the panel's choices work before torch and nnU-Net are installed.
"""
from __future__ import annotations

import importlib
import sys
from typing import Any

__version__ = "0.1.0"

# OpenVINO sends usage statistics when it is imported and when it converts a network, and writes a client id under
# the home folder, unless the user opted out (seen here: ~/intel/openvino_ga_cid after `import openvino`). This engine
# handles medical images and sends nothing: without its telemetry package OpenVINO uses its own no-op stub.
sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]

_EXPORTS = {
    # segmentation
    "segment.predictor": ("Segmenter",),
    "segment.result": ("SegmentationResult",),
    "segment.task": ("TaskSegmenter",),
    "segment.output": ("write_result",),
    "segment.batch": ("BatchItem", "segment_batch"),
    "image.volume": ("Volume", "read_volume"),
    "variants.choice": ("choose_model",),
    "variants.guard": ("SafeTask",),
    "variants.build": ("build_variant",),
    "variants.measure": ("measure_variant", "plan_measurement"),
    # compression
    "compress.folder": ("compress_model_folder", "describe_model", "prune_model_folder"),
    "compress.pruning": ("PruningReport", "prune_network"),
    "compress.network": ("CompressionReport", "LayerRecord", "compress_network"),
    "compress.figures": ("CompressionReview", "ModelFigures", "pareto_front"),
    "compress.review": ("review_compression",),
    "compress.calibration_data": ("CalibrationVolume", "calibration_patches"),
    "policies.methods": ("METHODS", "policy_for", "policy_from_dict"),
    "policies.base": ("RankPolicy",),
    "policies.uniform": ("UniformPolicy",),
    "policies.spectral": ("EnergyPolicy", "VBMFPolicy"),
    "policies.budget": ("BudgetPolicy",),
    "tucker.decomposition": ("LayerPlan", "TuckerConv", "decompose_conv"),
    "tucker.network_stats": ("NetworkStats", "network_stats"),
    "tucker.calibration": ("CalibrationPatch", "LayerStatistics", "collect_statistics"),
    "tucker.layers": ("LayerInfo",),
    # recovery after compression
    "recovery.distill": ("distill_model_folder",),
    # evaluation
    "evaluation.run": ("Candidate", "Evaluation", "evaluate"),
    "evaluation.cases": ("Scan", "pair_scans"),
    "evaluation.report": ("write_report",),
    "evaluation.statistics": ("dice_per_class", "holm", "wilcoxon"),
    # model folders
    "nnunet.model_folder": ("ModelFolder", "load_network"),
    # errors
    "errors": ("TuckerSegmentError",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
