"""``manifest.json``: what a prepared folder holds, checked as untrusted data before anything is read.

The manifest lists, per split, its shards (plain file names) with each shard's sample and sentence
counts, size and SHA-256; readers verify every shard against it (:mod:`.shard_reader`). It is read
from the same :class:`~.location.DataLocation` as the shards, so a training node needs nothing on
its own disk.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..fileio import write_text_atomic
from .errors import DataError
from .location import DataLocation, check_shard_name, data_location
from .shard_reader import ShardInfo

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 256 << 20
SHA256 = re.compile(r"[0-9a-f]{64}")
COUNTS = ("samples", "sentences")
PER_SHARD = {"shard_samples": int, "shard_sentences": int, "shard_bytes": int, "shard_sha256": str, "shard_index_sha256": str}
RERUN = "re-run the same sris prepare command (it keeps the shards that match)"


def _parse(data: bytes, where: str | Path) -> dict:
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise DataError(f"{where}: unreadable manifest ({type(exc).__name__}); re-run sris prepare with --overwrite") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{where}: not a manifest (expected a JSON object written by sris prepare); re-run sris prepare with --overwrite")
    return manifest


def load_manifest_file(path: str | Path) -> dict:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: unreadable manifest ({exc.strerror or exc}); re-run sris prepare with --overwrite") from None
    return _parse(data, path)


def write_manifest(out_dir: str | Path, manifest: dict) -> Path:
    """Write atomically: a reader sees the old manifest or the new one, never half of one."""
    return write_text_atomic(Path(out_dir) / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False, default=sorted))


def _read_remote(location: DataLocation) -> dict:
    where = location.where(MANIFEST)
    try:
        with location.open(MANIFEST) as stream:
            data = stream.read(MAX_MANIFEST_BYTES + 1)
    except Exception as exc:  # gopen reports failures of the pipe or server in several ways
        raise DataError(f"{where}: cannot read the manifest ({type(exc).__name__}: {exc}); check the data location") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise DataError(f"{where}: more than {MAX_MANIFEST_BYTES >> 20} MB, not a manifest")
    return _parse(data, where)


def read_manifest(data_dir: str | Path | DataLocation) -> dict:
    """The checked manifest of a prepared data location (a folder, or a :class:`DataLocation`).

    Raises:
        DataError: missing, unreadable, malformed, or left by a preparation that did not finish.
    """
    location = data_location(data_dir)
    where = location.where(MANIFEST)
    if location.is_local:
        if not Path(where).is_file():
            raise DataError(f"{where}: no manifest; run `sris prepare` to create this data folder first")
        manifest = load_manifest_file(where)
    else:
        manifest = _read_remote(location)
    if manifest.get("complete") is not True:
        raise DataError(f"{where}: preparation did not finish; re-run the same `sris prepare` command to resume it")
    splits = manifest.get("splits")
    _require(isinstance(splits, dict), where, "'splits' must be an object of split entries")
    for name, info in splits.items():
        _check_split(name, info, where)
    return manifest


def _require(ok: bool, where: str, problem: str) -> None:
    if not ok:
        raise DataError(f"{where}: {problem}; re-run sris prepare with --overwrite")


def _check_split(name: str, info, where: str) -> None:
    _require(isinstance(info, dict), where, f"split {name!r} must be an object")
    for key in COUNTS:
        _require(_is_count(info.get(key)), where, f"split {name}: {key!r} must be a count, got {info.get(key)!r}")
    shards = info.get("shards")
    _require(isinstance(shards, list), where, f"split {name}: 'shards' must be a list of file names")
    for shard in shards:
        check_shard_name(shard, where)
    for key, kind in PER_SHARD.items():
        values = info.get(key)
        if values is None and key in ("shard_bytes", "shard_sha256", "shard_index_sha256"):
            raise DataError(f"{where}: split {name} has no shard digests or indexes (prepared by an older shared-ris); {RERUN}")
        typed = isinstance(values, list) and len(values) == len(shards) and all(_is_count(v) if kind is int else _is_digest(v) for v in values)
        _require(typed, where, f"split {name}: {key!r} must list one {kind.__name__} per shard")
    adds_up = sum(info["shard_samples"]) == info["samples"] and sum(info["shard_sentences"]) == info["sentences"]
    _require(adds_up, where, f"split {name}: the per-shard counts do not add up to the split's")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_digest(value) -> bool:
    return isinstance(value, str) and SHA256.fullmatch(value) is not None


def split_info(manifest: dict, split: str, where: str | Path = "") -> dict:
    """The manifest entry of one split, with a one-line error naming the splits that exist."""
    splits = manifest.get("splits", {})
    if split not in splits or not splits[split].get("shards"):
        have = ", ".join(s for s in splits if splits[s].get("shards")) or "none"
        raise DataError(f"{where or 'data'}: no samples for split '{split}' (prepared splits: {have}); prepare it or set data.train_split / data.val_split")
    return splits[split]


def split_shards(info: dict, location: DataLocation) -> list[ShardInfo]:
    """The shards of one split (an entry of a checked manifest) as :class:`ShardInfo`, with the
    sizes to check before reading (local folders) and the digests to check while reading."""
    shards = [
        ShardInfo(name, location.where(name), samples, size, digest)
        for name, samples, size, digest in zip(info["shards"], info["shard_samples"], info["shard_bytes"], info["shard_sha256"])
    ]
    if location.is_local:
        for shard in shards:
            found = Path(shard.where).stat().st_size if Path(shard.where).is_file() else None
            if found != shard.bytes:
                state = "is missing" if found is None else f"has {found} bytes instead of {shard.bytes}"
                raise DataError(f"{shard.where}: {state} (truncated or altered); {RERUN}")
    return shards
