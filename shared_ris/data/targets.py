"""What a sample's expressions refer to: one object (RefCOCO), several or none (gRefCOCO).

A generalized sample's JSON carries ``"target_count"``: how many objects its expressions name
(0 for a no-target expression, whose mask is empty). Samples without the key are classic RIS
refs of one object. An empty mask is something to learn from only when it is the answer, i.e. for
a no-target sample; a classic ref whose mask came out empty is kept for scoring, not trained on.
"""

from __future__ import annotations

from typing import Any

from .errors import short_repr

TARGET_GROUPS = ("0", "1", "2+")  # how generalized figures and counts are split


def target_count(meta: dict) -> int:
    """The number of objects the sample's expressions name (1 when the JSON does not say)."""
    count = meta.get("target_count", 1)
    return count if _is_count(count) else 1


def is_no_target(meta: dict) -> bool:
    return meta.get("target_count") == 0 and _is_count(meta.get("target_count"))


def mask_is_learnable(meta: dict) -> bool:
    """False for an empty mask that is not a no-target answer (see the module docstring)."""
    return meta.get("empty_mask") is not True or is_no_target(meta)


def target_group(count: int) -> str:
    """0 → "0", 1 → "1", 2 and more → "2+"."""
    return TARGET_GROUPS[min(count, 2)]


def target_count_problem(meta: dict) -> str | None:
    """Why a sample's ``target_count`` is unusable, or None (absent counts as 1)."""
    if "target_count" not in meta:
        return None
    count = meta["target_count"]
    if not _is_count(count):
        return f"'target_count' must be a non-negative integer, got {short_repr(count)}"
    if count == 0 and meta.get("empty_mask") is not True:
        return "'target_count' is 0 (no target) but 'empty_mask' is not true: a no-target sample's mask is empty"
    return None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
