"""The refer API's files, read directly: ``refs(*).p`` + ``instances.json`` + COCO ``train2014/``.

Layout (what the refer API expects under its ``data/`` folder)::

    REFER_ROOT/refcoco/refs(unc).p       REFER_ROOT/refcoco/instances.json
    REFER_ROOT/refcoco+/refs(unc).p      REFER_ROOT/refcoco+/instances.json
    REFER_ROOT/refcocog/refs(umd).p      REFER_ROOT/refcocog/refs(google).p   REFER_ROOT/refcocog/instances.json
    IMAGES/COCO_train2014_000000581857.jpg

A ref becomes one *item*: a plain dict with everything one sample needs, so a worker process can
turn it into shard entries (:func:`make_refer_sample`) without the 100 MB index.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from .errors import DataError
from .safe_pickle import load_pickle
from .transforms import encode_mask_png

DATASETS = ("refcoco", "refcoco+", "refcocog")
DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")
IMAGE_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png"}


def refs_file(refer_root: str | Path, dataset: str, split_by: str | None = None) -> Path:
    """``REFER_ROOT/{dataset}/refs({split_by}).p``; a one-line DataError when it is not there."""
    root = Path(refer_root)
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset '{dataset}'; choose one of {', '.join(DATASETS)}")
    split_by = split_by or DEFAULT_SPLIT_BY[dataset]
    if not root.is_dir():
        raise DataError(f"{root}: refer root not found; expected a folder holding {', '.join(d + '/' for d in DATASETS)} (the refer API's data/ layout)")
    path = root / dataset / f"refs({split_by}).p"
    if not path.is_file():
        found = sorted(p.name for p in (root / dataset).glob("refs(*).p")) if (root / dataset).is_dir() else []
        hint = f"found {', '.join(found)}; pick one with --split-by" if found else f"expected {root}/{dataset}/refs({split_by}).p from the refer API downloads"
        raise DataError(f"{path}: refs file not found; {hint}")
    return path


def instances_file(refer_root: str | Path, dataset: str) -> Path:
    path = Path(refer_root) / dataset / "instances.json"
    if not path.is_file():
        raise DataError(f"{path}: not found; expected the COCO-format instances.json that ships beside refs(*).p in {Path(refer_root) / dataset}/")
    return path


def check_images_dir(images_dir: str | Path) -> Path:
    path = Path(images_dir)
    if not path.is_dir():
        raise DataError(f"{path}: images folder not found; pass --images pointing at COCO train2014/ (COCO_train2014_000000000009.jpg ...)")
    return path


def load_refs(path: str | Path) -> list[dict]:
    """The refs list with byte strings decoded; a DataError if it does not look like a refs file."""
    refs = load_pickle(path)
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise DataError(f"{path}: expected a pickled list of ref dicts (refer API refs file), got {type(refs).__name__}")
    for ref in refs:
        missing = [k for k in REF_KEYS if k not in ref]
        if missing:
            raise DataError(f"{path}: ref {ref.get('ref_id', '?')} lacks {', '.join(missing)}; is this a refer API refs file?")
    return refs


def load_instances(path: str | Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """``instances.json`` → (images by id, annotations by id)."""
    try:
        with open(path, "rb") as f:
            coco = json.load(f)
        return {im["id"]: im for im in coco["images"]}, {ann["id"]: ann for ann in coco["annotations"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a COCO instances file ({type(exc).__name__}: {exc}); re-download it") from None


def annotation_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """COCO segmentation → (H, W) uint8 in {0, 1}, as the COCO API's ``annToMask`` computes it.

    Polygons are merged as a UNION (overlapping parts stay foreground); uncompressed RLE (counts
    list) and compressed RLE (counts string) are decoded as they are.
    """
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict):
        rle = segmentation
    else:
        raise ValueError(f"unknown segmentation type {type(segmentation).__name__}")
    with warnings.catch_warnings():  # pycocotools' Cython trips numpy 2's __array__(copy=) deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)


def image_path(images_dir: Path, image: dict) -> Path:
    """Where the image file is: instances.json's ``file_name``, else COCO's train2014 pattern."""
    named = images_dir / image["file_name"] if image.get("file_name") else None
    if named is not None and named.exists():
        return named
    pattern = images_dir / f"COCO_train2014_{image['id']:012d}.jpg"
    return pattern if pattern.exists() or named is None else named


def ref_item(ref: dict, dataset: str, images: dict, anns: dict, images_dir: Path) -> dict:
    """One ref → an item (plain, picklable). ``skip`` names a reason known before reading files."""
    ann = anns.get(ref["ann_id"])
    image = images.get(ref["image_id"])
    skip = None
    if ann is None:
        skip = f"annotation {ref['ann_id']} not in instances.json"
    elif image is None:
        skip = f"image {ref['image_id']} not in instances.json"
    elif not ann.get("segmentation"):
        skip = "annotation without segmentation"
    return {
        "key": f"{dataset}-{ref['ref_id']:08d}",
        "ref_id": ref["ref_id"],
        "ann_id": ref["ann_id"],
        "image_id": ref["image_id"],
        "category_id": ref.get("category_id", ann.get("category_id") if ann else None),
        "bbox": ann.get("bbox") if ann else None,
        "split": ref["split"],
        "dataset": dataset,
        "width": image["width"] if image else None,
        "height": image["height"] if image else None,
        "sentences": [{"sent_id": s.get("sent_id"), "sent": s.get("sent") or "", "raw": s.get("raw") or ""} for s in ref["sentences"]],
        "segmentation": ann.get("segmentation") if ann else None,
        "image_path": str(image_path(images_dir, image)) if image else None,
        "skip": skip,
    }


_last_image: dict[str, Any] = {}  # per process: refs of one image are neighbours, check it once


def _check_image(path: str, data: bytes, width: int, height: int) -> str | None:
    """Decode fully once per image; None when usable, else the reason to skip."""
    if _last_image.get("path") != path:
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                size = im.size
            problem = None if size == (width, height) else f"image is {size[0]}x{size[1]} but instances.json says {width}x{height}"
        except Exception as exc:  # PIL raises many types for corrupt files
            problem = f"image unreadable ({type(exc).__name__})"
        _last_image.clear()
        _last_image.update(path=path, problem=problem)
    return _last_image["problem"]


def make_refer_sample(item: dict) -> tuple[dict | None, list[dict]]:
    """An item → (shard sample or None, skip records). Runs in worker processes."""

    def skipped(reason: str, **extra) -> dict:
        return {"dataset": item["dataset"], "split": item["split"], "ref_id": item["ref_id"], "reason": reason, **extra}

    if item["skip"]:
        return None, [skipped(item["skip"])]
    skips = [skipped("empty sentence", sent_id=s["sent_id"]) for s in item["sentences"] if not (s["sent"].strip() and s["raw"].strip())]
    sentences = [s for s in item["sentences"] if s["sent"].strip() and s["raw"].strip()]
    if not sentences:
        return None, skips + [skipped("no non-empty sentence")]
    path = item["image_path"]
    try:
        image_bytes = Path(path).read_bytes()
    except OSError:
        return None, skips + [skipped("image missing", path=path)]
    problem = _check_image(path, image_bytes, item["width"], item["height"])
    if problem:
        return None, skips + [skipped(problem, path=path)]
    try:
        mask = annotation_mask(item["segmentation"], item["height"], item["width"])
    except Exception as exc:  # pycocotools raises bare Exceptions on malformed input
        return None, skips + [skipped(f"bad segmentation ({exc})")]
    if not mask.any():
        return None, skips + [skipped("empty mask")]
    meta = {k: item[k] for k in ("ref_id", "ann_id", "image_id", "category_id", "bbox", "split", "dataset", "width", "height")}
    meta["sentences"] = sentences
    extension = IMAGE_EXTENSIONS.get(Path(path).suffix.lower(), Path(path).suffix.lower().lstrip("."))
    sample = {
        "__key__": item["key"],
        extension: image_bytes,
        "mask.png": encode_mask_png(mask),
        "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
    }
    return sample, skips
