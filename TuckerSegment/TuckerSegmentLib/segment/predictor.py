"""Segment CT volumes with an original or compressed nnU-Net v2 model through nnU-Net's predictor.

``Segmenter`` loads a model once and segments many volumes. Per volume: reorient to closest
canonical RAS, resample the image (never probabilities) to the model spacing, let
``nnUNetPredictor`` normalise, tile (Gaussian-weighted sliding window) and predict labels, then put
the labels back on the input grid by nearest neighbour. Volumes larger than ``max_voxels`` at the
model spacing are predicted in overlapping slabs along S, as TotalSegmentator does.
"""
from __future__ import annotations

import contextlib
import io
import time
from dataclasses import replace
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian

from ..defaults import TILE_STEP, check_tile_step
from ..errors import SegmentationCancelled, TuckerSegmentError
from ..image.geometry import resample_labels_nearest
from ..image.volume import Volume, checked_volume
from ..nnunet.layout import Fold
from ..nnunet.model_folder import ModelFolder
from ..policies.methods import describe_policy
from ..progress import Cancel, Progress
from ..runtime.devices import EXECUTIONS, resolve_device
from ..runtime.execution import ExecutionReport, optimise_execution
from ..runtime.inference import OpenVINONetwork, cache_key, choose_runtime
from ..runtime.latency import LatencyTable
from ..runtime.stored_int8 import StoredInt8, source_digest, stored_int8
from .crop import model_grid_box
from .labels import label_values, segment_labels
from .result import SegmentationResult

TOTALSEGMENTATOR_MAX_VOXELS = 512 * 512 * 900  # TotalSegmentator splits larger volumes in three along z
SLAB_OVERLAP = 20  # voxels of context on each side of a slab (TotalSegmentator's margin)
Calibration = Callable[[ModelFolder], Sequence[np.ndarray]]  # a model's network-ready patches to quantize it on (int8)


class _Predictor(nnUNetPredictor):
    """nnU-Net's predictor, reporting each sliding-window tile and honouring a cancel flag, and summing
    tiles in float32 when the sum is kept in RAM.

    A cancelled run skips the network for the remaining tiles (so nnU-Net's tile queue drains
    normally) and then raises ``SegmentationCancelled``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.on_tile: Callable[[int, int], None] | None = None
        self.cancel: Cancel | None = None
        self.cancelled = False
        self.precision = "fp16"  # on CUDA: fp16 autocast as nnU-Net does; "bf16" autocast; "f32" none
        self.tiles_total = self._tiles_done = 0

    def _internal_get_sliding_window_slicers(self, image_size):
        slicers = super()._internal_get_sliding_window_slicers(image_size)
        self.tiles_total, self._tiles_done = len(slicers), 0
        return slicers

    def _internal_predict_sliding_window_return_logits(self, data: torch.Tensor, slicers: list,
                                                       do_on_device: bool = True) -> torch.Tensor:
        """On a CUDA device exactly nnU-Net's. Elsewhere the sum lives in RAM, where nnU-Net keeps it in
        float16, which CPUs add about 8 times slower than float32 (0.50 s against 0.06 s per 118-class
        tile measured here: about 10 s of a 3 mm TotalSegmentator volume); so the same slicers, the same
        Gaussian and the same weighted sum, in float32: 4 bytes per output and voxel instead of 2, within
        the 6 the catalogue's memory estimate (and so the RAM guard) allows for."""
        if self.device.type == "cuda":
            return super()._internal_predict_sliding_window_return_logits(data, slicers, do_on_device)
        heads, cpu = self.label_manager.num_segmentation_heads, torch.device("cpu")
        logits = torch.zeros((heads, *data.shape[1:]), dtype=torch.float32)
        weights = torch.zeros(data.shape[1:], dtype=torch.float32)
        gaussian = (compute_gaussian(tuple(self.configuration_manager.patch_size), sigma_scale=1. / 8,
                                     value_scaling_factor=10, dtype=torch.float32, device=cpu)
                    if self.use_gaussian else torch.ones(tuple(self.configuration_manager.patch_size)))
        for tile in slicers:
            patch = data[tile][None].contiguous().to(self.device)
            prediction = self._internal_maybe_mirror_and_predict(patch)[0].to(cpu, torch.float32)
            logits[tile].addcmul_(prediction, gaussian)
            weights[tile[1:]] += gaussian
        return logits.div_(weights)

    def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cancelled and self.cancel is not None and self.cancel():
            self.cancelled = True
        if self.cancelled:
            return torch.zeros((x.shape[0], self.label_manager.num_segmentation_heads, *x.shape[2:]), device=x.device)
        if self.precision == "fp16":
            prediction = super()._internal_maybe_mirror_and_predict(x)
        elif self.precision == "bf16":
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                prediction = super()._internal_maybe_mirror_and_predict(x)
        else:
            with torch.autocast(x.device.type, enabled=False):
                prediction = super()._internal_maybe_mirror_and_predict(x.float())
        self._tiles_done += 1
        if self.on_tile is not None:
            self.on_tile(self._tiles_done, self.tiles_total)
        return prediction


