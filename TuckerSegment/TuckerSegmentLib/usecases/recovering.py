"""Recover accuracy after compression: label-free distillation and fine-tuning on labelled data, each run from its
request."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..image.transfer import read_ct
from ..progress import LayerProgress
from ..recovery.distill import distill_model_folder
from .requests import DistillRequest, FinetuneRequest


def run_distill(request: DistillRequest, progress: LayerProgress | None = None) -> dict[str, Any]:
    """Write ``request.output``: the compressed model distilled from its teacher; the recovery record."""
    return distill_model_folder(request.compressed, request.teacher, [read_ct(p) for p in request.calibration],
                                request.output, iterations=request.iterations, lr=request.lr,
                                temperature=request.temperature, batch_size=request.batch_size,
                                trained=request.trained, device=request.device, fold=request.fold,
                                overwrite=request.overwrite, trust=request.trust_checkpoint, progress=progress)


def run_finetune(request: FinetuneRequest, progress: Callable[[float, str], None] | None = None) -> Any:
    """Write ``request.output``: the compressed model fine-tuned with nnU-Net's trainer; its ``FinetuneReport``."""
    from ..recovery.finetune import finetune_model_folder  # nnU-Net's trainer: imported only for this use case
    return finetune_model_folder(request.compressed, request.dataset, request.output, epochs=request.epochs,
                                 iterations_per_epoch=request.iterations_per_epoch, lr=request.lr,
                                 device=request.device, original=request.original, overwrite=request.overwrite,
                                 progress=progress)
