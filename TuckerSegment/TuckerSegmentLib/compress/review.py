"""What a compression gained and cost, measured side by side: the table the compression panel shows.

Parameters, FLOPs and weight bytes come from what compression recorded in ``tucker.json``; time per patch and peak memory of one
patch forward are measured on the device at hand, in the runtime segmentation uses there (OpenVINO on a
CPU when installed: both networks as stored; PyTorch: the original as nnU-Net runs it, the compressed
one in its fastest exact execution; interleaved, ``execution.compare_latency``); agreement is the mean Dice between the original's and the
compressed model's labels on the calibration volumes, segmented end to end.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..image.volume import Volume
from ..nnunet.model_folder import ModelFolder
from ..progress import Progress, check_cancel
from ..runtime.devices import resolve_device
from ..runtime.execution import compare_latency
from ..runtime.inference import choose_runtime
from ..runtime.latency import LatencyTable, autocast, synchronize
from ..segment.predictor import Segmenter
from .figures import CompressionReview, ModelFigures


class PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensors that operations create while active (storages counted once, freed
    when their last tensor goes): a forward pass's activation memory on any device."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._storages: dict[int, tuple[int, int]] = {}  # data pointer -> (tensors alive, bytes)

    def _release(self, key: int) -> None:
        count, size = self._storages[key]
        if count > 1:
            self._storages[key] = (count - 1, size)
        else:
            del self._storages[key]
            self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's protocol)
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            count, size = self._storages.get(key, (0, storage.nbytes()))
            if count == 0:
                self.live += size
                self.peak = max(self.peak, self.live)
            self._storages[key] = (count + 1, size)
            weakref.finalize(tensor, self._release, key)
        return out


def peak_forward_bytes(network: nn.Module, x: torch.Tensor) -> tuple[int, str]:
    """Peak memory of one forward pass of ``x`` (weights included) and how it was measured."""
    weights = sum(t.numel() * t.element_size() for t in [*network.parameters(), *network.buffers()])
    with torch.inference_mode(), autocast(x.device):
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
            torch.cuda.reset_peak_memory_stats(x.device)
            base = torch.cuda.memory_allocated(x.device)
            network(x)
            synchronize(x.device)
            return weights + torch.cuda.max_memory_allocated(x.device) - base, "CUDA allocator peak, one patch"
        tracker = PeakTensorBytes()
        with tracker:
            network(x)
    return weights + tracker.peak, "weights + peak live tensors of one patch forward"


def label_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Dice over the labels present in either map (1.0 when both are empty)."""
    values = np.union1d(np.unique(a), np.unique(b))
    values = values[values != 0]
    if values.size == 0:
        return 1.0
    dice = [2 * np.count_nonzero((a == v) & (b == v)) / (np.count_nonzero(a == v) + np.count_nonzero(b == v))
            for v in values]
    return float(np.mean(dice))


def _figures(stats: dict[str, Any]) -> ModelFigures:
    """Figures from a ``NetworkStats`` record (``tucker.json``'s ``before``/``after``)."""
    return ModelFigures(int(stats["params"]), int(stats["flops"]), int(stats["weight_bytes"]))


def review_compression(source: str | Path, output: str | Path, volumes: Sequence[Volume] = (), device: str = "auto",
                       measure: bool = True, progress: Progress | None = None,
                       cancelled: Callable[[], bool] | None = None, repeats: int = 3,
                       runtime: str = "auto") -> CompressionReview:
    """Compare the original model folder ``source`` with its compressed copy ``output`` (first fold of
    each): sizes always; with ``measure`` time (in ``runtime``, see ``choose_runtime``) and peak memory
    per patch; agreement on ``volumes``, segmented in the same runtime."""
    report = progress or (lambda fraction, message: None)
    original_folder, compressed_folder = ModelFolder.open(source), ModelFolder.open(output)
    fold = compressed_folder.folds[0]
    torch_device = resolve_device(device)
    record = compressed_folder.tucker_record(fold)
    review = CompressionReview(str(original_folder.path), str(compressed_folder.path), record["policy"],
                               str(torch_device), _figures(record["before"]), _figures(record["after"]))
    steps = (2 if measure else 0) + 2 * len(volumes)
    done = 0
    if measure:
        check_cancel(cancelled, "review")
        report(0.0, "timing one patch forward of each model")
        original, _ = original_folder.load_original(fold)
        compressed = compressed_folder.load_network(fold)
        meta = original_folder.example_input()
        choice = choose_runtime(runtime, "auto", torch_device)
        seconds = compare_latency(original, compressed, meta, LatencyTable.for_device(torch_device, runtime=choice),
                                  repeats=repeats)
        review.runtime = choice.describe()
        done += 1
        report(done / steps, "measuring peak memory")
        check_cancel(cancelled, "review")
        x = torch.randn(meta.shape, device=torch_device)
        peaks = [peak_forward_bytes(network.to(torch_device).eval(), x) for network in (original, compressed)]
        review.peak_memory = peaks[0][1]
        review.original = replace(review.original, seconds=seconds[0], peak_bytes=peaks[0][0])
        review.compressed = replace(review.compressed, seconds=seconds[1], peak_bytes=peaks[1][0])
        done += 1
    if volumes:
        scores = []
        segmenters = [Segmenter(original_folder, fold, device, runtime=runtime),
                      Segmenter(compressed_folder, fold, device, runtime=runtime)]
        for index, volume in enumerate(volumes):
            labels = []
            for segmenter in segmenters:
                check_cancel(cancelled, "review")
                report(done / steps, f"agreement: volume {index + 1}/{len(volumes)} with the {segmenter.policy} model")
                labels.append(segmenter.segment(volume, cancel=cancelled).labels)
                done += 1
            scores.append(label_agreement(*labels))
        review.agreement, review.agreement_volumes = float(np.mean(scores)), len(volumes)
    report(1.0, "review done")
    return review
