"""The Pareto plot's data: which compressed models are compared, and which of them no cheaper one beats."""
from __future__ import annotations

from TuckerSegmentLib.compress.figures import CompressionReview, ModelFigures, pareto_front
from TuckerSegmentLib.variants.user_variants import UserVariant, comparison_points


def test_pareto_front_keeps_each_point_better_than_every_cheaper_one():
    points = [(0.3, 0.7), (0.5, 0.9), (0.4, 0.6), (0.5, 0.8), (1.0, 1.0), (0.2, 0.75), (0.6, 0.85)]
    assert pareto_front(points) == [(0.2, 0.75), (0.5, 0.9), (1.0, 1.0)]
    assert pareto_front([(0.5, 0.8), (0.5, 0.9)]) == [(0.5, 0.9)]  # of equal cost only the best
    assert pareto_front([]) == []


def variant(folder: str, source: str, flops_ratio: float, agreement: float | None) -> UserVariant:
    return UserVariant(id=folder, folder=folder, source=source, policy={}, params=1, flops=1,
                       flops_ratio=flops_ratio, agreement=agreement, time_ratio=None, added="2026-11-29T12:00:00")


def test_comparison_points_are_this_review_the_same_originals_variants_and_the_original(tmp_path):
    review = CompressionReview(source="/models/demo", output="/out/new", policy={}, device="cpu",
                               original=ModelFigures(1000, 400, 4000), compressed=ModelFigures(300, 100, 1200),
                               agreement=0.8)
    mine = [variant("/out/a", "/models/demo", 0.5, 0.9),
            variant("/out/b", "/models/other", 0.2, 0.95),  # another original: not comparable
            variant("/out/c", "/models/demo", 0.3, None),  # agreement never measured
            variant("/out/new", "/models/demo", 0.9, 0.1)]  # this very folder, added before: the review counts
    assert comparison_points(review, mine) == [(0.25, 0.8), (0.5, 0.9), (1.0, 1.0)]
