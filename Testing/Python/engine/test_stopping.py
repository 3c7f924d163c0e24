"""Ctrl-C and SIGTERM stop every long command within seconds, as they stop ``segment`` and ``compress``: exit
status 128 + the signal, one line saying what was kept, no partial output beside the target, the sources
untouched."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tree_digest
from test_finetune import write_raw_dataset
from TuckerSegmentLib.paths import BUNDLED_MODELS
from TuckerSegmentLib.testing.example_models import write_totalsegmentator_task

DEMO = BUNDLED_MODELS / "chest-demo" / "Dataset901_ChestDemo"
STOP_WITHIN = 15.0  # seconds from the signal to the exit (a training step or a tile finishes first)


def started(argv: list[str], environment: dict[str, str], until: str) -> tuple[subprocess.Popen, list[str]]:
    """The command running, once a line of its stderr holds ``until`` (it is working, not starting)."""
    child = subprocess.Popen([sys.executable, "-m", "TuckerSegmentLib.cli", *argv], stderr=subprocess.PIPE, text=True,
                             env={**os.environ, **environment})
    seen = []
    for line in child.stderr:
        seen.append(line.rstrip())
        if until in line:
            return child, seen
    raise AssertionError(f"{argv[0]} ended before {until!r}: {seen[-5:]}")


def command(name: str, tmp_path: Path, tiny_model: Path, tiny_compressed: Path) -> tuple[list[str], dict[str, str], str]:
    """(arguments, environment, a line that says it works) for a run of ``name`` that would take many minutes."""
    out = str(tmp_path / "out")
    if name == "finetune":
        write_raw_dataset(tmp_path / "raw")
        return (["finetune", str(tiny_compressed), out, "--dataset", "901", "--device", "cpu", "--epochs", "400",
                 "--iterations-per-epoch", "250"], {"nnUNet_raw": str(tmp_path / "raw")}, "epoch")
    if name == "evaluate":
        images = tmp_path / "images"
        images.mkdir()
        os.symlink(_sample_ct(), images / "ct.nrrd")
        return (["evaluate", str(DEMO), str(BUNDLED_MODELS / "chest-demo-tucker-fast"), "--images", str(images),
                 "--out", out, "--rounds", "100", "--no-memory", "--device", "cpu"], {}, "ct")
    write_totalsegmentator_task(tmp_path / "totalseg" / "nnunet" / "results", "fast", divisor=8)
    return (["build-variants", "--variant", "fast-tucker-0.5", "--device", "cpu"],
            {"TOTALSEG_HOME_DIR": str(tmp_path / "totalseg"), "TUCKERSEGMENT_CACHE": str(tmp_path / "cache")},
            "compressing")


def _sample_ct() -> Path:
    import slicerio
    return Path(slicerio.get_testdata_file("CTChest4.nrrd"))


@pytest.mark.parametrize("name, number", [("finetune", signal.SIGTERM), ("evaluate", signal.SIGINT),
                                          ("build-variants", signal.SIGTERM)])
def test_a_long_command_stops_within_seconds_and_leaves_nothing_partial(name, number, tmp_path, tiny_model,
                                                                        tiny_compressed):
    argv, environment, working = command(name, tmp_path, tiny_model, tiny_compressed)
    sources = tree_digest(tiny_compressed), tree_digest(DEMO)
    before = set(tmp_path.iterdir())
    child, seen = started(argv, environment, working)
    child.send_signal(number)
    sent = time.monotonic()
    rest = child.communicate(timeout=120)[1]
    assert time.monotonic() - sent < STOP_WITHIN and child.returncode == 128 + number, (seen[-3:], rest[-2000:])
    last = rest.strip().splitlines()[-1]
    assert last.startswith(f"tuckersegment: cancelled ({signal.Signals(number).name}); "), rest[-2000:]
    assert "Traceback" not in rest, rest[-3000:]
    kept = {"finetune": tmp_path / "out.finetune-state", "build-variants": tmp_path / "cache"}.get(name)
    assert not (tmp_path / "out").exists() and set(tmp_path.iterdir()) == before | ({kept} if kept else set())
    if name == "finetune":  # its prepared data (and finished epochs) stay, to resume from: the message says where
        assert last.endswith(f"is in {kept}: run the same command again to resume from it"), last
    else:
        assert last.endswith("nothing partial was written, outputs finished before are kept"), last
    assert (tree_digest(tiny_compressed), tree_digest(DEMO)) == sources
