"""Metrics on hand-built cases: every figure below is computed by hand."""

import numpy as np
import pytest
import torch

from shared_ris.metrics import MetricAccumulator, intersection_union, iou_by_size, sample_ious, summarize


def masks(*rows: str) -> torch.Tensor:
    """Masks drawn as text: '#' is foreground."""
    return torch.tensor([[c == "#" for c in row] for row in rows])


def test_perfect_prediction():
    target = masks("##..", "##..")
    assert intersection_union(target, target) == (4, 4)
    assert summarize([4], [4]) == {"oIoU": 1.0, "mIoU": 1.0, "P@0.5": 1.0, "P@0.7": 1.0, "P@0.9": 1.0, "n": 1}


def test_empty_prediction_scores_zero():
    target = masks("##..", "....")
    inter, union = intersection_union(torch.zeros_like(target), target)
    assert (inter, union) == (0, 2)
    stats = summarize([inter], [union])
    assert stats["oIoU"] == stats["mIoU"] == stats["P@0.5"] == 0.0


def test_disjoint_masks_score_zero():
    assert intersection_union(masks("#...", "...."), masks("....", "...#")) == (0, 2)
    assert summarize([0], [2])["mIoU"] == 0.0


def test_empty_union_counts_as_a_perfect_match():
    empty = masks("....", "....")
    assert intersection_union(empty, empty) == (0, 0)
    assert sample_ious(np.array([0]), np.array([0])).tolist() == [1.0]
    assert summarize([0], [0]) == {"oIoU": 1.0, "mIoU": 1.0, "P@0.5": 1.0, "P@0.7": 1.0, "P@0.9": 1.0, "n": 1}
    # beside other samples it adds nothing to oIoU's sums but a 1.0 to mIoU's mean
    stats = summarize([1, 0], [4, 0])
    assert stats["oIoU"] == 0.25 and stats["mIoU"] == pytest.approx((0.25 + 1.0) / 2)


def test_differing_sizes_are_an_error():
    with pytest.raises(ValueError, match="differ in size"):
        intersection_union(torch.zeros(4, 5, dtype=torch.bool), torch.zeros(5, 4, dtype=torch.bool))


def test_no_samples():
    assert summarize([], []) == {"oIoU": 0.0, "mIoU": 0.0, "P@0.5": 0.0, "P@0.7": 0.0, "P@0.9": 0.0, "n": 0}


def test_oiou_weights_pixels_miou_weights_expressions():
    # A big object found well (I=90, U=100) and a small one missed (I=1, U=10):
    # oIoU = 91 / 110, mIoU = (0.9 + 0.1) / 2 = 0.5.
    stats = summarize([90, 1], [100, 10])
    assert stats["oIoU"] == pytest.approx(91 / 110)
    assert stats["mIoU"] == pytest.approx(0.5)
    assert stats["oIoU"] != pytest.approx(stats["mIoU"])
    assert (stats["P@0.5"], stats["P@0.7"], stats["P@0.9"]) == (0.5, 0.5, 0.0)  # 0.9 is not > 0.9


def test_precision_strict_vs_inclusive_at_the_boundary():
    # IoUs exactly 0.5, 0.7 and 0.9: strict (>) counts none at its own threshold, inclusive (>=) counts them.
    inter, union = [5, 7, 9], [10, 10, 10]
    strict = summarize(inter, union)
    inclusive = summarize(inter, union, inclusive=True)
    assert (strict["P@0.5"], strict["P@0.7"], strict["P@0.9"]) == (pytest.approx(2 / 3), pytest.approx(1 / 3), 0.0)
    assert (inclusive["P@0.5"], inclusive["P@0.7"], inclusive["P@0.9"]) == (1.0, pytest.approx(2 / 3), pytest.approx(1 / 3))


def test_iou_by_size_bins_on_target_area_ratio():
    # ratios 0.01, 0.04 (bin 0-5%), 0.15 (10-20%), 1.0 (last bin, closed on the right)
    rows = iou_by_size([1, 3, 10, 50], [2, 4, 20, 100], [1, 4, 15, 100], [100, 100, 100, 100])
    by_lo = {row["lo"]: row for row in rows}
    assert by_lo[0.0]["n"] == 2 and by_lo[0.0]["mIoU"] == pytest.approx((0.5 + 0.75) / 2) and by_lo[0.0]["oIoU"] == pytest.approx(4 / 6)
    assert by_lo[0.1]["n"] == 1 and by_lo[0.1]["mIoU"] == 0.5
    assert by_lo[0.5]["n"] == 1 and by_lo[0.5]["oIoU"] == 0.5
    assert sum(row["n"] for row in rows) == 4


def test_accumulator_records_merge_in_key_order():
    a, b = MetricAccumulator(), MetricAccumulator()
    a.add("img2_0", masks("##", ".."), masks("#.", ".."))
    b.add("img1_0", masks("..", ".."), masks("..", "##"))
    merged = MetricAccumulator.from_records(b.records() + a.records())
    single = MetricAccumulator.from_records(a.records() + b.records())
    assert merged.keys == ["img1_0", "img2_0"] and merged.summary() == single.summary()
    assert merged.summary()["oIoU"] == pytest.approx(1 / 4)  # (0 + 1) / (2 + 2)
