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
from ..errors import CacheWarning, TuckerSegmentError
from ..image.volume import IntensityWarning, Volume
from ..progress import Progress
from .protocol import (READY, encode, error_to_json, load_volume, save_labels, segments_to_json)

IDLE_SECONDS = 600.0
Handler = Callable[[dict[str, Any], Progress], dict[str, Any]]


class LoadedModel:
    """The segmenter of the last (model, device, task, options) asked for; another choice replaces it."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.segmenter: Any = None
        self.reason = ""
        self.loads = 0  # how many times a model was loaded into this process
        self.notices: list[str] = []

    def get(self, model: str | list[str], device: str, task: str, tile_step: float = 0.8, runtime: str = "auto",
            precision: str = "auto") -> Any:
        from ..segment.task import TaskSegmenter
        from ..variants.catalogue import catalogue
        from ..variants.choice import choose_model, usable_devices
        from ..variants.guard import SafeTask
        from ..variants.hardware import detect_devices
        options = {"tile_step": float(tile_step), "runtime": str(runtime), "precision": str(precision)}
        if isinstance(model, list):
            paths = tuple(Path(m).expanduser().resolve() for m in model)
            self.reason = "model folders given"
            return self._load((paths, device, tuple(options.items())),
                              lambda: TaskSegmenter(list(paths), device=device, **options))
        variants, devices = catalogue(), detect_devices()
        choice = choose_model(model, task, device, variants, devices)
        self.reason = choice.reason
        return self._load((choice.folders, choice.device, tuple(options.items())),
                          lambda: SafeTask(choice, variants, usable_devices(device, devices),
                                           notify=self.notices.append, **options))

    def _load(self, key: tuple, build: Callable[[], Any]) -> Any:
        """The segmenter for ``key``: the loaded one, or ``build()`` after the previous one is let go."""
        if key != self.key:
            self.segmenter, self.key = None, None  # the previous model's memory is free before the next loads
            self.segmenter, self.key = build(), key
            self.loads += 1
        return self.segmenter


class Worker:
    """Answers requests one at a time; ``serve`` runs until stdin closes or the worker idles out."""

    def __init__(self, output: BinaryIO) -> None:
        self._output = output
        self.model = LoadedModel()
        self.handlers: dict[str, Handler] = {"segment": self.segment, "compress": self.compress,
                                             "build": self.build, "status": self.status}

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
            self.answer(line)

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
        return {"pid": os.getpid(), "loads": self.model.loads, "version": __version__}

    def segment(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        """Segment the volume file ``args["volume"]`` and write its labels to ``args["labels"]``."""
        crop = args.get("crop", True)
        if not isinstance(crop, bool):
            raise TuckerSegmentError(f"crop must be true or false, not {crop!r}")
        self.model.notices.clear()
        loads, started = self.model.loads, time.perf_counter()
        progress(0.0, "loading the model")
        segmenter = self.model.get(args.get("model", "auto"), args.get("device", "auto"), args.get("task", "auto"),
                                   args.get("tile_step", 0.8), args.get("runtime", "auto"), args.get("precision", "auto"))
        load_seconds = time.perf_counter() - started if self.model.loads > loads else 0.0
        subset = args.get("subset") or None
        segmenter.check_subset(subset)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", IntensityWarning)
            result = segmenter.segment(Volume(*load_volume(args["volume"])), progress, None, subset, crop)
        save_labels(Path(args["labels"]), result.labels)
        return {"segments": segments_to_json(result.segments), "model": result.model, "device": result.device,
                "runtime": result.runtime,
                "seconds": result.seconds, "tiles": result.tiles, "policy": result.policy,
                "warnings": list(result.warnings), "reason": self.model.reason,
                "notices": [*self.model.notices, *(str(w.message) for w in caught if issubclass(w.category, CacheWarning))],
                "loads": self.model.loads, "load_seconds": load_seconds,
                "intensity_warnings": [str(w.message) for w in caught if issubclass(w.category, IntensityWarning)]}

    def compress(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        """Compress ``args["source"]`` into ``args["output"]`` and review it against the original. Without
        ``args["calibration"]`` a CT model is calibrated on the bundled sample CT, unless ``args["weight_only"]``.
        A pruning method (``prune-l1``, ``prune-fpgm``) prunes to the FLOP target instead, from the weights alone.
        ``args["distill"]`` N > 0: the compressed model is then distilled N iterations from the original on the same
        CTs (label-free, ``recovery.compress_distill``) before it appears in ``output`` and is reviewed."""
        from ..atomic import check_output_dir
        from ..compress.folder import compress_model_folder, prune_model_folder
        from ..errors import PolicyError
        from ..compress.review import review_compression
        from ..nnunet.layout import model_inputs
        from ..nnunet.model_folder import ModelFolder
        from ..policies.methods import method, policy_for
        from ..recovery.compress_distill import distill_iterations
        from ..runtime.devices import resolve_device
        from ..runtime.inference import choose_runtime
        device, runtime = args.get("device", "auto"), args.get("runtime", "auto")
        choose_runtime(runtime, "auto", resolve_device(device))  # refused before anything is written
        policy_key, target = args.get("policy", "flops"), args.get("target")
        chosen = method(policy_key)
        if chosen.needs_labels:
            raise PolicyError(f"{chosen.key} needs labelled CTs, which the panel does not take; run tuckersegment "
                              f"compress --method {chosen.key} --calibration CT... --labels LABELMAP...")
        distill, weight_only = distill_iterations(args.get("distill", 0)), args.get("weight_only", False)
        if distill and weight_only:
            raise PolicyError("distillation trains on calibration CTs and weight-only compression uses none; ask for "
                              "one of them")
        policy = None if chosen.prunes else policy_for(policy_key, target if chosen.target else None, device=device,
                                                       runtime=runtime)
        source = ModelFolder.open(args["source"]).path
        output = check_output_dir(Path(args["output"]).expanduser(), inputs=model_inputs("model folder", args["source"]))
        volumes = [Volume(*load_volume(path)) for path in args.get("calibration", [])]
        share = 0.3 if distill else 0.6  # of the progress bar; distillation takes the next 0.3, the review the rest

        def layer(done: int, total: int, name: str) -> None:
            progress(share * done / total, f"{'pruning, trial' if chosen.prunes else 'compressing layer'} "
                                           f"{done}/{total}: {name}")

        def write(folder: Path) -> None:
            if chosen.prunes:  # weights alone; the scene's CTs score agreement in the review (and train a distillation)
                prune_model_folder(source, folder, chosen.criterion, chosen.default if target is None else target,
                                   progress=layer)
            else:
                compress_model_folder(source, folder, policy, progress=layer, calibration=volumes or None,
                                      weight_only=weight_only)
        progress(0.0, "reading the model" + (" and calibration volumes" if volumes else ""))
        if distill:
            notes = self._distilled(write, source, output, volumes, distill, {
                "policy": policy_key, "target": target, "runtime": runtime, "weight_only": weight_only}, device, progress)
        else:
            write(output)
            notes = []
        review = review_compression(source, output, volumes, device, bool(args.get("measure", True)),
                                    lambda fraction, message: progress(0.6 + 0.4 * fraction, message),
                                    runtime=runtime)
        review.notes.extend(notes)
        return review.to_json()

    @staticmethod
    def _distilled(write: Callable[[Path], None], source: Path, output: Path, volumes: list[Volume], iterations: int,
                   settings: dict[str, Any], device: str, progress: Progress) -> list[str]:
        """Write ``output`` as ``write`` compresses it, distilled ``iterations`` times from ``source`` on ``volumes``
        (the sample CT without them); the review's note on it."""
        from ..recovery.compress_distill import compress_and_distill

        def step(done: int, total: int, message: str) -> None:
            progress(0.3 + 0.3 * done / total, f"distilling, iteration {done}/{total}: {message}")
        _, record = compress_and_distill(write, source, output, volumes or None, iterations, settings, device=device,
                                         progress=step, say=lambda message: progress(0.3, message))
        agreement = record["agreement"]
        return [f"distilled {iterations} iterations from the original (label-free, {record['seconds']:.0f} s on "
                f"{record['device']}): held-out agreement {agreement['before']} -> {agreement['after']}"]

    def build(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        """Build the catalogue variants ``args["variants"]`` (ids) into the user cache, calibrated on
        ``args["calibration"]`` and scored on ``args["holdout"]`` (saved scene volumes, by name), measured."""
        from ..progress import listening
        from ..runtime.stage_log import StageLog
        from ..variants.build import build_variant
        from ..variants.catalogue import catalogue, find_variant
        from ..variants.measure import plan_measurement
        roots = [Path(args["weights"])] if args.get("weights") else None
        variants = catalogue(weights_roots=roots)
        chosen = [find_variant(variants, v) for v in args.get("variants", [])]
        if not chosen:
            raise TuckerSegmentError("name the variants to build (ids from `tuckersegment variants`)")
        scene = {role: [(name, Volume(*load_volume(path))) for name, path in args.get(role) or []]
                 for role in ("calibration", "holdout")}
        plan = plan_measurement(scene["calibration"], scene["holdout"]) if scene["calibration"] else None
        built = {}
        for index, variant in enumerate(chosen):
            at = index / len(chosen)
            progress(at, f"building {variant.id}")
            if variant.original or variant.bundled:
                continue
            def say(message: str, at: float = at) -> None:
                progress(at, message)
            with listening(StageLog(say, quiet_seconds=0.0)):  # the panel shows every stage as it goes
                built[variant.id] = str(build_variant(variant, weights_roots=roots, plan=plan, report=say))
        return {"built": built}


def _read_lines(stream: BinaryIO, lines: queue.Queue) -> None:
    for line in iter(stream.readline, b""):
        lines.put(line)
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
    requests: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(sys.stdin.buffer, requests), daemon=True).start()
    Worker(protocol).serve(requests, args.idle_seconds)
    return 0