def _slabs(length: int, parts: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(start, stop) of each slab with context, and (keep_start, keep_stop) of the part it owns."""
    bounds = np.linspace(0, length, parts + 1).round().astype(int)
    return [(max(0, a - overlap), min(length, b + overlap), a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def network_source_files(model: ModelFolder, fold: str) -> list[Path]:
    """The files a fold's network is built from: the fold's weights and the plans."""
    return [f for f in model.fold_path(fold).iterdir() if f.is_file()] + [model.path / "plans.json"]


class Segmenter:
    """A model loaded once, ready to segment many volumes.

    ``tile_step`` 0.8 and no mirroring are TotalSegmentator's settings (nnU-Net's own default is 0.5
    with mirroring: slightly more accurate, several times slower)."""

    def __init__(self, model: str | Path | ModelFolder, fold: Fold | None = None, device: str = "auto",
                 tile_step: float = TILE_STEP, mirroring: bool = False, max_voxels: int = TOTALSEGMENTATOR_MAX_VOXELS,
                 trust_checkpoint: bool = False, name: str | None = None, network: torch.nn.Module | None = None,
                 policy: str = "original", execution: str = "fastest", runtime: str = "auto",
                 precision: str = "auto", calibration: Calibration | None = None) -> None:
        """``network``: run this network (e.g. compressed in memory, described by ``policy``) instead of the
        fold's saved weights; the folder then only supplies plans and labels. ``execution``: "fastest"
        runs every layer in its fastest exact form on this device (timed once, cached: see
        ``execution.optimise_execution``), "reference" exactly as stored (three convolutions per
        factorised layer); it applies to the PyTorch runtime. ``runtime``/``precision``: see
        ``runtime.inference.choose_runtime`` (auto: OpenVINO on a CPU when installed; fp16 autocast on CUDA
        as nnU-Net does). ``calibration``: the patches an int8 network is quantized on (int8 needs it)."""
        if execution not in EXECUTIONS:
            raise TuckerSegmentError(f"unknown execution {execution!r}; choose one of {', '.join(EXECUTIONS)}")
        tile_step = check_tile_step(tile_step)
        self.model = model if isinstance(model, ModelFolder) else ModelFolder.open(model)
        self.name = name or self.model.name
        self.fold = str(fold) if fold is not None else (self.model.folds[0] if network is None else "0")
        self.device = resolve_device(device)
        self.runtime = choose_runtime(runtime, precision, self.device)
        self.max_voxels = int(max_voxels)
        self.segments = segment_labels(self.model.dataset_json, self.model.path)
        from_memory = network is not None
        if network is not None:
            network, axes, self.policy = network.eval(), None, policy
        elif self.model.is_compressed_fold(self.fold):
            network = self.model.load_network(self.fold)
            record = self.model.tucker_record(self.fold)
            axes = record.get("inference_allowed_mirroring_axes")
            self.policy = describe_policy(record["policy"])
        else:
            self.policy = "original"
            network, checkpoint = self.model.load_original(self.fold, trust=trust_checkpoint)
            axes = checkpoint.get("inference_allowed_mirroring_axes")
        self.execution: ExecutionReport | None = None
        if self.runtime.runtime == "openvino":
            source = None if from_memory else source_digest(self._source_files(), self.model.patch_size)
            key = None if source is None else cache_key(source)
            stored = self._stored_int8(source) if self.runtime.precision == "int8" and source else None
            patches = (lambda: calibration(self.model)) if calibration is not None else None  # noqa: E731
            if self.runtime.precision == "int8" and stored is None and patches is None:
                raise TuckerSegmentError(f"{self.model.path} holds no int8 form for fold {self.fold}; build one "
                                         "(compress --int8, build-variants) or ask for --precision int8 explicitly")
            network = OpenVINONetwork(network, self.model.example_input("cpu"), self.runtime.precision, key,
                                      share_output=not mirroring, calibration=patches, stored=stored)
        elif execution == "fastest":
            self.execution = optimise_execution(network, self.model.example_input(), LatencyTable.for_device(self.device))
        with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints a notice for every non-CUDA device
            self._predictor = _Predictor(tile_step_size=tile_step, use_gaussian=True, use_mirroring=mirroring,
                                         perform_everything_on_device=self.device.type == "cuda", device=self.device,
                                         verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        self._predictor.precision = self.runtime.precision
        self._predictor.manual_initialization(network, self.model.plans_manager, self.model.configuration_manager,
                                              [network.state_dict()], self.model.dataset_json,
                                              self.model.trainer_name or "nnUNetTrainer",
                                              (tuple(axes) if axes else (0, 1, 2)) if mirroring else None)

    def _stored_int8(self, source: str) -> StoredInt8 | None:
        """The int8 form stored in the model folder for this fold (verified against ``source``, the fold's
        ``source_digest``), its description in the runtime's reason; None when the folder holds none."""
        stored = stored_int8(self.model.path, self.fold, source)
        if stored is not None:
            self.runtime = replace(self.runtime, reason=f"{self.runtime.reason.split(';')[0]}; {stored.describe()}")
        return stored

    def _source_files(self) -> list[Path]:
        return network_source_files(self.model, self.fold)

    def label_value(self, names: Sequence[str]) -> list[int]:
        return label_values(self.segments, names)

    def segment(self, volume: Volume | str | Path, progress: Progress | None = None, cancel: Cancel | None = None,
                subset: Sequence[str] | None = None) -> SegmentationResult:
        """Segment one CT volume; labels come back on its own grid."""
        self.label_value(subset or [])  # an unknown structure fails before the volume is read
        return self.predict(checked_volume(volume), progress, cancel, subset)

    def predict(self, volume: Volume, progress: Progress | None = None, cancel: Cancel | None = None,
                subset: Sequence[str] | None = None, region: Volume | None = None) -> SegmentationResult:
        """``segment`` for a volume that has already passed ``check_volume``; with ``region`` (a label map on any grid
        of the same CT) the network runs only on the box of the model grid it marks, and labels are empty outside."""
        start = time.perf_counter()
        report = progress or (lambda fraction, message: None)
        keep = self.label_value(subset) if subset else None
        report(0.0, "reorienting and resampling")
        grid = self.model.onto_grid(volume)
        image, shape, target = grid.image, grid.shape, grid.spacing
        box = model_grid_box(region, shape, tuple(self.model.patch_size)) if region is not None else None
        if box is None:
            labels, tiles = self._predict(image, target, report, cancel)
        else:
            inside, tiles = self._predict(np.ascontiguousarray(image[box]), target, report, cancel)
            labels = np.zeros(shape, dtype=inside.dtype)
            labels[box] = inside
        report(0.97, "mapping labels to the input grid")
        labels = resample_labels_nearest(labels, grid.canonical.array.shape)
        labels = grid.reorientation.restore(labels)
        if keep is not None:
            labels = np.where(np.isin(labels, keep), labels, 0).astype(labels.dtype)
        segments = [s for s in self.segments if keep is None or s.value in keep]
        report(1.0, "done")
        return SegmentationResult(volume.with_array(labels), segments, self.name, str(self.device),
                                  time.perf_counter() - start, tiles, self.policy, runtime=self.runtime.describe())

    def _predict(self, image: np.ndarray, spacing: np.ndarray, report: Progress,
                 cancel: Cancel | None) -> tuple[np.ndarray, int]:
        """Labels for a canonical image at the model spacing, in slabs along S when it is too large."""
        parts = max(1, int(np.ceil(image.size / self.max_voxels)))
        slab_overlap = SLAB_OVERLAP if parts > 1 else 0
        slabs = _slabs(image.shape[0], min(parts, image.shape[0]), slab_overlap)
        largest = max((s.value for s in self.segments), default=0)
        labels = np.zeros(image.shape, dtype=np.uint8 if largest < 256 else np.uint16)
        predictor, tiles = self._predictor, 0
        predictor.cancel, predictor.cancelled = cancel, False
        for index, (a, b, keep_a, keep_b) in enumerate(slabs):
            def on_tile(done: int, total: int, index: int = index) -> None:
                report(0.05 + 0.9 * (index + done / total) / len(slabs),
                       f"tile {done}/{total}" + (f" of slab {index + 1}/{len(slabs)}" if len(slabs) > 1 else ""))
            predictor.on_tile = on_tile
            try:
                part = predictor.predict_single_npy_array(image[None, a:b], {"spacing": [float(s) for s in spacing]},
                                                          None, None, False)
            finally:
                predictor.on_tile = None
            if predictor.cancelled:
                raise SegmentationCancelled("segmentation cancelled; nothing was written")
            tiles += predictor.tiles_total
            labels[keep_a:keep_b] = part[keep_a - a:keep_b - a]
        return labels, tiles
