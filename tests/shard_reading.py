"""Test helper: what prepared shards hold, read with tarfile and json alone (not through our loaders)."""

from __future__ import annotations

import json
import tarfile
from collections import Counter

from shared_ris.data import read_manifest


def all_sentences(data_dir, split) -> Counter:
    """(key, sent_id) of every sentence of the split, read with tarfile from the shards."""
    manifest = read_manifest(data_dir)
    found = Counter()
    for name in manifest["splits"][split]["shards"]:
        with tarfile.open(data_dir / name) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    key = member.name.split(".")[0]
                    found.update((key, s["sent_id"]) for s in json.loads(tar.extractfile(member).read())["sentences"])
    return found


def members_by_key(out, manifest: dict, split: str) -> dict[str, dict[str, bytes]]:
    """key → {extension: bytes} of every sample of the split, read with tarfile alone."""
    found: dict[str, dict[str, bytes]] = {}
    for name in manifest["splits"][split]["shards"]:
        with tarfile.open(out / name) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                found.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return found
