"""Build catalogue variants from TotalSegmentator weights into the user cache, from a ``BuildRequest``: which
variants, calibrated and scored on which CTs, measured where."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PolicyError, TuckerSegmentError
from ..image.transfer import as_volume, read_ct
from ..runtime.hardware import detect_devices
from ..variants.build import build_variant, weight_only
from ..variants.catalogue import BUILDABLE, Variant, catalogue, find_variant
from ..variants.choice import usable_devices
from ..variants.measure import MeasurementPlan, plan_measurement
from .requests import BuildRequest

Say = Callable[[str], None]


@dataclass
class BuildOutcome:
    """Built variants (id -> folder), those not built and why, and those left out (id -> reason)."""

    built: dict[str, Path] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def build_targets(request: BuildRequest, variants: Sequence[Variant]) -> tuple[list[Variant], dict[str, str]]:
    """The variants ``request`` builds (by id; else each task's default-policy variants whose source weights are
    here or can be downloaded) and those it leaves out, with the reason."""
    if request.variants:
        return [find_variant(list(variants), v) for v in request.variants], {}
    candidates = [v for v in variants if not v.original and not v.bundled and not weight_only(v)
                  and (request.task is None or v.task == request.task)]
    chosen = [v for v in candidates if v.availability in BUILDABLE]
    if not chosen:
        raise TuckerSegmentError(f"nothing to build: {candidates[0].detail}" if candidates else "nothing to build")
    return chosen, {v.id: v.detail for v in candidates if v not in chosen}


def measurement_plan(request: BuildRequest) -> MeasurementPlan | None:
    """How the request's CTs calibrate and score the builds (``None``: as each was built, or the sample CT)."""
    if not request.calibration:
        return None
    paths = [*request.calibration, *request.holdout]
    cts = ([(name, as_volume(read_ct(path))) for name, path in zip(request.names, paths, strict=True)]
           if request.names else paths)
    return plan_measurement(cts[:len(request.calibration)], cts[len(request.calibration):])


def run_build(request: BuildRequest, say: Say = lambda message: None,
              starting: Callable[[int, int, Variant], None] | None = None,
              skipping: Callable[[str, str], None] | None = None) -> BuildOutcome:
    """Build every variant ``request`` names, one after the other; a variant whose policy cannot be met here (e.g.
    a latency target) is reported in ``failed`` and the others go on. ``skipping(id, reason)`` hears, before any
    build, of each default variant left out; ``starting(index, count, variant)`` of each one as it begins."""
    roots = [Path(request.weights)] if request.weights else None
    chosen, skipped = build_targets(request, catalogue(weights_roots=roots))
    for variant_id, reason in skipped.items():
        if skipping is not None:
            skipping(variant_id, reason)
    plan = measurement_plan(request)
    device = usable_devices(request.device, detect_devices())[0]
    outcome = BuildOutcome(skipped=skipped)
    for index, variant in enumerate(chosen):
        if starting is not None:
            starting(index, len(chosen), variant)
        if variant.original or variant.bundled:
            continue
        try:
            outcome.built[variant.id] = build_variant(variant, weights_roots=roots, report=say, plan=plan,
                                                      device=device, measure=request.measure,
                                                      distill=request.distill, download=roots is None,
                                                      precisions=None if request.precisions is None else
                                                      [p for p in request.precisions if p != "f32"])
        except PolicyError as exc:
            outcome.failed[variant.id] = str(exc)
    return outcome
