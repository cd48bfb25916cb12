"""``sris prepare refcoco|refcoco+|refcocog|refcoco-combined``: refer files → shards + manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from .errors import DataError
from .refer import (
    DEFAULT_SPLIT_BY,
    check_images_dir,
    instances_file,
    load_instances,
    load_refs,
    make_refer_sample,
    ref_item,
    refs_file,
)
from .shards import DEFAULT_SHARD_SIZE, Progress, write_dataset

SPLIT_ORDER = ("train", "val", "test", "testA", "testB")
COMBINED = "refcoco-combined"
# What the combined set trains on, and whose val/test images it must never see (the paper's
# evaluation protocols: RefCOCO/+ unc, RefCOCOg umd and google).
COMBINED_TRAIN = (("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd"))
COMBINED_HELD_OUT = (("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd"), ("refcocog", "google"))


def _ordered(names: Iterable[str]) -> list[str]:
    return sorted(set(names), key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else len(SPLIT_ORDER), s))


def _choose_splits(available: list[str], wanted: Iterable[str] | None, what: str) -> list[str]:
    if wanted is None:
        return available
    wanted = [s.strip() for s in (wanted.split(",") if isinstance(wanted, str) else wanted) if s.strip()]
    unknown = [s for s in wanted if s not in available]
    if unknown or not wanted:
        raise DataError(f"{what} has splits {', '.join(available)}; got '{','.join(unknown) or ''}' in --splits")
    return [s for s in available if s in wanted]


def _items_by_split(refs: list[dict], dataset: str, images: dict, anns: dict, images_dir: Path, splits: list[str], limit: int | None) -> dict[str, list[dict]]:
    by_split: dict[str, list[dict]] = {s: [] for s in splits}
    for ref in sorted(refs, key=lambda r: r["ref_id"]):
        if ref["split"] in by_split and (limit is None or len(by_split[ref["split"]]) < limit):
            by_split[ref["split"]].append(ref_item(ref, dataset, images, anns, images_dir))
    return by_split


def prepare_refer(
    dataset: str,
    refer_root: str | Path,
    images_dir: str | Path,
    out_dir: str | Path,
    split_by: str | None = None,
    splits: Iterable[str] | str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: int | None = None,
    limit: int | None = None,
    strict: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict:
    """Convert a refer dataset to shards; return the manifest.

    Args:
        dataset: ``refcoco``, ``refcoco+``, ``refcocog``, or ``refcoco-combined`` (see :func:`combined_items`).
        refer_root: the refer API ``data/`` folder (``{dataset}/refs({split_by}).p``, ``{dataset}/instances.json``).
        images_dir: COCO ``train2014/``.
        out_dir: where ``{dataset}-{split}-{NNNNNN}.tar`` and ``manifest.json`` go.
        split_by: ``unc`` / ``umd`` / ``google``; default unc for RefCOCO/+, umd for RefCOCOg (fixed
            for the combined set).
        splits: a subset such as ``["val", "testA"]`` (or ``"val,testA"``); default all in the file.
        shard_size: refs per shard. workers: processes writing shards (default: the CPU count, at most 8).
        limit: keep only the first N refs (by ref_id) of each split, for quick trials.
        strict: fail on the first skipped item instead of counting it.
        overwrite: rebuild instead of resuming from the finished shards.
        progress: called as ``progress(done_refs, total_refs)``.
    """
    if dataset == COMBINED:
        if split_by is not None:
            raise DataError(f"{COMBINED} reads RefCOCO/+ (unc) and RefCOCOg (umd); drop --split-by")
        items, config, sources, extra = combined_items(refer_root, images_dir, splits, limit)
    else:
        items, config, sources = refer_items(dataset, refer_root, images_dir, split_by, splits, limit)
        extra = None
    return write_dataset(
        dataset, out_dir, items, make_refer_sample, config={**config, "shard_size": shard_size}, sources=sources,
        shard_size=shard_size, workers=workers, strict=strict, overwrite=overwrite, progress=progress, extra=extra,
    )


def refer_items(dataset: str, refer_root, images_dir, split_by: str | None, splits, limit: int | None) -> tuple[dict, dict, dict]:
    """One refer dataset → (items by split, config, sources)."""
    split_by = split_by or DEFAULT_SPLIT_BY.get(dataset)
    refs_path = refs_file(refer_root, dataset, split_by)
    instances_path = instances_file(refer_root, dataset)
    images_root = check_images_dir(images_dir)
    refs = load_refs(refs_path)
    chosen = _choose_splits(_ordered(r["split"] for r in refs), splits, f"{refs_path}")
    images, anns = load_instances(instances_path)
    items = _items_by_split(refs, dataset, images, anns, images_root, chosen, limit)
    config = {"dataset": dataset, "split_by": split_by, "splits": chosen, "limit": limit}
    sources = {"refs": str(refs_path.resolve()), "instances": str(instances_path.resolve()), "images": str(images_root.resolve())}
    return items, config, sources


def held_out_images(refer_root: str | Path) -> tuple[set[int], list[str]]:
    """Image ids of every non-train ref in the evaluation protocols' refs files that exist."""
    held: set[int] = set()
    used: list[str] = []
    for dataset, split_by in COMBINED_HELD_OUT:
        path = Path(refer_root) / dataset / f"refs({split_by}).p"
        if path.is_file():
            held.update(r["image_id"] for r in load_refs(path) if r["split"] != "train")
            used.append(str(path.resolve()))
    return held, used


