"""gRefCOCO metrics against hand-made cases and a line-by-line transcription of ReLA's evaluator loop."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shared_ris.generalized_metrics import generalized_ious, summarize_by_target_count, summarize_generalized

# (intersection, union, no_target, decided_no_target)
CASES = [
    (30, 40, False, False),  # target, found: IoU 0.75
    (10, 50, False, True),  # target, decided no-target (FP): I counted 0, U kept
    (0, 20, True, False),  # no target, a 20-pixel mask predicted (FN): IoU 0, adds 20 to U
    (0, 15, True, True),  # no target, decided so (TP): IoU 1, adds nothing
    (90, 100, False, False),  # target: IoU 0.9 exactly, on Pr@0.9's edge
]


def columns(cases):
    return [list(c) for c in zip(*cases)]


def relas_loop(cases):
    """ReLA's ``ReferEvaluator.evaluate`` for one source, transcribed; percentages → fractions."""
    accum_i = accum_u = accum_iou = 0.0
    nt = {"TP": 0, "TN": 0, "FP": 0, "FN": 0}
    pr, total, not_empty = {0.7: 0, 0.8: 0, 0.9: 0}, 0, 0
    for i, u, gt_nt, pred_nt in cases:
        if gt_nt:
            if pred_nt:
                nt["TP"] += 1
                accum_iou += 1
            else:
                nt["FN"] += 1
                accum_u += u
        else:
            if pred_nt:
                nt["FP"] += 1
                i = 0
            else:
                nt["TN"] += 1
            this_iou = 0.0 if u == 0 else i / u
            accum_iou += this_iou
            accum_i += i
            accum_u += u
            not_empty += 1
            for threshold in pr:
                pr[threshold] += this_iou >= threshold
        total += 1
    return {"gIoU": accum_iou / total, "cIoU": accum_i / accum_u, "T-acc": nt["TN"] / (nt["TN"] + nt["FP"]),
            "N-acc": nt["TP"] / (nt["TP"] + nt["FN"]), **{f"Pr@{t:g}": c / not_empty for t, c in pr.items()}}  # fmt: skip


def test_hand_made_case():
    figures = summarize_generalized(*columns(CASES))
    assert figures["gIoU"] == pytest.approx((0.75 + 0 + 0 + 1 + 0.9) / 5)
    assert figures["cIoU"] == pytest.approx((30 + 90) / (40 + 50 + 20 + 100))
    assert figures["N-acc"] == 0.5 and figures["T-acc"] == pytest.approx(2 / 3)
    assert figures["Pr@0.7"] == pytest.approx(2 / 3) and figures["Pr@0.8"] == pytest.approx(1 / 3)
    assert figures["Pr@0.9"] == pytest.approx(1 / 3)  # ≥, as ReLA: 0.9 counts
    assert (figures["n"], figures["n_no_target"]) == (5, 2)


def test_per_expression_rules():
    ious, inter, union = generalized_ious(*columns(CASES))
    assert ious.tolist() == [0.75, 0.0, 0.0, 1.0, 0.9]
    assert inter.tolist() == [30, 0, 0, 0, 90] and union.tolist() == [40, 50, 20, 0, 100]


@pytest.mark.parametrize("seed", range(5))
def test_random_sets_equal_relas_loop(seed):
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(200):
        no_target = bool(rng.random() < 0.3)
        pred, gt = rng.random((8, 8)) < rng.random(), (rng.random((8, 8)) < rng.random()) & (not no_target)
        cases.append((int((pred & gt).sum()), int((pred | gt).sum()), no_target, bool(rng.random() < 0.3)))
    ours, theirs = summarize_generalized(*columns(cases)), relas_loop(cases)
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key


def test_accuracies_without_one_kind_are_nan_not_zero():
    only_targets = summarize_generalized([5], [10], [False], [False])
    assert math.isnan(only_targets["N-acc"]) and only_targets["T-acc"] == 1.0 and only_targets["gIoU"] == 0.5


def test_split_by_target_count():
    inter, union, _, decided = columns(CASES)
    counts = [1, 3, 0, 0, 2]
    groups = summarize_by_target_count(inter, union, counts, decided)
    assert set(groups) == {"all", "0", "1", "2+"}
    assert groups["all"] == summarize_generalized(*columns(CASES))
    assert groups["0"]["gIoU"] == 0.5 and groups["0"]["N-acc"] == 0.5 and math.isnan(groups["0"]["T-acc"])
    assert groups["1"]["gIoU"] == 0.75 and groups["2+"]["gIoU"] == pytest.approx(0.45)
    assert groups["2+"]["T-acc"] == 0.5  # the 3-target expression was decided no-target


def test_lengths_must_agree():
    with pytest.raises(ValueError, match="one intersection"):
        generalized_ious([1, 2], [3], [False], [False])
