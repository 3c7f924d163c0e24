"""Peak memory of one model segmenting one scan, measured in a fresh process.

Models evaluated together share one process, whose allocator reuses what an earlier model freed, so a
peak measured there says little. Here each model gets its own ``python -m`` process: the figure is the
peak resident memory above the level after the imports and reading the scan, sampled while the process
loads the model and segments the scan once (``runtime.memory.PeakMemory``; Linux, ``None`` elsewhere).
The process's own lifetime peak (``ru_maxrss``) would not do: importing the libraries peaks higher than a
small model's whole run."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import TuckerSegmentError
from ..image.volume import Volume

TIMEOUT_SECONDS = 3600


def peak_memory(model: Path, image: Path | Volume, device: str, runtime: str, precision: str) -> int | None:
    """Peak resident bytes a fresh process adds to load ``model`` and segment ``image`` once."""
    with tempfile.TemporaryDirectory(prefix="tuckersegment-memory-") as folder:
        if isinstance(image, Volume):
            import SimpleITK as sitk
            from ..image.volume import volume_to_image
            path = Path(folder) / "scan.nii.gz"
            sitk.WriteImage(volume_to_image(image), str(path))
            image = path
        request = json.dumps({"model": str(model), "image": str(image), "device": device, "runtime": runtime,
                              "precision": precision})
        done = subprocess.run([sys.executable, "-m", __name__, request], capture_output=True, text=True,
                              timeout=TIMEOUT_SECONDS, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise TuckerSegmentError(f"measuring the peak memory of {model} failed ({last})")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]


def _main(request: dict[str, str]) -> int | None:
    from ..image.volume import read_volume
    from ..runtime.memory import PeakMemory
    from ..segment.predictor import Segmenter
    volume = read_volume(request["image"])
    with PeakMemory() as memory:
        Segmenter(request["model"], device=request["device"], runtime=request["runtime"],
                  precision=request["precision"]).segment(volume)
    return memory.peak


if __name__ == "__main__":
    print(json.dumps({"peak_bytes": _main(json.loads(sys.argv[1]))}))
