"""The Hugging Face parquet copies of RefCOCO / RefCOCO+ / RefCOCOg, read into what the refer route reads.

``jxu124/refcoco``, ``jxu124/refcocoplus`` and ``jxu124/refcocog`` hold one row per ref: ``ref_id``,
``ann_id``, ``image_id``, ``category_id``, ``split``, ``sentences`` (``[{raw, sent, sent_id, tokens}]``)
and JSON strings ``raw_anns`` (the COCO annotation) and ``raw_image_info`` (the COCO image entry).
The images are not in the files: they are COCO ``train2014/`` files, found as the refer route finds
them (the image entry's ``file_name`` inside ``--images``, else ``COCO_train2014_%012d.jpg``).

Each row becomes the ref dict ``refs(*).p`` would give, and its annotation and image entry the
ones ``instances.json`` would give; :mod:`.prepare` then runs the refer route's own code on them, so
the shards are byte-for-byte those of the refer files. Split names are mapped to the refer API's
(:data:`SPLIT_NAMES`). Every field read is type-checked like the refer files' (one line naming the
file and the row); ``pyarrow`` is imported only here (``pip install 'shared-ris[parquet]'``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import DataError, short_repr
from .refer import check_annotation, check_image_entry, check_ref

# The parquet copies' split names → the refer API's. RefCOCO/+ are the unc splits (their "test"
# rows are testA); RefCOCOg is umd (google has no test split).
SPLIT_NAMES = {
    "refcoco": {"train": "train", "validation": "val", "test": "testA", "testB": "testB"},
    "refcoco+": {"train": "train", "validation": "val", "test": "testA", "testB": "testB"},
    "refcocog": {"train": "train", "validation": "val", "test": "test"},
}
SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
REPOSITORIES = {"refcoco": "jxu124/refcoco", "refcoco+": "jxu124/refcocoplus", "refcocog": "jxu124/refcocog"}
COLUMNS = ("ref_id", "ann_id", "image_id", "split", "sentences", "raw_anns", "raw_image_info")
OPTIONAL_COLUMNS = ("category_id",)
PARQUET_EXTRA = "reading parquet files needs pyarrow: pip install 'shared-ris[parquet]'"


def _hint(dataset: str) -> str:
    return f"is this a {REPOSITORIES[dataset]} parquet file? re-download it"


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(PARQUET_EXTRA) from None
    return pq


def parquet_files(folder: str | Path, dataset: str) -> list[Path]:
    """Every ``*.parquet`` under ``folder`` (the Hub's ``data/`` layout or flat), sorted by path."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{root}: parquet folder not found; download {REPOSITORIES[dataset]} from Hugging Face and pass its folder to --parquet")
    files = sorted(p for p in root.glob("**/*.parquet") if p.is_file())
    if not files:
        raise DataError(f"{root}: no *.parquet files in it or below; download {REPOSITORIES[dataset]} from Hugging Face and pass its folder to --parquet")
    return files


def read_rows(path: Path, dataset: str) -> list[dict]:
    """The columns the preparation reads, as Python values; one line naming the file if it is not
    a parquet file or lacks a column."""
    pq = _pyarrow_parquet()
    try:
        names = set(pq.read_schema(path).names)
        missing = [c for c in COLUMNS if c not in names]
        if missing:
            raise DataError(f"{path}: lacks the column(s) {', '.join(missing)}; {_hint(dataset)}")
        columns = list(COLUMNS) + [c for c in OPTIONAL_COLUMNS if c in names]
        return pq.read_table(path, columns=columns).to_pylist()
    except DataError:
        raise
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError and others on a damaged file
        detail = (str(exc).strip().splitlines() or [""])[0][:160]
        raise DataError(f"{path}: not a readable parquet file ({type(exc).__name__}: {detail}); {_hint(dataset)}") from None


def _json_object(path: Path, where: str, column: str, text: Any, hint: str) -> Any:
    if not isinstance(text, str):
        raise DataError(f"{path}: {where}: '{column}' must be a JSON string, got {short_repr(text)}; {hint}")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting too deep for the parser
        raise DataError(f"{path}: {where}: '{column}' is not valid JSON ({type(exc).__name__}); {hint}") from None


def _entry(path: Path, where: str, column: str, row: dict, id_field: str, hint: str) -> dict:
    """The COCO entry a row's JSON column holds: an object whose ``id`` (when given) is the row's ``id_field``.
    A list of entries (an image's annotations) is accepted when exactly one has that id."""
    value = _json_object(path, where, column, row[column], hint)
    if isinstance(value, list):
        matching = [v for v in value if isinstance(v, dict) and v.get("id") == row[id_field]]
        value = matching[0] if len(matching) == 1 else value
    if not isinstance(value, dict):
        raise DataError(f"{path}: {where}: '{column}' must hold a JSON object (the COCO entry of {id_field} {row[id_field]}), got {short_repr(value)}; {hint}")
    if "id" in value and value["id"] != row[id_field]:
        raise DataError(f"{path}: {where}: '{column}' is entry {short_repr(value['id'])}, not the row's {id_field} {row[id_field]}; {hint}")
    return {**value, "id": row[id_field]}


def row_ref(path: Path, index: int, row: dict, dataset: str) -> dict:
    """A row → the ref dict ``refs(*).p`` holds for it, checked like one (split name mapped)."""
    hint = _hint(dataset)
    where = f"row {index}" + (f" (ref {row['ref_id']})" if isinstance(row.get("ref_id"), int) else "")
    names = SPLIT_NAMES[dataset]
    if not isinstance(row["split"], str) or row["split"] not in names:
        raise DataError(f"{path}: {where}: 'split' must be one of {', '.join(names)}, got {short_repr(row['split'])}; {hint}")
    sentences = row["sentences"]
    if isinstance(sentences, list):  # a null field is an absent one, as in the refs files
        sentences = [{k: v for k, v in s.items() if v is not None} if isinstance(s, dict) else s for s in sentences]
    ref = {"ref_id": row["ref_id"], "ann_id": row["ann_id"], "image_id": row["image_id"], "split": names[row["split"]], "sentences": sentences}
    if row.get("category_id") is not None:
        ref["category_id"] = row["category_id"]
    check_ref(path, where, ref, hint)
    return ref


def _remember(seen: dict, by_id: dict, key: int, entry: dict, at: str, what: str, hint: str) -> None:
    """Keep one entry per id; the same id described differently in two rows is refused."""
    if key in by_id:
        if by_id[key] != entry:
            raise DataError(f"{at}: {what} {key} differs from the one in {seen[key]}; {hint}")
        return
    by_id[key], seen[key] = entry, at


def load_parquet(folder: str | Path, dataset: str) -> tuple[list[dict], dict[int, dict], dict[int, dict], list[Path], int]:
    """Every row under ``folder`` → (refs, image entries by id, annotations by id, files, duplicates).

    A ref repeated with the same content in two files (a stale copy of a split beside the new one)
    is kept once and counted in ``duplicates``; repeated with other content it is refused, naming both.
    """
    hint = _hint(dataset)
    files = parquet_files(folder, dataset)
    refs: dict[int, dict] = {}
    images: dict[int, dict] = {}
    anns: dict[int, dict] = {}
    seen: dict[str, dict] = {"ref": {}, "image": {}, "annotation": {}}
    duplicates = 0
    for path in files:
        for index, row in enumerate(read_rows(path, dataset)):
            ref = row_ref(path, index, row, dataset)
            where = f"row {index} (ref {ref['ref_id']})"
            image = _entry(path, where, "raw_image_info", row, "image_id", hint)
            ann = _entry(path, where, "raw_anns", row, "ann_id", hint)
            check_image_entry(path, f"{where}: raw_image_info", image, hint)
            check_annotation(path, f"{where}: raw_anns", ann, hint)
            duplicates += ref["ref_id"] in refs
            at = f"{path}: {where}"
            _remember(seen["ref"], refs, ref["ref_id"], ref, at, "ref", hint)
            _remember(seen["image"], images, ref["image_id"], image, at, "image", hint)
            _remember(seen["annotation"], anns, ref["ann_id"], ann, at, "annotation", hint)
    return list(refs.values()), images, anns, files, duplicates