def combined_items(refer_root, images_dir, splits, limit: int | None) -> tuple[dict, dict, dict, dict]:
    """The union of RefCOCO (unc), RefCOCO+ (unc) and RefCOCOg (umd), as the paper's †/‡ rows →
    (items by split, config, sources, extra manifest entries).

    Every image that appears in any val/test split of RefCOCO/+ (unc) or RefCOCOg (umd, google) is
    dropped from ``train``; the manifest's ``excluded_images`` / ``excluded_refs`` say how many.
    Evaluation splits are written as ``{dataset}-{split}`` (``refcoco-val``, ``refcocog-test``, ...);
    default: ``train,refcoco-val,refcoco+-val,refcocog-val``.
    """
    images_root = check_images_dir(images_dir)
    held, held_sources = held_out_images(refer_root)
    loaded = []
    for dataset, split_by in COMBINED_TRAIN:
        refs_path, instances_path = refs_file(refer_root, dataset, split_by), instances_file(refer_root, dataset)
        loaded.append((dataset, refs_path, instances_path, load_refs(refs_path)))
    available = ["train"] + [f"{d}-{s}" for d, _, _, refs in loaded for s in _ordered(r["split"] for r in refs) if s != "train"]
    chosen = _choose_splits(available, splits if splits is not None else ["train", "refcoco-val", "refcoco+-val", "refcocog-val"], COMBINED)
    by_split: dict[str, list[dict]] = {s: [] for s in chosen}
    excluded_refs, excluded_images = 0, set()
    for dataset, refs_path, instances_path, refs in loaded:
        wanted = [s for s in _ordered(r["split"] for r in refs) if s == "train" and "train" in chosen or f"{dataset}-{s}" in chosen]
        if not wanted:
            continue
        images, anns = load_instances(instances_path)
        for split, items in _items_by_split(refs, dataset, images, anns, images_root, wanted, None).items():
            if split == "train":
                kept = [it for it in items if it["image_id"] not in held]
                excluded_refs += len(items) - len(kept)
                excluded_images.update(it["image_id"] for it in items if it["image_id"] in held)
                by_split["train"] += kept
            else:
                by_split[f"{dataset}-{split}"] = items
    if limit is not None:
        by_split = {s: items[:limit] for s, items in by_split.items()}
    config = {"dataset": COMBINED, "splits": chosen, "limit": limit}
    sources = {
        "refs": [str(p.resolve()) for _, p, _, _ in loaded],
        "instances": [str(p.resolve()) for _, _, p, _ in loaded],
        "held_out_from": held_sources,
        "images": str(images_root.resolve()),
    }
    return by_split, config, sources, {"excluded_images": len(excluded_images), "excluded_refs": excluded_refs}
