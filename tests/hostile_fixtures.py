"""Test helpers for hostile inputs: shards and manifests altered the way an attacker (or a broken
copy) would, while keeping the manifest consistent where the point is to reach a deeper check.

Shards are rewritten with ``tarfile`` alone (not our writer), so a test can put anything in them.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

from PIL import Image

from shared_ris.data import prepare_synthetic
from shared_ris.data.shard_index import write_index


def make_data(folder: Path) -> Path:
    """A tiny prepared synthetic set: train 8, val 4 (one shard each), its spm.model."""
    prepare_synthetic(folder, train=8, val=4, test=0, size=64, shard_size=100, workers=1)
    return folder


def manifest(data: Path) -> dict:
    return json.loads((data / "manifest.json").read_text())


def write_manifest(data: Path, document) -> None:
    (data / "manifest.json").write_text(json.dumps(document))


def shard_path(data: Path, split: str) -> Path:
    return data / manifest(data)["splits"][split]["shards"][0]


def read_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buffer.getvalue())


def record_shard(data: Path, split: str, samples: int | None = None) -> None:
    """Make the manifest and the shard's index agree with the split's (first) shard as it now is on
    disk (the index only when the shard is still a readable tar), as a consistent forger would."""
    document = manifest(data)
    entry = document["splits"][split]
    path = data / entry["shards"][0]
    content = path.read_bytes()
    entry["shard_bytes"][0] = len(content)
    entry["bytes"] = len(content)
    entry["shard_sha256"][0] = hashlib.sha256(content).hexdigest()
    if samples is not None:
        entry["samples"] = entry["shard_samples"][0] = samples
    document["shard_records"][path.name].update(bytes=len(content), sha256=entry["shard_sha256"][0])
    try:
        entry["shard_index_sha256"][0] = write_index(path)
    except (tarfile.TarError, ValueError, KeyError):  # random bytes: no index can describe them
        pass
    write_manifest(data, document)


def rewrite_samples(data: Path, split: str, change, every: bool = False) -> None:
    """Apply ``change(members of a sample) -> members`` to the first sample (or to every sample) of
    the split's shard and keep the manifest consistent. Training draws samples through a shuffle
    buffer, so a training test damages every sample to be sure one is drawn."""
    path = shard_path(data, split)
    members = read_members(path)
    keys = list(dict.fromkeys(n.split(".")[0] for n, _ in members))
    out = []
    for i, key in enumerate(keys):
        group = [(n, b) for n, b in members if n.split(".")[0] == key]
        out += change(group) if every or i == 0 else group
    write_tar(path, out)
    record_shard(data, split)


def replace_member(suffix: str, content: bytes | None):
    """A ``change`` for :func:`rewrite_first_sample`: replace (or, with None, drop) one member."""

    def change(members):
        out = []
        for name, data in members:
            if name.endswith("." + suffix) and not (suffix == "png" and name.endswith(".mask.png")):
                if content is not None:
                    out.append((name, content))
            else:
                out.append((name, data))
        return out

    return change


def json_member(sentences) -> bytes:
    return json.dumps({"ref_id": 1, "sentences": sentences}).encode()


def png(width: int, height: int, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A tiny 1-bit PNG whose header claims width × height pixels."""
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def snapshot(root: Path, exclude: Path | None = None) -> dict[str, str]:
    """Relative path → SHA-256 of every file under ``root`` except those under ``exclude``."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not (exclude is not None and (path == exclude or exclude in path.parents)):
            found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found
