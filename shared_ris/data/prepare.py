"""``sris prepare refcoco|refcoco+|refcocog|refcoco-combined``: refer files (or the Hugging Face
parquet copies) → shards + manifest, and the standard per-split counts to check them against."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from .errors import DataError
from .grefcoco import DATASET as GREFCOCO
from .grefcoco import gref_item, load_grefcoco
from .parquet import SPLIT_BY as PARQUET_SPLIT_BY
from .parquet import load_parquet
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
# 2: every ref and sentence kept, empty texts and empty masks flagged (before: dropped). In the
# settings a resume must match, so a folder of the older format is never completed in the new one.
SHARD_FORMAT = 2


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


def _items_by_split(refs: list[dict], splits: list[str], limit: int | None, to_item: Callable[[dict], dict]) -> dict[str, list[dict]]:
    """The refs of each chosen split (the first ``limit`` by ref_id) as items."""
    by_split: dict[str, list[dict]] = {s: [] for s in splits}
    for ref in sorted(refs, key=lambda r: r["ref_id"]):
        if ref["split"] in by_split and (limit is None or len(by_split[ref["split"]]) < limit):
            by_split[ref["split"]].append(to_item(ref))
    return by_split


def _refer_items(refs, splits, limit, dataset: str, images: dict, anns: dict, images_dir: Path) -> dict[str, list[dict]]:
    return _items_by_split(refs, splits, limit, lambda ref: ref_item(ref, dataset, images, anns, images_dir))


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
    route: str = "refer",
) -> dict:
    """Convert a refer dataset to shards; return the manifest.

    Args:
        dataset: ``refcoco``, ``refcoco+``, ``refcocog``, ``refcoco-combined`` (see :func:`combined_items`),
            or ``grefcoco`` (``grefcoco/grefs(unc).json``; see :mod:`.grefcoco`).
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
        route: ``"refer"`` (``refer_root`` is the refer API folder) or ``"parquet"`` (``refer_root``
            is a folder of the Hugging Face copies, see :func:`prepare_parquet`).
    """
    if route == "parquet":
        items, config, sources = _parquet_items(dataset, refer_root, images_dir, split_by, splits, limit)
        return _write(dataset, out_dir, items, config, sources, shard_size, workers, strict, overwrite, progress, None)
    if dataset == GREFCOCO:
        items, config, sources = grefcoco_items(refer_root, images_dir, split_by, splits, limit)
        return _write(dataset, out_dir, items, config, sources, shard_size, workers, strict, overwrite, progress, {"generalized": True})
    if dataset == COMBINED:
        if split_by is not None:
            raise DataError(f"{COMBINED} reads RefCOCO/+ (unc) and RefCOCOg (umd); drop --split-by")
        items, config, sources, extra = combined_items(refer_root, images_dir, splits, limit)
    else:
        items, config, sources = refer_items(dataset, refer_root, images_dir, split_by, splits, limit)
        extra = None
    return _write(dataset, out_dir, items, config, sources, shard_size, workers, strict, overwrite, progress, extra)


def prepare_parquet(dataset: str, parquet_dir: str | Path, images_dir: str | Path, out_dir: str | Path, **options) -> dict:
    """:func:`prepare_refer` from the Hugging Face parquet copies (``jxu124/refcoco``,
    ``jxu124/refcocoplus``, ``jxu124/refcocog``): every ``*.parquet`` under ``parquet_dir``.

    The shards, and the manifest but for its ``sources`` entry (which names the files read), are
    byte-for-byte those :func:`prepare_refer` writes from the same refs. The copies hold RefCOCO/+
    unc and RefCOCOg umd; ``split_by`` may only say so. Split names become the refer API's
    (``validation`` → ``val``; RefCOCO/+ ``test`` → ``testA``). ``options``: those of
    :func:`prepare_refer` (``split_by``, ``splits``, ``shard_size``, ``workers``, ``limit``,
    ``strict``, ``overwrite``, ``progress``). Needs ``pip install 'shared-ris[parquet]'``.
    """
    return prepare_refer(dataset, parquet_dir, images_dir, out_dir, route="parquet", **options)


def _parquet_items(dataset: str, parquet_dir, images_dir, split_by, splits, limit) -> tuple[dict, dict, dict]:
    if dataset not in PARQUET_SPLIT_BY:
        raise DataError(f"--parquet reads {', '.join(PARQUET_SPLIT_BY)}; prepare {dataset} from --refer-root")
    if split_by not in (None, PARQUET_SPLIT_BY[dataset]):
        raise DataError(f"the parquet copies of {dataset} hold the {PARQUET_SPLIT_BY[dataset]} splits only; drop --split-by {split_by} or use --refer-root")
    return parquet_items(dataset, parquet_dir, images_dir, splits, limit)


def _write(dataset, out_dir, items, config, sources, shard_size, workers, strict, overwrite, progress, extra) -> dict:
    config = {**config, "shard_size": shard_size, "shard_format": SHARD_FORMAT}
    return write_dataset(
        dataset, out_dir, items, make_refer_sample, config=config, sources=sources,
        shard_size=shard_size, workers=workers, strict=strict, overwrite=overwrite, progress=progress, extra=extra,
    )  # fmt: skip


def parquet_items(dataset: str, parquet_dir, images_dir, splits, limit: int | None) -> tuple[dict, dict, dict]:
    """The parquet copy of one dataset → (items by split, config, sources), as :func:`refer_items`
    builds them from the refer files: the same config, so that the manifests agree."""
    images_root = check_images_dir(images_dir)
    refs, images, anns, files, duplicates = load_parquet(parquet_dir, dataset)
    chosen = _choose_splits(_ordered(r["split"] for r in refs), splits, f"{Path(parquet_dir)}")
    items = _refer_items(refs, chosen, limit, dataset, images, anns, images_root)
    config = {"dataset": dataset, "split_by": PARQUET_SPLIT_BY[dataset], "splits": chosen, "limit": limit}
    sources = {"parquet": [str(p.resolve()) for p in files], "images": str(images_root.resolve()), "duplicate_rows": duplicates}
    return items, config, sources


def refer_items(dataset: str, refer_root, images_dir, split_by: str | None, splits, limit: int | None) -> tuple[dict, dict, dict]:
    """One refer dataset → (items by split, config, sources)."""
    split_by = split_by or DEFAULT_SPLIT_BY.get(dataset)
    refs_path = refs_file(refer_root, dataset, split_by)
    instances_path = instances_file(refer_root, dataset)
    images_root = check_images_dir(images_dir)
    refs = load_refs(refs_path)
    chosen = _choose_splits(_ordered(r["split"] for r in refs), splits, f"{refs_path}")
    images, anns = load_instances(instances_path)
    items = _refer_items(refs, chosen, limit, dataset, images, anns, images_root)
    config = {"dataset": dataset, "split_by": split_by, "splits": chosen, "limit": limit}
    sources = {"refs": str(refs_path.resolve()), "instances": str(instances_path.resolve()), "images": str(images_root.resolve())}
    return items, config, sources


def grefcoco_items(refer_root, images_dir, split_by: str | None, splits, limit: int | None) -> tuple[dict, dict, dict]:
    """gRefCOCO → (items by split, config, sources); see :mod:`.grefcoco`."""
    split_by = split_by or "unc"
    refs, images, anns, images_root, sources = load_grefcoco(refer_root, images_dir, split_by)
    chosen = _choose_splits(_ordered(r["split"] for r in refs), splits, sources["refs"])
    by_split = _items_by_split(refs, chosen, limit, lambda ref: gref_item(ref, images, anns, images_root))
    return by_split, {"dataset": GREFCOCO, "split_by": split_by, "splits": chosen, "limit": limit}, sources


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
        for split, items in _refer_items(refs, wanted, None, dataset, images, anns, images_root).items():
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


# -- the standard counts -------------------------------------------------------------------------------

# (dataset, split_by, split) → (refs, sentences) as the refer API lists them: every sentence of
# every ref of the split, the set the papers' oIoU / mIoU are computed over.
STANDARD_COUNTS = {
    ("refcoco", "unc", "train"): (42_404, 120_624),
    ("refcoco", "unc", "val"): (3_811, 10_834),
    ("refcoco", "unc", "testA"): (1_975, 5_657),
    ("refcoco", "unc", "testB"): (1_810, 5_095),
    ("refcoco+", "unc", "train"): (42_278, 120_191),
    ("refcoco+", "unc", "val"): (3_805, 10_758),
    ("refcoco+", "unc", "testA"): (1_975, 5_726),
    ("refcoco+", "unc", "testB"): (1_798, 4_889),
    ("refcocog", "umd", "train"): (42_226, 80_512),
    ("refcocog", "umd", "val"): (2_573, 4_896),
    ("refcocog", "umd", "test"): (5_023, 9_602),
}


@dataclass(frozen=True)
class SplitCount:
    """A prepared split's refs and sentences beside the standard ones (None: not a standard split)."""

    split: str
    refs: int
    sentences: int
    standard: tuple[int, int] | None

    @property
    def matches(self) -> bool:
        return self.standard == (self.refs, self.sentences)

    def describe(self) -> str:
        """``val 3,811 refs / 10,834 sentences (standard)``, or what differs from the standard."""
        line = f"{self.split} {_count(self.refs, 'ref')} / {_count(self.sentences, 'sentence')}"
        if self.standard is None or self.matches:
            return line + (" (standard)" if self.standard else "")
        refs, sentences = self.standard
        differences = [
            f"{_count(abs(delta), noun)} {'more' if delta > 0 else 'fewer'}"
            for delta, noun in ((self.refs - refs, "ref"), (self.sentences - sentences, "sentence")) if delta
        ]  # fmt: skip
        return (
            f"{line}, not the standard {refs:,} / {sentences:,}: {' and '.join(differences)} "
            "(an incomplete download, or refs skipped: see manifest.json)"
        )


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def standard_counts(manifest: dict) -> list[SplitCount]:
    """Each prepared split's counts beside the standard ones of its (dataset, split_by, split):
    RefCOCO/+ unc and RefCOCOg umd, also as the combined set's ``{dataset}-{split}`` splits. A
    ``--limit``-ed preparation is compared with nothing (it is short on purpose)."""
    config = manifest.get("config", {})
    rows = []
    for split, info in manifest["splits"].items():
        key = None
        if config.get("limit") is None:
            if manifest["dataset"] == COMBINED:
                dataset, _, name = split.rpartition("-")
                key = (dataset, DEFAULT_SPLIT_BY.get(dataset), name) if dataset else None
            else:
                key = (manifest["dataset"], config.get("split_by"), split)
        rows.append(SplitCount(split, info["samples"], info["sentences"], STANDARD_COUNTS.get(key)))
    return rows
