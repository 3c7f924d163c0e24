"""Defaults and limits that the requests, the entry points and the engine share, each defined here once
(importable without torch, so Slicer's panel shows the same numbers the worker uses)."""
from __future__ import annotations

from typing import Any

from .errors import RecoveryError, TaskError

TILE_STEP = 0.8  # sliding-window step as a fraction of the patch, as TotalSegmentator runs nnU-Net
MIN_TILE_STEP = 0.25  # 8x the tiles of nnU-Net's 0.5 already; 1e-9 was accepted and never finished
RANK_MIN = 8  # the uniform rule's smallest rank of any factor

DISTILL_ITERATIONS = 200  # distil: training iterations (decided on the demo model, docs/recovery.md)
DISTILL_LR = 1e-4
DISTILL_TRAINED = ("auto", "factorised", "all")  # which parameters distillation trains
# the most training iterations a distillation or fine-tuning asks for (the panel's spin box too): about a day at
# one second per iteration; 10^12 was accepted and could never finish
MAX_TRAINING_ITERATIONS = 100_000
TRAINING_LIMIT = "about a day at a second an iteration"

FINETUNE_EPOCHS = 50  # as the Tucker paper
FINETUNE_ITERATIONS_PER_EPOCH = 250  # nnU-Net's
FINETUNE_LR = 1e-5


def check_tile_step(tile_step: Any) -> float:
    """``tile_step`` as nnU-Net's sliding window takes it: a fraction of the patch in [MIN_TILE_STEP, 1]."""
    if isinstance(tile_step, bool) or not isinstance(tile_step, (int, float)) or not MIN_TILE_STEP <= tile_step <= 1:
        raise TaskError(f"tile step {tile_step!r} is outside [{MIN_TILE_STEP}, 1]: it is the sliding-window step as a "
                        "fraction of the patch (0.5 is nnU-Net's default, 0.8 TotalSegmentator's; a smaller step "
                        "multiplies the tiles by its cube and would not finish)")
    return float(tile_step)


def distill_iterations(value: Any) -> int:
    """``value`` as a number of distillation iterations after compression (0: none), or a one-line refusal."""
    import numbers
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value <= MAX_TRAINING_ITERATIONS:
        raise RecoveryError(f"distillation takes a whole number of iterations from 0 (none) to {MAX_TRAINING_ITERATIONS} "
                            f"({TRAINING_LIMIT}), not {value!r}")
    return int(value)
