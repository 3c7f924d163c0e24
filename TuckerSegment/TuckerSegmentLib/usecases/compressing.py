"""Compress: Tucker ranks or filter pruning, then optionally label-free distillation, then optionally a review
against the original: what a ``CompressRequest`` asks, composed here once for the CLI, the worker and scripts."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import check_output_dir, path_inputs
from ..compress.figures import CompressionReview
from ..compress.folder import model_writer
from ..compress.review import review_compression
from ..image.transfer import as_volume, read_ct
from ..image.volume import Volume
from ..nnunet.layout import model_inputs
from ..policies.base import RankPolicy
from ..policies.methods import method, policy_for
from ..progress import LayerProgress, Progress
from ..recovery.compress_distill import compress_and_distill, content_digest
from ..runtime.devices import resolve_device
from ..runtime.inference import choose_runtime
from .requests import CompressRequest

Say = Callable[[str], None]


@dataclass
class CompressOutcome:
    """Per fold its compression or pruning report (``None`` when an interrupted distillation's compressed model was
    reused), the distillation's recovery record, and the review when asked for."""

    reports: dict[str, Any] | None
    recovery: dict[str, Any] | None = None
    review: CompressionReview | None = None


def rank_policy(request: CompressRequest) -> RankPolicy | None:
    """The Tucker rank policy ``request`` asks for; ``None`` for a pruning method."""
    if request.prunes:
        return None
    return policy_for(request.policy, request.target, device=request.device, runtime=request.runtime,
                      rank_min=request.rank_min)


def run_compress(request: CompressRequest, layers: LayerProgress | None = None,
                 distilling: LayerProgress | None = None, say: Say | None = None,
                 reviewing: Progress | None = None) -> CompressOutcome:
    """Write ``request.output`` whole, as ``request`` asks; ``layers`` hears each layer (or pruning trial),
    ``distilling`` each distillation step, ``say`` the stages, ``reviewing`` the review's progress."""
    choose_runtime(request.runtime, "auto", resolve_device(request.device))  # refused before anything is written
    output = check_output_dir(Path(request.output).expanduser(), request.overwrite,
                              [*model_inputs("model folder", request.source),
                               *path_inputs("calibration CT", request.calibration),
                               *path_inputs("label map", request.labels)])
    cts = [read_ct(path) for path in request.calibration]
    policy = rank_policy(request)
    settings = _settings(request, policy) if request.distill else {}  # what a resumed distillation must match
    outcome = CompressOutcome(*compress_and_distill(
        _writer(request, policy, cts, layers), request.source, output, cts or None, request.distill, settings,
        device=request.device, fold=request.folds[0], configuration=request.configuration, overwrite=request.overwrite,
        trust=request.trust_checkpoint, progress=distilling, say=say, inputs=path_inputs("label map", request.labels)))
    if request.review:
        volumes = [as_volume(ct) for ct in cts]
        outcome.review = review_compression(request.source, output, volumes, request.device, request.measure,
                                            reviewing, runtime=request.runtime)
    return outcome


def _writer(request: CompressRequest, policy: RankPolicy | None, cts: list[Volume | Path],
            layers: LayerProgress | None) -> Callable[[Path], dict[str, Any]]:
    """``write(folder)``: the compressed or pruned model of ``request`` into ``folder``."""
    chosen = method(request.policy)
    # prune-l1/fpgm rank filters by their weights alone: the CTs then are for distillation and the review only
    data = cts if not chosen.prunes or chosen.needs_labels or not (request.distill or request.review) else []
    return model_writer(request.source, policy or chosen.criterion, data or None, request.target,
                        labels=list(request.labels) or None, weight_only=request.weight_only, folds=request.folds,
                        configuration=request.configuration, trust=request.trust_checkpoint,
                        overwrite=request.overwrite, progress=layers)


def _settings(request: CompressRequest, policy: RankPolicy | None) -> dict[str, Any]:
    """What decides the compressed model a distillation starts from (a rerun with other settings starts over)."""
    return {"method": request.policy, "policy": None if policy is None else policy.to_dict(),
            "target": request.target, "weight_only": request.weight_only, "configuration": request.configuration,
            "labels": [content_digest(path) for path in request.labels]}
