"""Generalized RIS metrics (gRefCOCO: expressions with one target, several, or none), as ReLA's
evaluator computes them (``gres_model/evaluation/refer_evaluation.py``, ``ReferEvaluator.evaluate``).

Each expression brings the intersection and union of the predicted mask with its target (the union
of its objects; empty for a no-target expression), whether it has no target, and whether the model
decided "no target". Then:

- no-target expression decided no-target (TP): IoU 1, adds 0 to ΣI and ΣU;
- no-target expression not decided (FN): IoU 0, adds its predicted area (its union) to ΣU;
- target expression decided no-target (FP): intersection counted as 0, union kept, IoU 0;
- target expression not decided (TN): IoU = I / U (0 when U = 0), as plain RIS.

gIoU = mean IoU over all expressions, cIoU = ΣI / ΣU, N-acc = TP / (TP + FN), T-acc = TN / (TN + FP),
Pr@X = share of target expressions with IoU ≥ X. As ReLA, the union of a target expression decided
no-target is that of the mask the model produced, not of an emptied one; the accuracies are ``nan``
when a set has no no-target (or no target) expression, where ReLA reports 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

GENERALIZED_THRESHOLDS = (0.7, 0.8, 0.9)


def generalized_ious(
    intersections: Sequence[int], unions: Sequence[int], no_target: Sequence[bool], decided_no_target: Sequence[bool]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-expression (IoU, counted intersection, counted union) under ReLA's rules (float64)."""
    inter, union = np.asarray(intersections, np.float64), np.asarray(unions, np.float64)
    empty, decided = np.asarray(no_target, bool), np.asarray(decided_no_target, bool)
    if not (len(inter) == len(union) == len(empty) == len(decided)):
        raise ValueError("one intersection, union, no_target and decided_no_target per expression")
    counted_inter = np.where(empty | decided, 0.0, inter)  # a no-target target is empty; an FP's I is 0
    counted_union = np.where(empty & decided, 0.0, union)  # a TP adds nothing; an FN adds its predicted area
    target_iou = np.where(counted_union > 0, counted_inter / np.maximum(counted_union, 1), 0.0)
    ious = np.where(empty, decided.astype(np.float64), target_iou)
    return ious, counted_inter, counted_union


def summarize_generalized(
    intersections: Sequence[int],
    unions: Sequence[int],
    no_target: Sequence[bool],
    decided_no_target: Sequence[bool],
    thresholds: tuple[float, ...] = GENERALIZED_THRESHOLDS,
) -> dict[str, float]:
    """gIoU, cIoU, N-acc, T-acc and Pr@X (fractions, not percentages) plus the expression counts."""
    ious, inter, union = generalized_ious(intersections, unions, no_target, decided_no_target)
    empty, decided = np.asarray(no_target, bool), np.asarray(decided_no_target, bool)
    target_ious = ious[~empty]
    figures = {
        "gIoU": float(ious.mean()) if len(ious) else float("nan"),
        "cIoU": float(inter.sum() / union.sum()) if union.sum() > 0 else float("nan"),
        "N-acc": _share(decided[empty]),
        "T-acc": _share(~decided[~empty]),
    }
    for threshold in thresholds:
        figures[f"Pr@{threshold:g}"] = _share(target_ious >= threshold)
    figures.update({"n": int(len(ious)), "n_no_target": int(empty.sum())})
    return figures


def summarize_by_target_count(
    intersections: Sequence[int], unions: Sequence[int], target_counts: Sequence[int], decided_no_target: Sequence[bool]
) -> dict[str, dict[str, float]]:
    """:func:`summarize_generalized` over all expressions and per target count ("0", "1", "2+")."""
    counts = np.asarray(target_counts, np.int64)
    columns = (np.asarray(intersections), np.asarray(unions), counts == 0, np.asarray(decided_no_target, bool))
    groups = {"all": np.ones(len(counts), bool), "0": counts == 0, "1": counts == 1, "2+": counts >= 2}
    return {name: summarize_generalized(*(c[keep] for c in columns)) for name, keep in groups.items() if keep.any()}


def _share(hits: np.ndarray) -> float:
    return float(hits.mean()) if len(hits) else float("nan")
