"""Where TuckerSegment's files live: the bundled resources and the user cache. Imports nothing of its own."""
from __future__ import annotations

import os
import sys
from pathlib import Path

RESOURCES = Path(__file__).resolve().parents[1] / "Resources"
BUNDLED_MODELS = RESOURCES / "Models"
CATALOGUE_JSON = RESOURCES / "variants.json"
TASKS_JSON = RESOURCES / "Tasks" / "totalsegmentator.json"
TERMINOLOGY_DIR = RESOURCES / "Terminology"


def cache_dir() -> Path:
    """The user cache (built variants, latency tables, my variants): ``TUCKERSEGMENT_CACHE``, else the
    platform's user cache folder."""
    if os.environ.get("TUCKERSEGMENT_CACHE"):
        return Path(os.environ["TUCKERSEGMENT_CACHE"]).expanduser()
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "TuckerSegment" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "TuckerSegment"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tuckersegment"
