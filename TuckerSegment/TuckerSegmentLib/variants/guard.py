"""Run a chosen model safely: RAM checked before a CPU run, GPU out-of-memory answered by a fallback.

A CPU that runs out of memory kills the process, so before each volume the expected peak (from the
catalogue) is compared with the free RAM: too big, the volume is predicted in slabs that fit, and a
volume whose single tile would not fit is refused. On a GPU, an out-of-memory error moves to the next
smaller variant, then to the CPU, telling the user each time; nothing partial is returned.
"""
from __future__ import annotations

import gc
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import NotEnoughMemoryError
from ..image.volume import Volume, checked_volume
from ..progress import Cancel, Progress
from ..segment.result import SegmentationResult
from ..segment.task import TaskSegmenter
from .catalogue import Variant, task_of, verify_built
from .choice import ModelChoice, from_selection
from ..runtime.hardware import GB, DeviceInfo, system_memory
from .selection import MEMORY_MARGIN, fallback_chain
from .task_weights import check_task_model
from .totalsegmentator import find_task, tasks

COARSE_TASK = "fastest"  # TotalSegmentator's 6 mm task: where a subset is looked for before it is segmented

Notify = Callable[[str], None]


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def voxels_at(volume: Volume, spacing_mm: float) -> int:
    """Voxels of ``volume`` resampled to an isotropic ``spacing_mm``."""
    extent = np.asarray(volume.array.shape) * np.asarray(volume.spacing[::-1])
    return math.prod(max(1, math.ceil(e / spacing_mm)) for e in extent)


def cpu_slab_voxels(variant: Variant, voxels: int, free_bytes: int) -> int | None:
    """``None`` when ``variant`` fits the free RAM for ``voxels``; otherwise the largest slab (voxels) that fits.
    Raises ``NotEnoughMemoryError`` when not even one tile fits."""
    need, _ = variant.memory_bytes("cpu", voxels)
    budget = free_bytes * (1 - MEMORY_MARGIN)
    if need is None or need <= budget:
        return None
    tile = variant.memory_bytes("cpu", 0)[0] or 0
    per_voxel = variant.peak_memory["cpu"]["bytes_per_voxel"]
    slab = int((budget - tile) / per_voxel)
    if slab < voxels // 64 or slab <= 0:
        raise NotEnoughMemoryError(f"{variant.id} needs about {need / GB:.1f} GiB of RAM for this volume and {free_bytes / GB:.1f} GiB "
                          "is free, too little even in slabs; close other programs, choose a lighter task "
                          "(fastest), crop the volume, or use a GPU")
    return slab


class SafeTask:
    """A ``TaskSegmenter`` for a ``ModelChoice`` that guards memory and falls back on GPU out-of-memory."""

    def __init__(self, choice: ModelChoice, variants: Sequence[Variant] = (), devices: Sequence[DeviceInfo] = (),
                 notify: Notify | None = None, **options) -> None:
        self.notify = notify or (lambda message: None)
        self._options = options
        self._chain = fallback_chain(choice.selection, variants, devices) if choice.selection is not None else []
        self._use(choice)

    def _use(self, choice: ModelChoice) -> None:
        variant = choice.selection.variant if choice.selection is not None else None
        if variant is not None and not variant.original and variant.availability == "built":
            verify_built(variant)  # a built file that changed since is named, never loaded
        elif variant is not None and variant.original and (task := task_of(variant)) is not None:
            known = variant.source.get("sha256") or {}
            for model, folder in zip(task.models, choice.folders, strict=True):
                check_task_model(model, folder, known.get(model.dataset))  # TotalSegmentator's labels and weights
        self.choice = choice
        options = self._options  # a precision form auto chose runs the chosen task, unless the user named one
        if options.get("precision", "auto") == "auto" and choice.precision != "auto":
            options = {**options, "precision": choice.precision}
        self.task = TaskSegmenter(list(choice.folders), name=choice.id, label_maps=choice.label_maps,
                                  device=choice.device, coarse=self._coarse(choice), **options)
        self.segments, self.name = self.task.segments, self.task.name

    def _coarse(self, choice: ModelChoice) -> TaskSegmenter | None:
        """TotalSegmentator's 6 mm model (its ``fastest`` task), when it is installed beside the finer task chosen: it
        finds a structure subset's region before the chosen task segments it (``TaskSegmenter.segment``)."""
        variant = choice.selection.variant if choice.selection is not None else None
        task = task_of(variant) if variant is not None else None
        if task is None or task.name == COARSE_TASK or not choice.folders:
            return None
        coarse = tasks()[COARSE_TASK]
        folders = find_task(coarse, [Path(choice.folders[0]).parent.parent])
        if folders is None:
            return None
        for model, folder in zip(coarse.models, folders, strict=True):
            check_task_model(model, folder, None)  # untrusted like every TotalSegmentator folder
        return TaskSegmenter(folders, name=f"{COARSE_TASK} (locating)", label_maps=coarse.label_maps(),
                             device=choice.device, **self._options)

    def loaded(self) -> list[bool]:
        return self.task.loaded()

    def check_subset(self, subset: Sequence[str] | None) -> None:
        self.task.check_subset(subset)

    def segment(self, volume: Volume | str, progress: Progress | None = None, cancel: Cancel | None = None,
                subset: Sequence[str] | None = None, crop: bool = True) -> SegmentationResult:
        volume = checked_volume(volume)
        while True:
            selection = self.choice.selection
            if selection is not None and self.choice.device == "cpu":
                slab = cpu_slab_voxels(selection.variant, voxels_at(volume, selection.variant.spacing_mm),
                                       system_memory()[1])
                if slab is not None:
                    self.notify(f"not enough free RAM for the whole volume at once: predicting in slabs of "
                                f"{slab / 1e6:.1f} M voxels")
                self.task.max_voxels = slab
            try:
                return self.task.segment(volume, progress, cancel, subset, crop)
            except RuntimeError as error:  # torch.OutOfMemoryError included
                if self.choice.device == "cpu" or not _is_out_of_memory(error):
                    raise
                self._fall_back()

    def _fall_back(self) -> None:
        current = self.choice.selection
        later = self._chain[self._chain.index(current) + 1:] if current in self._chain else []
        if not later:
            raise NotEnoughMemoryError(f"{self.choice.id} ran out of GPU memory and nothing smaller is ready; close other "
                              "GPU programs, use --device cpu, or build a smaller variant (tuckersegment variants)")
        self.task = None  # release the GPU copy before loading the next
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        nxt = later[0]
        self.notify(f"{self.choice.id} ran out of memory on {current.device.name}; retrying with {nxt.reason}")
        self._use(from_selection(nxt))
