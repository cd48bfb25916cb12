"""Write items to WebDataset shards: deterministic boundaries, atomic files, resumable, parallel.

Items of a split (already sorted) are cut into shards of ``shard_size``: shard i holds items
[i·N, (i+1)·N), whatever gets skipped inside it, so a shard's name always means the same content.
A worker writes ``NAME.tar.tmp`` and renames it when complete; the main process then records the
shard in ``manifest.json`` (``"complete": false`` until the end). A re-run with the same settings
keeps every recorded shard whose file exists and redoes the rest, so a killed run loses at most the
shards in flight and never duplicates a sample.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import json
import os
import signal
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import webdataset as wds

from .. import __version__
from ..distributed import exit_with_parent
from ..fileio import atomic_write, check_output_folder, confined, file_sha256
from .errors import DataError
from .location import check_shard_name
from .shard_index import TEXT_FIELDS, index_name, write_index  # TEXT_FIELDS: data.text_field's choices
from .targets import TARGET_GROUPS, mask_is_learnable, target_count, target_group
from .manifest import MANIFEST, load_manifest_file, write_manifest

DEFAULT_SHARD_SIZE = 1000
RECORDS = "shard_records"  # per-shard statistics, in plan order; what a re-run resumes from

SampleMaker = Callable[[dict], "tuple[dict | None, list[dict]]"]
Progress = Callable[[int, int], None]


def shard_name(dataset: str, split: str, index: int) -> str:
    return f"{dataset}-{split}-{index:06d}.tar"


@dataclass
class ShardJob:
    name: str
    split: str
    items: list[dict]


def plan_shards(dataset: str, splits: dict[str, list[dict]], shard_size: int) -> list[ShardJob]:
    if shard_size < 1:
        raise DataError(f"shard size must be at least 1, got {shard_size}")
    return [
        ShardJob(shard_name(dataset, split, i // shard_size), split, items[i : i + shard_size])
        for split, items in splits.items()
        for i in range(0, len(items), shard_size)
    ]


# -- worker side -----------------------------------------------------------------------------------

_counter = None  # items finished in this process tree (a multiprocessing.Value, or a local stand-in)


class _InlineTally:
    """The in-process stand-in for the shared counter: reports every item straight away."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.value, self.progress, self.total = 0, progress, total

    def add(self) -> None:
        self.value += 1
        if self.progress:
            self.progress(self.value, self.total)


def _init_worker(counter) -> None:
    global _counter
    _counter = counter


def _init_pool_worker(counter) -> None:
    _init_worker(counter)
    exit_with_parent(signal.SIGKILL)  # a pool worker must not outlive a killed `sris prepare`


def _tick() -> None:
    if isinstance(_counter, _InlineTally):
        _counter.add()
    elif _counter is not None:
        with _counter.get_lock():
            _counter.value += 1


def write_shard(out_dir: str, job: ShardJob, make_sample: SampleMaker, strict: bool) -> dict:
    """Write one shard to a temp name, rename it when complete; return its statistics."""
    final = Path(out_dir) / job.name
    stats = {"split": job.split, "samples": 0, "sentences": 0, **_no_flags(), "skipped": [], "image_ids": set()}
    with atomic_write(final) as stream:
        with wds.TarWriter(stream, encoder=False, mtime=0, user="", group="") as writer:
            for item in job.items:
                sample, skips = make_sample(item)
                if skips and strict:
                    first = skips[0]
                    raise DataError(f"ref {first['ref_id']} ({first['split']}): {first['reason']}; --strict stops at the first skipped item")
                stats["skipped"] += skips
                if sample is not None:
                    writer.write(sample)
                    _count_sample(stats, json.loads(sample["json"]))
                    stats["image_ids"].add(item["image_id"])
                _tick()
    stats["bytes"] = final.stat().st_size
    stats["sha256"] = file_sha256(final)
    stats["index_sha256"] = write_index(final)
    stats["image_ids"] = sorted(stats["image_ids"])
    return stats


def _no_flags() -> dict:
    return {
        "empty_mask_samples": 0,
        "empty_text_sentences": {field: 0 for field in TEXT_FIELDS},
        "trainable_samples": {field: 0 for field in TEXT_FIELDS},
    }


