"""The Hugging Face parquet copies of RefCOCO/+/g (jxu124/refcoco, refcocoplus, refcocog), written with
pyarrow in their schema from ``refer_fixture``'s tables: one row per ref, the COCO annotation and image
entry as JSON strings (``raw_anns``, ``raw_image_info``), split names as on the Hub."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from refer_fixture import ANNS, REFS, instances_document, texts

# the copies' split names, from the refer API's
HUB_SPLITS = {"train": "train", "val": "validation", "testA": "test", "testB": "testB", "test": "test"}
SCHEMA = pa.schema([
    ("sent_ids", pa.list_(pa.int64())), ("file_name", pa.string()), ("ann_id", pa.int64()), ("ref_id", pa.int64()),
    ("image_id", pa.int64()), ("split", pa.string()),
    ("sentences", pa.list_(pa.struct([("raw", pa.string()), ("sent", pa.string()), ("sent_id", pa.int64()), ("tokens", pa.list_(pa.string()))]))),
    ("category_id", pa.int64()), ("raw_anns", pa.string()), ("raw_image_info", pa.string()), ("raw_sentences", pa.string()),
    ("image_path", pa.string()), ("bbox", pa.list_(pa.float64())), ("captions", pa.list_(pa.string())),
    ("global_image_id", pa.string()), ("anns_id", pa.string()),
])  # fmt: skip


def hub_rows(dataset: str, split_by: str) -> list[dict]:
    """One row per ref, as the parquet copies hold them."""
    doc = instances_document()
    images = {im["id"]: im for im in doc["images"]}
    anns = {a["id"]: a for a in doc["annotations"]}
    rows = []
    for ref_id, ann_id, split, sentences in REFS[(dataset, split_by)]:
        image_id = ANNS[ann_id][0]
        sents = [{"raw": raw, "sent": sent, "sent_id": ref_id * 100 + k, "tokens": sent.split()} for k, (raw, sent) in enumerate(map(texts, sentences))]
        x, y, w, h = anns[ann_id]["bbox"]
        rows.append({
            "sent_ids": [s["sent_id"] for s in sents], "file_name": f"COCO_train2014_{image_id:012d}_{ref_id}.jpg",
            "ann_id": ann_id, "ref_id": ref_id, "image_id": image_id, "split": HUB_SPLITS[split], "sentences": sents,
            "category_id": ANNS[ann_id][1], "raw_anns": json.dumps(anns[ann_id]), "raw_image_info": json.dumps(images[image_id]),
            "raw_sentences": json.dumps(sents), "image_path": f"coco/train2014/{images[image_id]['file_name']}",
            "bbox": [x, y, x + w, y + h], "captions": [s["raw"] for s in sents],
            "global_image_id": f"coco.{image_id}", "anns_id": str(ann_id),
        })  # fmt: skip
    return rows


def write_hub_copy(folder: Path, dataset: str, split_by: str, rows: list[dict] | None = None) -> Path:
    """``folder/data/{split}-0000i-of-0000n.parquet`` as on the Hub; train in two files, rows out of ref_id order."""
    rows = hub_rows(dataset, split_by) if rows is None else rows
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for split in dict.fromkeys(r["split"] for r in rows):
        part = [r for r in reversed(rows) if r["split"] == split]
        chunks = [part[: len(part) // 2], part[len(part) // 2 :]] if split == "train" else [part]
        for i, chunk in enumerate(chunks):
            pq.write_table(pa.Table.from_pylist(chunk, schema=SCHEMA), folder / "data" / f"{split}-{i:05d}-of-{len(chunks):05d}-abc123.parquet")
    return folder


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)
    return path
