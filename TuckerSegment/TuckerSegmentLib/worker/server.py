"""The worker process: segments, compresses and builds variants for a client (Slicer's Logic) that talks
to it over stdin/stdout (``protocol``), keeping the last model loaded between requests.

Started as ``python -m TuckerSegmentLib.worker``. It exits when its stdin closes, after ``idle_seconds``
without a request, or when it is terminated; it never cleans up after a cancel itself: a terminated
worker dies at once and the client removes what it left (its temporary folder, partial outputs).
"""
from __future__ import annotations

import argparse
import os
import queue
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from .. import __version__
from ..errors import CacheWarning, PolicyError, TuckerSegmentError
from ..image.volume import IntensityWarning
from ..progress import Progress
from .lifeline import die_with_parent, end_now
from .protocol import READY, encode, error_to_json, save_labels, segments_to_json

IDLE_SECONDS = 600.0
Handler = Callable[[dict[str, Any], Progress], dict[str, Any]]


class LoadedModel:
    """The segmenter of the last (models, device, options) asked for; another choice replaces it."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.segmenter: Any = None
        self.reason = ""
        self.loads = 0  # how many times a model was loaded into this process
        self.notices: list[str] = []

    def get(self, request: Any) -> Any:
        """The segmenter ``request`` (a ``SegmentRequest``) runs: the loaded one when it plans the same models, else
        a new one after the previous one is let go."""
        from ..usecases.segmenting import plan_segmenter
        plan = plan_segmenter(request, notify=self.notices.append)
        self.reason = plan.reason
        if plan.key != self.key:
            self.segmenter, self.key = None, None  # the previous model's memory is free before the next loads
            self.segmenter, self.key = plan.open(), plan.key
            self.loads += 1
        return self.segmenter


class Worker:
    """Answers requests one at a time; ``serve`` runs until stdin closes or the worker idles out."""

    def __init__(self, output: BinaryIO) -> None:
        self._output = output
        self.model = LoadedModel()
        self.handlers: dict[str, Handler] = {"segment": self.segment, "compress": self.compress,
                                             "build": self.build, "status": self.status}
        self.working = threading.Event()  # set while a request is in hand

    def send(self, message: dict[str, Any]) -> None:
        self._output.write(encode(message))
        self._output.flush()

    def serve(self, requests: queue.Queue, idle_seconds: float) -> None:
        self.send({"event": READY, "pid": os.getpid(), "version": __version__})
        while True:
            try:
                line = requests.get(timeout=idle_seconds)
            except queue.Empty:
                return  # idle: the client starts a new worker when it needs one
            if line is None:
                return  # the client closed our stdin
            self.working.set()
            try:
                self.answer(line)
            finally:
                self.working.clear()

    def answer(self, line: bytes) -> None:
        import json
        try:
            request = json.loads(line)
            ident, command, args = request["id"], request["command"], request.get("args", {})
        except (ValueError, KeyError, TypeError):
            self.send({"id": None, "error": {"type": "TuckerSegmentError", "message": "the worker got a request "
                                             "that is not JSON with id and command"}})
            return

        def progress(fraction: float, message: str) -> None:
            self.send({"id": ident, "fraction": round(min(max(float(fraction), 0.0), 1.0), 4), "message": message})
        handler = self.handlers.get(command)
        try:
            if handler is None:
                raise TuckerSegmentError(f"the worker has no command {command!r}")
            result = handler(args, progress)
        except Exception as error:  # every failure is an answer; the worker itself goes on
            if not isinstance(error, TuckerSegmentError):
                traceback.print_exc(file=sys.stderr)
            self.send({"id": ident, "error": error_to_json(error)})
            return
        self.send({"id": ident, "result": result})

    def status(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        """This process, its model loads and version; with ``machine: true`` also the devices it sees
        (``MachineFacts``: the GUI process never imports torch to find them)."""
        answer = {"pid": os.getpid(), "loads": self.model.loads, "version": __version__}
        if args.get("machine") is True:
            from ..runtime.hardware import detect_machine
            progress(0.0, "detecting devices")
            answer["machine"] = detect_machine().to_json()
        return answer

    def segment(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        """Segment the volume file ``args["volume"]`` as the ``SegmentRequest`` in the other fields of ``args`` asks,
        and write its labels to ``args["labels"]``."""
        from ..image.transfer import read_ct
        from ..usecases.requests import SegmentRequest
        from ..usecases.segmenting import segment_with
        files = ("volume", "labels")
        request = SegmentRequest.from_json({k: v for k, v in args.items() if k not in files})  # before any model loads
        self.model.notices.clear()
        loads, started = self.model.loads, time.perf_counter()
        progress(0.0, "loading the model")
        segmenter = self.model.get(request)
        load_seconds = time.perf_counter() - started if self.model.loads > loads else 0.0
        segmenter.check_subset(request.subset)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", IntensityWarning)
            result = segment_with(segmenter, request, read_ct(args["volume"]), progress)
        save_labels(Path(args["labels"]), result.labels)
        return {"segments": segments_to_json(result.segments), "model": result.model, "device": result.device,
                "runtime": result.runtime,
                "seconds": result.seconds, "tiles": result.tiles, "policy": result.policy,
                "warnings": list(result.warnings), "reason": self.model.reason,
                "notices": [*self.model.notices, *(str(w.message) for w in caught if issubclass(w.category, CacheWarning))],
                "loads": self.model.loads, "load_seconds": load_seconds,
                "intensity_warnings": [str(w.message) for w in caught if issubclass(w.category, IntensityWarning)]}

    def compress(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        """Run the ``CompressRequest`` ``args`` (calibration CTs as transfer files) with its review; the review as
        JSON, with a note on the distillation when there was one."""
        from ..usecases.compressing import run_compress
        from ..usecases.requests import CompressRequest
        request = CompressRequest.from_json({**args, "review": True})
        share = 0.3 if request.distill else 0.6  # of the progress bar; distillation takes the next 0.3, the review the rest

        def layer(done: int, total: int, name: str) -> None:
            progress(share * done / total, f"{'pruning, trial' if request.prunes else 'compressing layer'} "
                                           f"{done}/{total}: {name}")

        def step(done: int, total: int, message: str) -> None:
            progress(0.3 + 0.3 * done / total, f"distilling, iteration {done}/{total}: {message}")
        progress(0.0, "reading the model" + (" and calibration volumes" if request.calibration else ""))
        outcome = run_compress(request, layers=layer, distilling=step, say=lambda message: progress(share, message),
                               reviewing=lambda fraction, message: progress(0.6 + 0.4 * fraction, message))
        review = outcome.review
        if outcome.recovery is not None:
            record = outcome.recovery
            review.notes.append(f"distilled {request.distill} iterations from the original (label-free, "
                                f"{record['seconds']:.0f} s on {record['device']}): held-out agreement "
                                f"{record['agreement']['before']} -> {record['agreement']['after']}")
        return review.to_json()

    def build(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        """Run the ``BuildRequest`` ``args`` (its CTs as named transfer files); every stage is a progress message."""
        from ..progress import listening
        from ..runtime.stage_log import StageLog
        from ..usecases.building import run_build
        from ..usecases.requests import BuildRequest
        request = BuildRequest.from_json(args)
        if not request.variants:
            raise TuckerSegmentError("name the variants to build (ids from `tuckersegment variants`)")
        at = [0.0]

        def say(message: str) -> None:
            progress(at[0], message)

        def starting(index: int, count: int, variant: Any) -> None:
            at[0] = index / count
            progress(at[0], f"building {variant.id}")
        with listening(StageLog(say, quiet_seconds=0.0)):  # the panel shows every stage as it goes
            outcome = run_build(request, say=say, starting=starting)
        if outcome.failed:
            raise PolicyError("; ".join(f"{key}: not built: {reason}" for key, reason in outcome.failed.items()))
        return {"built": {key: str(folder) for key, folder in outcome.built.items()}}


def _read_lines(stream: BinaryIO, lines: queue.Queue, working: threading.Event) -> None:
    """Requests into ``lines``; once stdin closes, None, or the end of this process when a request is in hand."""
    for line in iter(stream.readline, b""):
        lines.put(line)
    if working.is_set():
        end_now()
    lines.put(None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m TuckerSegmentLib.worker", description=__doc__)
    parser.add_argument("--idle-seconds", type=float, default=IDLE_SECONDS,
                        help="exit after this long without a request (default 600)")
    args = parser.parse_args(argv)
    if not args.idle_seconds > 0:
        parser.error("--idle-seconds must be positive")
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # libraries' prints go to stderr, never into the protocol
    sys.stdout = sys.stderr
    die_with_parent()
    requests: queue.Queue = queue.Queue()
    worker = Worker(protocol)
    threading.Thread(target=_read_lines, args=(sys.stdin.buffer, requests, worker.working), daemon=True).start()
    worker.serve(requests, args.idle_seconds)
    end_now()  # idle or stdin closed: no thread left blocked in a read at interpreter shutdown
    return 0
