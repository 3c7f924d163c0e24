"""The worker process: segments, compresses and builds variants for a client (Slicer's Logic) that talks
to it over stdin/stdout (``protocol``), keeping the last model loaded between requests.

Started as ``python -m TuckerSegmentLib.worker``. It exits when its stdin closes, after ``idle_seconds``
without a request, or when it is terminated; it never cleans up after a cancel itself: a terminated
worker dies at once and the client removes what it left (its temporary folder, partial outputs). Each request
line is untrusted input: whatever it holds, it gets one answer and the worker goes on.
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from .. import __version__
from ..errors import CacheWarning, OutputPathError, PolicyError, TuckerSegmentError, VolumeError
from ..image.volume import IntensityWarning
from ..progress import Progress
from .lifeline import die_with_parent, end_now
from .protocol import (MAX_LINE, READY, BadRequest, Request, encode, error_to_json, quoted, read_request, save_labels,
                       segments_to_json)

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
    """Answers one request at a time: ``read`` (a thread on stdin) takes each line, answering at once one that is not
    a request or that comes while another is in hand; ``serve`` answers the rest until stdin closes or it idles out."""

    def __init__(self, output: BinaryIO) -> None:
        self._output = output
        self._lock = threading.Lock()  # one line at a time on the protocol stream, from either thread; guards in_hand
        self.in_hand: int | str | None = None  # the id of the request taken and not answered yet
        self.requests: queue.Queue[Request | None] = queue.Queue()  # None: stdin closed
        self.model = LoadedModel()
        self.handlers: dict[str, Handler] = {"segment": self.segment, "compress": self.compress,
                                             "build": self.build, "status": self.status}
        self.working = threading.Event()  # set while ``serve`` answers a request

    def send(self, message: dict[str, Any]) -> None:
        """Write ``message`` as one protocol line."""
        self.write(encode(message))

    def write(self, line: bytes, answered: bool = False) -> None:
        """Write one protocol line; ``answered``: it ends the request in hand, which is let go before the line goes out
        (a client sends its next request once it has read this one)."""
        with self._lock:
            if answered:
                self.in_hand = None
            self._output.write(line)
            self._output.flush()

    def serve(self, stdin: BinaryIO, idle_seconds: float) -> None:
        """Say ready, then answer the requests read from ``stdin`` until it closes or none comes for ``idle_seconds``."""
        self.send({"event": READY, "pid": os.getpid(), "version": __version__})
        threading.Thread(target=self.read, args=(stdin,), daemon=True, name="request reader").start()
        while True:
            try:
                request = self.requests.get(timeout=idle_seconds)
            except queue.Empty:
                return  # idle: the client starts a new worker when it needs one
            if request is None:
                return  # the client closed our stdin
            self.working.set()
            try:
                self.answer(request)
            finally:
                self.working.clear()

    def read(self, stdin: BinaryIO) -> None:
        """Take each line of ``stdin``; once it closes, end the serve loop, or this process while a request is being
        answered."""
        for line in _lines(stdin):
            self.take(line)
        if self.working.is_set():
            end_now()
        self.requests.put(None)

    def take(self, line: bytes) -> None:
        """Queue the request on ``line`` for ``serve``, or answer at once one that is not a request or that comes while
        another is in hand (never a second job)."""
        try:
            request = read_request(line)
        except BadRequest as error:
            self.send({"id": error.ident, "error": error_to_json(error)})
            return
        with self._lock:
            busy = self.in_hand
            if busy is None:
                self.in_hand = request.ident
                self.requests.put(request)
        if busy is not None:
            refusal = TuckerSegmentError(f"the worker is busy with request {busy!r}; wait for it or cancel it")
            self.send({"id": request.ident, "error": error_to_json(refusal)})

    def answer(self, request: Request) -> None:
        """Run ``request``; its result, or its failure as an error answer (the worker itself goes on)."""
        def progress(fraction: float, message: str) -> None:
            self.send({"id": request.ident, "fraction": round(min(max(float(fraction), 0.0), 1.0), 4),
                       "message": message})
        handler = self.handlers.get(request.command)
        try:
            if handler is None:
                raise TuckerSegmentError(f"the worker has no command {quoted(request.command)}")
            line = encode({"id": request.ident, "result": handler(request.args, progress)})  # or an error: not JSON
        except Exception as error:  # every failure is an answer; the worker itself goes on
            if not isinstance(error, TuckerSegmentError):
                traceback.print_exc(file=sys.stderr)
            line = encode({"id": request.ident, "error": error_to_json(error)})
        self.write(line, answered=True)

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
        volume, labels = _segment_files(args)
        self.model.notices.clear()
        loads, started = self.model.loads, time.perf_counter()
        progress(0.0, "loading the model")
        segmenter = self.model.get(request)
        load_seconds = time.perf_counter() - started if self.model.loads > loads else 0.0
        segmenter.check_subset(request.subset)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", IntensityWarning)
            result = segment_with(segmenter, request, read_ct(volume), progress)
        save_labels(labels, result.labels)
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


def _segment_files(args: dict[str, Any]) -> tuple[Path, Path]:
    """The (volume, labels) files a segment request names, checked before any model loads: the volume exists and
    the labels' folder does."""
    from ..usecases.requests import RequestError
    paths = []
    for name in ("volume", "labels"):
        value = args.get(name)
        if not isinstance(value, str) or not value.strip() or "\0" in value:
            raise RequestError(f"{name} must be the path of a file (a string), not {quoted(value)}")
        paths.append(Path(value).expanduser())
    volume, labels = paths
    if not volume.is_file():
        raise VolumeError(f"volume {volume} does not exist; name a CT file that does (a transfer file is written "
                          "before its request)")
    if labels.is_dir() or not labels.parent.is_dir():
        raise OutputPathError(f"labels must name a file in an existing folder, not {labels}; create its folder first")
    return volume, labels


def _lines(stream: BinaryIO) -> Iterator[bytes]:
    """The lines of ``stream``; of one longer than ``MAX_LINE`` only its start, which ``read_request`` refuses (the
    rest is read and dropped, never held)."""
    limit = MAX_LINE + 2  # room for a line ending
    while line := stream.readline(limit):
        rest = line
        while len(rest) == limit and not rest.endswith(b"\n"):
            rest = stream.readline(limit)
        yield line


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
    try:
        Worker(protocol).serve(sys.stdin.buffer, args.idle_seconds)
    except BaseException:  # not a request's failure (those are answers): the protocol stream broke, or Ctrl-C
        traceback.print_exc(file=sys.stderr)
        end_now(1)
    end_now()  # idle or stdin closed: no thread left blocked in a read at interpreter shutdown
    return 0
