"""RIS metrics as pure functions of per-expression intersections and unions (sec. IV-B).

oIoU = Σ intersection / Σ union over all expressions; mIoU = mean per-expression IoU;
P@X = share of expressions with IoU > X (or ≥ X with ``inclusive=True``, LAVT's convention).
An expression whose prediction and target are both empty (union 0) counts as IoU ``empty_iou``:
1 by default (a correct "nothing there"), 0 under LAVT's protocol (its ``test.py`` sets IoU 0 when U = 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .generalized_metrics import summarize_by_target_count

PRECISION_THRESHOLDS = (0.5, 0.7, 0.9)
# Target area / image area bins of the paper's Fig. 6.
SIZE_BINS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)


def intersection_union(pred: torch.Tensor, target: torch.Tensor) -> tuple[int, int]:
    """Pixel counts of pred ∧ target and pred ∨ target for two boolean masks of one shape."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in size")
    pred, target = pred.bool(), target.bool()
    return int((pred & target).sum()), int((pred | target).sum())


def sample_ious(intersections: np.ndarray, unions: np.ndarray, empty_iou: float = 1.0) -> np.ndarray:
    """Per-expression IoU (float64); ``empty_iou`` where the union is empty."""
    intersections = np.asarray(intersections, dtype=np.float64)
    unions = np.asarray(unions, dtype=np.float64)
    return np.where(unions > 0, intersections / np.maximum(unions, 1), float(empty_iou))


def summarize(
    intersections: np.ndarray,
    unions: np.ndarray,
    thresholds: tuple[float, ...] = PRECISION_THRESHOLDS,
    inclusive: bool = False,
    empty_iou: float = 1.0,
) -> dict[str, float | int]:
    """{"oIoU", "mIoU", "P@0.5", "P@0.7", "P@0.9", "n"}, IoUs as fractions in [0, 1]; an empty union
    counts ``empty_iou`` (oIoU too, when every union of the set is empty)."""
    intersections = np.asarray(intersections, dtype=np.int64)
    unions = np.asarray(unions, dtype=np.int64)
    n = int(intersections.size)
    if n == 0:
        return {"oIoU": 0.0, "mIoU": 0.0, **{f"P@{t}": 0.0 for t in thresholds}, "n": 0}
    ious = sample_ious(intersections, unions, empty_iou)
    total_union = int(unions.sum())
    out: dict[str, float | int] = {
        "oIoU": float(intersections.sum() / total_union) if total_union else float(empty_iou),
        "mIoU": float(ious.mean()),
    }
    for t in thresholds:
        hits = ious >= t if inclusive else ious > t
        out[f"P@{t}"] = float(hits.mean())
    out["n"] = n
    return out


def iou_by_size(
    intersections: np.ndarray,
    unions: np.ndarray,
    target_areas: np.ndarray,
    image_areas: np.ndarray,
    bins: tuple[float, ...] = SIZE_BINS,
    empty_iou: float = 1.0,
) -> list[dict[str, float | int]]:
    """mIoU and oIoU per bin of target area / image area (Fig. 6). Bins are [lo, hi), the last closed."""
    ratio = np.asarray(target_areas, dtype=np.float64) / np.maximum(np.asarray(image_areas, dtype=np.float64), 1)
    intersections = np.asarray(intersections, dtype=np.int64)
    unions = np.asarray(unions, dtype=np.int64)
    rows = []
    for i, (lo, hi) in enumerate(zip(bins[:-1], bins[1:])):
        last = i == len(bins) - 2
        sel = (ratio >= lo) & ((ratio <= hi) if last else (ratio < hi))
        stats = summarize(intersections[sel], unions[sel], empty_iou=empty_iou)
        rows.append({"lo": lo, "hi": hi, "n": stats["n"], "mIoU": stats["mIoU"], "oIoU": stats["oIoU"]})
    return rows


@dataclass
class MetricAccumulator:
    """Collects one record per expression; records are exact integers, so merging the records of
    several ranks (sorted by key) reproduces the single-process figures to the last digit.

    For generalized RIS each record also keeps the decision "names nothing" and the target count;
    the plain figures score the mask as emptied by that decision, the generalized ones (ReLA's
    rules, :mod:`.generalized_metrics`) take the mask as predicted with the decision beside it.
    """

    keys: list[str] = field(default_factory=list)
    intersections: list[int] = field(default_factory=list)
    unions: list[int] = field(default_factory=list)
    target_areas: list[int] = field(default_factory=list)
    image_areas: list[int] = field(default_factory=list)
    raw_intersections: list[int] = field(default_factory=list)  # of the mask before a no-target decision emptied it
    raw_unions: list[int] = field(default_factory=list)
    decided_no_target: list[bool] = field(default_factory=list)
    target_counts: list[int] = field(default_factory=list)

    def add(self, key: str, pred: torch.Tensor, target: torch.Tensor, decided_no_target: bool = False, target_count: int = 1) -> tuple[int, int]:
        """Add one expression: pred (as predicted) and target are boolean masks at the scoring
        resolution; ``decided_no_target`` empties pred for the plain figures. Returns the scored (I, U)."""
        inter, union = intersection_union(pred, target)
        target_area = int(target.bool().sum())
        self._append((key, *((0, target_area) if decided_no_target else (inter, union)), target_area, int(target.numel()),
                      inter, union, bool(decided_no_target), int(target_count)))  # fmt: skip
        return self.intersections[-1], self.unions[-1]

    def _append(self, record: tuple) -> None:
        for column, value in zip(self._columns(), record):
            column.append(value)

    def _columns(self) -> tuple[list, ...]:
        return (self.keys, self.intersections, self.unions, self.target_areas, self.image_areas,
                self.raw_intersections, self.raw_unions, self.decided_no_target, self.target_counts)  # fmt: skip

    def records(self) -> list[tuple]:
        return list(zip(*self._columns()))

    @classmethod
    def from_records(cls, records: list[tuple]) -> "MetricAccumulator":
        acc = cls()
        for record in sorted(records):
            acc._append(record)
        return acc

    def summary(
        self, thresholds: tuple[float, ...] = PRECISION_THRESHOLDS, inclusive: bool = False, empty_iou: float = 1.0, generalized: bool = False
    ) -> dict:
        """The plain figures and ``by_size``; with ``generalized``, also ``"generalized"``: gIoU,
        cIoU, N-acc, T-acc, Pr@X over all expressions and by target count ("0", "1", "2+")."""
        out = summarize(np.array(self.intersections), np.array(self.unions), thresholds, inclusive, empty_iou)
        out["by_size"] = iou_by_size(
            np.array(self.intersections), np.array(self.unions), np.array(self.target_areas), np.array(self.image_areas),
            empty_iou=empty_iou,
        )
        if generalized:
            out["generalized"] = summarize_by_target_count(self.raw_intersections, self.raw_unions, self.target_counts, self.decided_no_target)
        return out
