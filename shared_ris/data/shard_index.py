"""A shard's index: where each sample's members lie in the tar, so training can read any sample
directly (every ref once per epoch, in a fresh permutation, like ``DistributedSampler``).

``NAME.tar`` gets ``NAME.idx`` (JSON) at prepare time::

    {"format": 1, "shard": NAME.tar, "shard_bytes": int, "shard_sha256": hex,
     "samples": [{"key": str, "members": {ext: [offset, size, sha256]}, "trainable": ["sent", "raw"]}]}

``trainable`` lists the text fields with which training can learn from the sample (a learnable mask,
see :mod:`.targets`, and a non-empty text), so the sampler chooses samples without reading them. The index is data like
the shard: the manifest records its SHA-256, it must name its shard's size and digest, every
member must lie inside the shard, and every member read is checked against its own SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..fileio import file_sha256, write_text_atomic
from .errors import DataError
from .shard_reader import MAX_MEMBER_BYTES, MEMBER, ShardInfo
from .targets import mask_is_learnable

INDEX_FORMAT = 1
TEXT_FIELDS = ("sent", "raw")
FIX = "re-run the same sris prepare command (it rebuilds damaged shards and indexes)"


def index_name(shard_name: str) -> str:
    return shard_name[: -len(".tar")] + ".idx"


def build_index(path: Path) -> dict:
    """Index a finished shard (read with tarfile, random access): members, offsets, digests, flags."""
    samples: dict[str, dict] = {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            key, dot, ext = member.name.partition(".")
            if not (member.isfile() and dot):
                raise DataError(f"{path}: member {member.name!r} is not a file named KEY.EXT; {FIX}")
            data = tar.extractfile(member).read()
            entry = samples.setdefault(key, {"key": key, "members": {}})
            entry["members"][ext] = [member.offset_data, member.size, hashlib.sha256(data).hexdigest()]
            if ext == "json":
                entry["trainable"] = _trainable_fields(data)
    return {
        "format": INDEX_FORMAT, "shard": path.name, "shard_bytes": path.stat().st_size, "shard_sha256": file_sha256(path),
        "samples": list(samples.values()),
    }  # fmt: skip


def _trainable_fields(data: bytes) -> list[str]:
    """Text fields training can learn from a sample's JSON. A malformed sample gets every field, so
    the sampler chooses it and the sample check names the problem instead of it being dropped silently."""
    try:
        meta = json.loads(data)
    except ValueError:
        meta = None
    sentences = meta.get("sentences") if isinstance(meta, dict) else None
    if not (isinstance(sentences, list) and all(isinstance(s, dict) for s in sentences)):
        return list(TEXT_FIELDS)
    if not mask_is_learnable(meta):
        return []
    return [field for field in TEXT_FIELDS if any(str(s.get(field) or "").strip() for s in sentences)]


def write_index(shard: Path) -> str:
    """Write ``NAME.idx`` beside ``shard``; returns its SHA-256 (recorded in the manifest)."""
    text = json.dumps(build_index(shard), separators=(",", ":"))
    write_text_atomic(shard.with_name(index_name(shard.name)), text)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class IndexedShard:
    """One shard opened for direct reads through its checked index."""

    info: ShardInfo
    samples: list[dict]

    def trainable(self, text_field: str) -> list[int]:
        """Positions of the samples training learns from with ``text_field``."""
        return [i for i, sample in enumerate(self.samples) if text_field in sample["trainable"]]

    def read(self, position: int, handle: BinaryIO) -> dict:
        """Raw sample ``{"__key__": key, ext: bytes}`` at ``position``, each member checked."""
        sample = self.samples[position]
        raw = {"__key__": sample["key"]}
        for ext, (offset, size, digest) in sample["members"].items():
            handle.seek(offset)
            data = handle.read(size)
            if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
                raise DataError(f"{self.info.where}: member {sample['key']}.{ext} does not match the index (altered shard); {FIX}")
            raw[ext] = data
        return raw


def load_index(shard: ShardInfo, index_sha256: str) -> IndexedShard:
    """Read and check ``NAME.idx`` of a local shard against the manifest and the shard's size."""
    path = Path(shard.where).with_name(index_name(shard.name))
    try:
        text = path.read_bytes()
    except OSError:
        raise DataError(f"{path}: index missing; {FIX}") from None
    if hashlib.sha256(text).hexdigest() != index_sha256:
        raise DataError(f"{path}: index does not match the manifest (altered or stale); {FIX}")
    try:
        index = json.loads(text)
    except ValueError:
        raise DataError(f"{path}: not a JSON index; {FIX}") from None
    _check_index(index, shard, path)
    return IndexedShard(shard, index["samples"])


def _check_index(index, shard: ShardInfo, path: Path) -> None:
    """Types and bounds: every member inside the shard, named KEY.EXT, no bigger than a member can be."""
    ok = isinstance(index, dict) and index.get("format") == INDEX_FORMAT and index.get("shard") == shard.name
    ok = ok and index.get("shard_bytes") == shard.bytes and index.get("shard_sha256") == shard.sha256
    samples = index.get("samples") if isinstance(index, dict) else None
    ok = ok and isinstance(samples, list) and len(samples) == shard.samples
    for sample in samples if ok else []:
        ok = isinstance(sample, dict) and isinstance(sample.get("members"), dict) and isinstance(sample.get("trainable"), list)
        ok = ok and MEMBER.fullmatch(f"{sample.get('key')}.json") is not None and set(sample["trainable"]) <= set(TEXT_FIELDS)
        ok = ok and all(_member_ok(ext, where, shard.bytes) for ext, where in sample["members"].items())
        if not ok:
            break
    if not ok:
        raise DataError(f"{path}: not an index of {shard.name} as the manifest describes it; {FIX}")


def _member_ok(ext, where, shard_bytes: int) -> bool:
    if not (isinstance(ext, str) and isinstance(where, list) and len(where) == 3):
        return False
    offset, size, digest = where
    counts = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, size))
    return counts and size <= MAX_MEMBER_BYTES and offset + size <= shard_bytes and isinstance(digest, str) and len(digest) == 64