def _count_sample(stats: dict, meta: dict) -> None:
    """Add one written sample to a shard's (or split's) counts, flagged ones included: a sample
    with ``"empty_mask": true``, a sentence whose text is empty. ``trainable_samples[field]``
    counts the samples training can learn from with that text field (see :mod:`.loader`). A
    generalized sample (with ``target_count``) is also counted by target count ("0", "1", "2+")."""
    sentences = meta["sentences"]
    stats["samples"] += 1
    stats["sentences"] += len(sentences)
    empty_mask = meta.get("empty_mask") is True
    stats["empty_mask_samples"] += empty_mask
    for field in TEXT_FIELDS:
        filled = sum(1 for s in sentences if str(s.get(field) or "").strip())
        stats["empty_text_sentences"][field] += len(sentences) - filled
        stats["trainable_samples"][field] += bool(filled) and mask_is_learnable(meta)
    if "target_count" in meta:
        group = target_group(target_count(meta))
        for key, n in (("target_samples", 1), ("target_sentences", len(sentences))):
            stats.setdefault(key, dict.fromkeys(TARGET_GROUPS, 0))[group] += n


# -- main side --------------------------------------------------------------------------------------


def _our_shards(out: Path, names) -> list[Path]:
    """Paths of the shard names a manifest lists, each a plain name confined to ``out`` (a manifest
    is data: an absolute or ``..`` name must never make us delete anything outside the folder)."""
    return [confined(out, check_shard_name(name, out / MANIFEST), "manifest shard name") for name in names]


def _shard_intact(path: Path, stats: dict) -> bool:
    """A recorded shard is kept only if its file has the recorded size and SHA-256. A record from an
    older version without a digest gets one when its size matches; a kept shard whose index is
    missing or not the recorded one gets its index rewritten."""
    if not path.is_file() or not isinstance(stats, dict) or path.stat().st_size != stats.get("bytes"):
        return False
    digest = file_sha256(path)
    if "sha256" not in stats:
        stats["sha256"] = digest
    if stats["sha256"] != digest:
        return False
    index = path.with_name(index_name(path.name))
    if not index.is_file() or file_sha256(index) != stats.get("index_sha256"):
        try:
            stats["index_sha256"] = write_index(path)
        except (DataError, tarfile.TarError):  # not a shard we wrote: rebuild it
            return False
    return True


def _resume_state(out: Path, jobs: list[ShardJob], config: dict, overwrite: bool) -> dict[str, dict]:
    """Finished shards to keep; removes leftovers of interrupted or overwritten runs.

    ``config`` (settings and sources) must equal the previous run's, or the folder needs ``overwrite``.
    """
    path = out / MANIFEST
    previous = load_manifest_file(path) if path.is_file() else {}
    records = previous.get(RECORDS, {})
    if not isinstance(records, dict):
        raise DataError(f"{path}: {RECORDS!r} must be an object; pass --overwrite to rebuild the folder")
    names = {job.name for job in jobs}
    ours = names | set(records) if overwrite else names
    for shard in _our_shards(out, ours):
        index = shard.with_name(index_name(shard.name))
        for leftover in (shard.with_name(shard.name + ".tmp"), index.with_name(index.name + ".tmp")):
            leftover.unlink(missing_ok=True)
        if overwrite:
            shard.unlink(missing_ok=True)
            index.unlink(missing_ok=True)
    if overwrite or not previous:
        return {}
    old = {**previous.get("config", {}), "sources": previous.get("sources")} if isinstance(previous.get("config"), dict) else None
    if old != config:
        diff = sorted(k for k in set(old or {}) | set(config) if (old or {}).get(k) != config.get(k))
        detail = ", ".join(f"{k}: {(old or {}).get(k)!r} -> {config.get(k)!r}" for k in diff[:3])
        raise DataError(f"{path}: this folder was prepared with other settings ({detail}); pass --overwrite to rebuild it or choose another --out")
    return {name: stats for name, stats in records.items() if name in names and _shard_intact(out / name, stats)}


