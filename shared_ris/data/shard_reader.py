"""Reading one shard as untrusted data: structure checked member by member, and the whole file
verified against the manifest (size, SHA-256, sample count) when its end is reached.

A shard is a plain tar of regular files named ``KEY.EXT``, the members of one sample adjacent,
every key once. Anything else (a link, a folder, ``../x``, a repeated key, a member too large to be
an image, bytes that are not a tar) is one :class:`DataError` naming the shard. A shard cut short at
a member boundary reads as a valid tar; its size, digest and sample count catch it.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
from dataclasses import dataclass
from typing import BinaryIO, Iterator

import webdataset as wds

from .errors import DataError
from ..errors import first_line

MEMBER = re.compile(r"(?P<key>[A-Za-z0-9][A-Za-z0-9_+-]*)\.(?P<ext>[A-Za-z0-9]+(\.[A-Za-z0-9]+)?)")
MAX_MEMBER_BYTES = 64 << 20  # far above any COCO image or mask; bounds what one member can make us read
REMOTE = re.compile(r"^(https?://|pipe:)", re.IGNORECASE)


@dataclass(frozen=True)
class ShardInfo:
    """One shard and what the manifest says about it. ``where`` is a path, URL or pipe: command;
    ``bytes`` / ``sha256`` are None only for shards given by URL without a manifest to check against."""

    name: str
    where: str
    samples: int
    bytes: int | None = None
    sha256: str | None = None

    def open(self) -> BinaryIO:
        return wds.gopen(self.where, "rb") if REMOTE.match(self.where) else open(self.where, "rb")


class HashingReader:
    """A read-only stream that counts and hashes what passes through it."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream, self.size, self.digest = stream, 0, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        block = self.stream.read(n)
        self.size += len(block)
        self.digest.update(block)
        return block

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def read_shard(shard: ShardInfo) -> Iterator[dict]:
    """Raw samples ``{"__key__": key, ext: bytes, ...}`` of one shard, in file order, verified."""
    try:
        with shard.open() as raw:
            stream = HashingReader(raw)
            count = yield from _samples(tarfile.open(fileobj=stream, mode="r|"), shard)
            stream.drain()  # the padding after the last member belongs to the file's digest too
    except DataError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise DataError(f"{shard.where}: not a readable shard ({first_line(exc)}); re-run sris prepare") from None
    _verify(shard, stream.size, stream.digest.hexdigest(), count)


def _samples(tar: tarfile.TarFile, shard: ShardInfo) -> Iterator[dict]:
    """Group adjacent members by key; returns the number of samples."""
    sample: dict | None = None
    seen: set[str] = set()
    count = 0
    for member in tar:
        key, ext = _member_name(member, shard)
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                count += 1
                yield sample
            if key in seen:
                raise DataError(f"{shard.where}: sample {key} appears twice; re-run sris prepare with --overwrite")
            seen.add(key)
            sample = {"__key__": key}
        if ext in sample:
            raise DataError(f"{shard.where}: member {member.name} appears twice; re-run sris prepare with --overwrite")
        sample[ext] = tar.extractfile(member).read()
    if sample is not None:
        count += 1
        yield sample
    return count


def _member_name(member: tarfile.TarInfo, shard: ShardInfo) -> tuple[str, str]:
    match = MEMBER.fullmatch(member.name)
    if not member.isreg() or match is None:
        kind = "a regular file" if member.isreg() else "not a regular file"
        raise DataError(f"{shard.where}: member {member.name!r} ({kind}) is not KEY.EXT; this is not a shard sris prepare wrote")
    if member.size > MAX_MEMBER_BYTES:
        raise DataError(f"{shard.where}: member {member.name} holds {member.size} bytes, more than any sample needs; re-run sris prepare")
    return match["key"], match["ext"].lower()


def _verify(shard: ShardInfo, size: int, sha256: str, count: int) -> None:
    problems = []
    if shard.bytes is not None and size != shard.bytes:
        problems.append(f"{size} bytes instead of {shard.bytes}")
    if shard.sha256 is not None and sha256 != shard.sha256:
        problems.append("a different SHA-256")
    if count != shard.samples:
        problems.append(f"{count} samples instead of {shard.samples}")
    if problems:
        raise DataError(
            f"{shard.where}: does not match its manifest ({', '.join(problems)}); the file is truncated or altered: "
            "re-run the same sris prepare command to rebuild it"
        )
