"""Where prepared data lives, and the only way a file name read from a manifest becomes a path.

A location comes from the command line (trusted): a local folder, an ``http(s)://`` prefix or
template, or, only with an explicit opt-in (``--allow-pipe``), a ``pipe:`` shell command template
with ``{}`` standing for a file name. Names read from ``manifest.json`` are data: they must be plain
file names (:data:`SHARD_NAME`), so they can never add a scheme, a directory or a shell command.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import webdataset as wds

from .errors import DataError

# What sris prepare writes: {dataset}-{split}-NNNNNN.tar with dataset/split made of these characters.
SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+-]*\.tar")
HTTP = re.compile(r"^https?://", re.IGNORECASE)
KINDS = ("local", "http", "pipe")


def check_shard_name(name: object, where: str | Path) -> str:
    """``name`` if it is a plain shard file name, else a one-line :class:`DataError` naming ``where``."""
    if not isinstance(name, str) or not SHARD_NAME.fullmatch(name):
        raise DataError(
            f"{where}: shard name {name!r} is not a plain file name ending in .tar (no folders, '..' or schemes); "
            "the manifest was altered: re-run sris prepare with --overwrite"
        )
    return name


@dataclass(frozen=True)
class DataLocation:
    """A data location as the command line gave it. ``kind``: ``local``, ``http`` or ``pipe``."""

    text: str
    kind: str

    def __str__(self) -> str:
        return self.text

    @property
    def is_local(self) -> bool:
        return self.kind == "local"

    def where(self, name: str) -> str:
        """The path, URL or shell command that reads file ``name`` (``manifest.json`` or a shard)."""
        if name != "manifest.json":
            check_shard_name(name, self.where("manifest.json"))
        if self.kind == "local":
            return str(Path(self.text) / name)
        if "{}" in self.text:
            return self.text.replace("{}", shlex.quote(name) if self.kind == "pipe" else name)
        return f"{self.text.rstrip('/')}/{name}"

    def open(self, name: str) -> BinaryIO:
        """A binary stream of file ``name``: ``open`` for local files, curl for http(s), the shell for pipe:."""
        target = self.where(name)
        return open(target, "rb") if self.kind == "local" else wds.gopen(target, "rb")


def data_location(data: str | Path | DataLocation, allow_pipe: bool = False) -> DataLocation:
    """Parse ``--data``. An existing folder is always local (even one named ``a:b`` or ``x{}y``)."""
    if isinstance(data, DataLocation):
        return data
    text = str(data)
    if not text.strip():
        raise DataError("--data is empty; pass the folder written by sris prepare")
    if Path(text).is_dir():
        return DataLocation(text, "local")
    if text.startswith("pipe:"):
        if not allow_pipe:
            raise DataError(f"{text}: a pipe: location runs a shell command; pass --allow-pipe to allow it")
        if "{}" not in text:
            raise DataError(f"{text}: a pipe: location needs {{}} where the file name goes, e.g. 'pipe:aws s3 cp s3://bucket/data/{{}} -'")
        return DataLocation(text, "pipe")
    if HTTP.match(text):
        return DataLocation(text, "http")
    raise DataError(f"{text}: data directory not found; run `sris prepare` first and pass its output as --data (or an http(s):// location)")
