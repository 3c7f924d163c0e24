"""What produced a segmentation, recorded with it.

The same key/value pairs go on a Slicer segmentation node (node attributes) and on every segment
(segment tags, which ``.seg.nrrd`` files keep and Slicer preserves when it loads and saves them, also
when a segment is copied to another segmentation).
"""
from __future__ import annotations

from .. import __version__
from .result import SegmentationResult

PREFIX = "TuckerSegment."
RESEARCH_NOTICE = ("Automatic segmentation for research use only, not for clinical use; "
                   "review every structure before relying on it")


def provenance(result: SegmentationResult) -> dict[str, str]:
    """``TuckerSegment.*`` keys: model, compression policy, engine version, device, runtime, seconds, notice."""
    values = {"Model": result.model, "Policy": result.policy, "Version": __version__, "Device": result.device,
              "Runtime": result.runtime, "Seconds": f"{result.seconds:.2f}", "Notice": RESEARCH_NOTICE}
    return {PREFIX + key: value.replace("|", "/") for key, value in values.items()}  # "|" separates segment tags
