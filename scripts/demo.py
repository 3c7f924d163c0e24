#!/usr/bin/env python3
"""Demo: compress a model with TotalSegmentator's Dataset291 architecture, as a user would, with the CLI.

TotalSegmentator's weights are not bundled (and may not be downloadable here), so the demo writes an
nnU-Net v2 model folder with that exact architecture and random weights into .cache/demo/, then runs
``tuckersegment info`` and ``tuckersegment compress --factor 0.5`` on it.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from TuckerSegmentLib.example_models import write_example_model

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".cache" / "demo"


def tuckersegment(*args: str) -> None:
    command = [str(Path(sys.executable).with_name("tuckersegment")), *args]
    print(f"\n$ tuckersegment {' '.join(args)}", flush=True)
    subprocess.run(command, check=True)


def main() -> None:
    if WORK.exists():
        shutil.rmtree(WORK)
    print(f"writing a Dataset291-architecture model folder (random weights) under {WORK}", flush=True)
    source = write_example_model(WORK, "Dataset291")
    compressed = WORK / "Dataset291_uniform_0.5"
    tuckersegment("info", str(source))
    tuckersegment("compress", str(source), str(compressed), "--factor", "0.5", "--rank-min", "8", "--quiet")
    tuckersegment("info", str(compressed))


if __name__ == "__main__":
    main()
