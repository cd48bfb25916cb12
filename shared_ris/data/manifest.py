"""``manifest.json``: what a prepared folder holds, and where its shards live.

A data location is a local folder, or a remote one the loader reaches through WebDataset's
``gopen``: a URL prefix (``https://host/refcoco``) or a template with ``{}`` standing for a file
name (``pipe:aws s3 cp s3://bucket/refcoco/{} -``). The manifest is read the same way, so the
training node needs nothing on its own disk.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import webdataset as wds

from ..fileio import write_text_atomic
from .errors import DataError

MANIFEST = "manifest.json"
_URL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)


def is_remote(location: str | Path) -> bool:
    text = str(location)
    return "{}" in text or (bool(_URL.match(text)) and not re.match(r"^[a-zA-Z]:[\\/]", text))


def resolve(location: str | Path, name: str) -> str:
    """The URL or path of file ``name`` inside a data location."""
    text = str(location)
    if "{}" in text:
        return text.replace("{}", name)
    if is_remote(text):
        return f"{text.rstrip('/')}/{name}"
    return str(Path(text) / name)


def load_manifest_file(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable manifest ({exc}); re-run sris prepare with --overwrite") from None


def write_manifest(out_dir: str | Path, manifest: dict) -> Path:
    """Write atomically: a reader sees the old manifest or the new one, never half of one."""
    return write_text_atomic(Path(out_dir) / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False, default=sorted))


def read_manifest(data_dir: str | Path) -> dict:
    """The manifest of a prepared data location (local folder, URL prefix or ``{}`` template).

    Raises:
        DataError: missing, unreadable, or left by a preparation that did not finish.
    """
    where = resolve(data_dir, MANIFEST)
    if is_remote(data_dir):
        try:
            with wds.gopen(where, "rb") as stream:
                text = stream.read().decode("utf-8")
            manifest = json.loads(text)
        except Exception as exc:  # gopen reports failures of the pipe or server in several ways
            raise DataError(f"{where}: cannot read the manifest ({type(exc).__name__}: {exc}); check the data location") from None
    else:
        if not Path(where).is_file():
            raise DataError(f"{where}: no manifest; run `sris prepare` to create this data folder first")
        manifest = load_manifest_file(where)
    if not manifest.get("complete", False):
        raise DataError(f"{where}: preparation did not finish; re-run the same `sris prepare` command to resume it")
    return manifest


def split_info(manifest: dict, split: str, where: str | Path = "") -> dict:
    """The manifest entry of one split, with a one-line error naming the splits that exist."""
    splits = manifest.get("splits", {})
    if split not in splits or not splits[split].get("shards"):
        have = ", ".join(s for s in splits if splits[s].get("shards")) or "none"
        raise DataError(f"{where or 'data'}: no samples for split '{split}' (prepared splits: {have}); prepare it or set data.train_split / data.val_split")
    return splits[split]
