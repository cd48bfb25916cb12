"""A miniature gRefCOCO in the real on-disk format (ReLA's ``datasets/grefcoco/``), for tests.

- ``grefcoco/grefs(unc).json``: JSON refs whose ``ann_id`` and ``category_id`` are lists,
  ``[-1]`` for a no-target expression (with ``no_target: true``, and once without the key, as
  some copies have), sentences with ``tokens``, ``raw``, ``sent``, ``sent_id``.
- ``grefcoco/instances.json``: COCO format with a polygon, two overlapping polygons in one
  annotation, a compressed RLE, an uncompressed RLE, a crowd annotation and a degenerate polygon.
- images: ``COCO_train2014_%012d.jpg``.

The expected masks are computed here as ``G_REFER.getMaskByRef(merge=True)`` does, with
pycocotools: each non-crowd annotation decoded (polygons summed over their parts), the masks
summed and clipped to 1; independent of ``shared_ris.data``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from refer_fixture import _blob, _uncompressed_rle
from refer_fixture import _box_polygon as _box

# image id -> (width, height)
IMAGES = {1: (64, 48), 2: (80, 60)}
# ann id -> (image id, category, kind)
ANNS = {
    201: (1, 1, "polygon"), 202: (1, 2, "overlapping"), 203: (1, 3, "crle"), 204: (1, 1, "rle"),
    205: (1, 1, "crowd"), 206: (2, 2, "polygon"), 207: (2, 2, "crle"), 208: (2, 1, "degenerate"),
}
# (ref_id, ann_ids, split, sentences, no_target key: True / False / None = absent)
REFS = [
    (1, [201, 202], "train", ["the cup and the overlapping thing", "both of them"], False),
    (2, [203, 201], "train", ["the rle blob and the cup"], False),
    (3, [-1], "train", ["the purple elephant"], True),
    (4, [204], "val", ["the uncompressed blob"], False),
    (5, [-1], "val", ["nothing like this", "a unicorn"], None),
    (6, [201, 205], "testA", ["the cup and the crowd"], False),
    (7, [206, 207, 208], "testB", ["all three things on the second image"], False),
    (8, [-1], "testB", ["the giraffe"], True),
    (9, [203], "train", ["just the rle blob"], False),
]


def segmentation(ann_id: int):
    image_id, _, kind = ANNS[ann_id]
    width, height = IMAGES[image_id]
    if kind == "polygon":
        return [_box(width * 0.1, height * 0.1, width * 0.6, height * 0.6)]
    if kind == "overlapping":
        return [_box(30, 5, 50, 30), _box(40, 20, 60, 44)]
    if kind in ("crle", "crowd"):
        rle = mask_utils.encode(np.asfortranarray(_blob(width, height, ann_id)))
        return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    if kind == "rle":
        return _uncompressed_rle(_blob(width, height, ann_id))
    return [_box(2, 2, 20, 20), [1.0, 1.0, 5.0, 5.0]]  # "degenerate": a 2-point polygon ReLA drops


def expected_mask(ann_ids: list[int], width: int, height: int) -> np.ndarray:
    """getMaskByRef(merge=True), computed with pycocotools (an RLE decoded as annToMask does)."""
    if ann_ids == [-1]:
        return np.zeros((height, width), np.uint8)
    total = np.zeros((height, width), np.int64)
    for ann_id in ann_ids:
        if ANNS[ann_id][2] == "crowd":
            continue
        seg = segmentation(ann_id)
        if isinstance(seg, list):
            polygons = [p for p in seg if len(p) >= 6]
            total += np.sum(mask_utils.decode(mask_utils.frPyObjects(polygons, height, width)), axis=2).astype(np.int64)
        else:
            rle = mask_utils.frPyObjects(seg, height, width) if isinstance(seg["counts"], list) else seg
            total += mask_utils.decode(rle).astype(np.int64)
    return (total > 0).astype(np.uint8)


def _ref(ref_id: int, ann_ids: list[int], split: str, sentences: list[str], no_target: bool | None) -> dict:
    image_id = ANNS[ann_ids[0]][0] if ann_ids != [-1] else 1 + ref_id % 2
    ref = {
        "ref_id": ref_id, "image_id": image_id, "ann_id": ann_ids, "split": split,
        "category_id": [ANNS[a][1] for a in ann_ids] if ann_ids != [-1] else [-1],
        "sentences": [{"tokens": s.split(), "raw": s, "sent": s.lower(), "sent_id": ref_id * 10 + k} for k, s in enumerate(sentences)],
        "file_name": f"COCO_train2014_{image_id:012d}_{ref_id}.jpg",
    }  # fmt: skip
    if no_target is not None:
        ref["no_target"] = no_target
    return ref


@dataclass
class GRefCOCOFixture:
    root: Path
    images: Path

    def image_of(self, ref_id: int) -> int:
        return next(_ref(*ref)["image_id"] for ref in REFS if ref[0] == ref_id)


def write_grefcoco(root: Path) -> GRefCOCOFixture:
    """Write ``root/refer/grefcoco/{grefs(unc).json, instances.json}`` and ``root/train2014/``."""
    folder, images = root / "refer" / "grefcoco", root / "train2014"
    folder.mkdir(parents=True)
    images.mkdir(parents=True)
    (folder / "grefs(unc).json").write_text(json.dumps([_ref(*ref) for ref in REFS]))
    instances = {
        "images": [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "width": w, "height": h} for i, (w, h) in IMAGES.items()],
        "annotations": [
            {"id": a, "image_id": img, "category_id": cat, "segmentation": segmentation(a), "iscrowd": int(kind == "crowd"), "area": 1.0, "bbox": [0, 0, 1, 1]}
            for a, (img, cat, kind) in ANNS.items()
        ],
        "categories": [{"id": c, "name": f"category{c}", "supercategory": "thing"} for c in (1, 2, 3)],
    }  # fmt: skip
    (folder / "instances.json").write_text(json.dumps(instances))
    for image_id, (width, height) in IMAGES.items():
        pixels = (np.random.default_rng(image_id).random((height, width, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"COCO_train2014_{image_id:012d}.jpg", quality=90)
    return GRefCOCOFixture(root / "refer", images)