def write_all(
    out_dir: str | Path,
    jobs: list[ShardJob],
    make_sample: SampleMaker,
    *,
    header: dict,
    workers: int = 1,
    strict: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, dict]:
    """Write every unfinished shard; return the statistics of all shards by name.

    ``header`` is the manifest's identity (``tool``, ``version``, ``dataset``, ``config``, ``sources``):
    the in-progress manifest carries it, and a re-run resumes only if config and sources match.
    """
    out = Path(out_dir)
    check_output_folder(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    done = _resume_state(out, jobs, {**header["config"], "sources": header["sources"]}, overwrite)
    todo = [job for job in jobs if job.name not in done]
    total = sum(len(job.items) for job in todo)

    def record(name: str, stats: dict) -> None:
        done[name] = stats
        write_manifest(out, {**header, "complete": False, RECORDS: done})

    write_manifest(out, {**header, "complete": False, RECORDS: done})
    if progress:
        progress(0, total)
    if workers <= 1 or len(todo) <= 1:
        _run_inline(out, todo, make_sample, strict, progress, total, record)
    else:
        _run_pool(out, todo, make_sample, strict, progress, total, record, workers)
    return done


def _run_inline(out, todo, make_sample, strict, progress, total, record) -> None:
    _init_worker(_InlineTally(progress, total))
    try:
        for job in todo:
            record(job.name, write_shard(str(out), job, make_sample, strict))
    finally:
        _init_worker(None)


def _run_pool(out, todo, make_sample, strict, progress, total, record, workers) -> None:
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    counter = context.Value("q", 0)
    with cf.ProcessPoolExecutor(min(workers, len(todo)), mp_context=context, initializer=_init_pool_worker, initargs=(counter,)) as pool:
        futures = {pool.submit(write_shard, str(out), job, make_sample, strict): job for job in todo}
        pending = set(futures)
        try:
            while pending:
                finished, pending = cf.wait(pending, timeout=0.25, return_when=cf.FIRST_COMPLETED)
                for future in finished:
                    record(futures[future].name, future.result())
                if progress:
                    progress(counter.value, total)
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def summarize(jobs: Iterable[ShardJob], done: dict[str, dict]) -> tuple[dict, list[dict]]:
    """Per-split statistics and the skip list, from the shard records (in plan order)."""
    splits: dict[str, dict] = {}
    skipped: list[dict] = []
    images: dict[str, set] = {}
    for job in jobs:
        stats = done[job.name]
        split = splits.setdefault(job.split, _empty_split())
        skipped += stats["skipped"]
        images.setdefault(job.split, set()).update(stats["image_ids"])
        if stats["samples"] == 0:
            continue  # every item skipped: the file exists (so resume knows it is done) but is not listed
        split["samples"] += stats["samples"]
        split["sentences"] += stats["sentences"]
        _add_flags(split, stats)
        split["bytes"] += stats["bytes"]
        split["shards"].append(job.name)
        split["shard_samples"].append(stats["samples"])
        split["shard_sentences"].append(stats["sentences"])
        split["shard_bytes"].append(stats["bytes"])
        split["shard_sha256"].append(stats["sha256"])
        split["shard_index_sha256"].append(stats["index_sha256"])
    for name, split in splits.items():
        split["images"] = len(images[name])
    return splits, skipped


def _add_flags(split: dict, stats: dict) -> None:
    """A shard's flag counts into its split's. A record written before the flags existed has none:
    its version dropped flagged items, so every sample it holds is trainable."""
    split["empty_mask_samples"] += stats.get("empty_mask_samples", 0)
    for field in TEXT_FIELDS:
        split["empty_text_sentences"][field] += stats.get("empty_text_sentences", {}).get(field, 0)
        split["trainable_samples"][field] += stats.get("trainable_samples", {}).get(field, stats["samples"])
    for key in ("target_samples", "target_sentences"):  # generalized sets only
        for group, n in stats.get(key, {}).items():
            split.setdefault(key, dict.fromkeys(TARGET_GROUPS, 0))[group] += n


def skip_counts(skipped: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in skipped:
        reason = record["reason"].split(" (")[0]
        counts[reason] = counts.get(reason, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _empty_split() -> dict:
    return {
        "samples": 0, "sentences": 0, "images": 0, "bytes": 0, **_no_flags(),
        "shards": [], "shard_samples": [], "shard_sentences": [], "shard_bytes": [], "shard_sha256": [], "shard_index_sha256": [],
    }  # fmt: skip


def default_workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores))


def write_dataset(
    dataset: str,
    out_dir: str | Path,
    splits: dict[str, list[dict]],
    make_sample: SampleMaker,
    *,
    config: dict,
    sources: dict,
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: int | None = None,
    strict: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
    extra: dict | None = None,
) -> dict:
    """Shards for every split (resuming), then the final manifest, which is written and returned.

    Args:
        splits: split name → items in shard order; each item is a dict with at least ``ref_id``
            and ``image_id`` that ``make_sample`` (a picklable, module-level function) turns into
            ``(sample or None, skip records)``.
        config: the settings a resume must match; sources: where the inputs came from.
        extra: more top-level manifest entries (e.g. ``excluded_images``).
    """
    jobs = plan_shards(dataset, splits, shard_size)
    header = {"tool": "shared-ris", "version": __version__, "dataset": dataset, "config": config, "sources": sources}
    done = write_all(
        out_dir, jobs, make_sample, header=header, workers=workers or default_workers(),
        strict=strict, overwrite=overwrite, progress=progress,
    )
    split_stats, skipped = summarize(jobs, done)
    manifest = {
        **header,
        "complete": True,
        "splits": {name: split_stats.get(name, _empty_split()) for name in splits},
        **(extra or {}),
        "skipped_counts": skip_counts(skipped),
        "skipped": skipped,
        RECORDS: {job.name: done[job.name] for job in jobs},
    }
    write_manifest(out_dir, manifest)
    return manifest
