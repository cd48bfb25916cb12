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
import re
import warnings
from pathlib import Path, PurePath
from typing import Any, Callable

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from .errors import DataError, short_repr
from .safe_pickle import load_pickle
from .sample import MAX_SAMPLE_PIXELS
from .transforms import encode_mask_png

DATASETS = ("refcoco", "refcoco+", "refcocog")
DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")
IMAGE_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif"}  # PIL format → shard member


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


REFS_HINT = "is this a refer API refs file? re-download it"
INSTANCES_HINT = "is this the COCO-format instances.json from the refer API downloads? re-download it"
SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")  # it becomes part of shard file names: no '/', '.' or '..'


ID_LIMIT = 2**63  # ids are COCO's int64; a pickle can hold an integer too long even to print


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < ID_LIMIT


_MISSING = object()


def _wrong(path: str | Path, where: str, field: str, expected: str, value: Any, hint: str) -> DataError:
    got = "nothing" if value is _MISSING else short_repr(value)
    return DataError(f"{path}: {where}: '{field}' must be {expected}, got {got}; {hint}")


def _require_dict(path: str | Path, where: str, value: Any, what: str, hint: str) -> None:
    if not isinstance(value, dict):
        raise DataError(f"{path}: {where} is {short_repr(value)}, not {what}; {hint}")


def _check_sentence(path: str | Path, where: str, sentence: Any, hint: str = REFS_HINT) -> None:
    _require_dict(path, where, sentence, "a sentence dict {sent_id, sent, raw, tokens}", hint)
    # sent_id names the expression in eval's records and saved masks: every sentence needs its own
    if not _is_id(sentence.get("sent_id")):
        raise _wrong(path, where, "sent_id", "a non-negative integer", sentence.get("sent_id", _MISSING), hint)
    for field in ("sent", "raw"):  # absent means empty: kept as an empty text, flagged for training
        if field in sentence and not isinstance(sentence[field], str):
            raise _wrong(path, where, field, "a string", sentence[field], hint)


def ref_with_keys(path: str | Path, where: str, ref: Any, keys: tuple[str, ...], hint: str) -> str:
    """Checks that ``ref`` is a dict holding ``keys``; returns how to name it ("ref 12" once its id is known)."""
    if not isinstance(ref, dict):
        raise DataError(f"{path}: {where} is a {type(ref).__name__}, not a ref dict; {hint}")
    if _is_id(ref.get("ref_id")) and where.startswith("refs["):
        where = f"ref {ref['ref_id']}"
    missing = [k for k in keys if k not in ref]
    if missing:
        raise DataError(f"{path}: {where} lacks {', '.join(missing)}; {hint}")
    return where


def check_ref(path: str | Path, where: str, ref: Any, hint: str = REFS_HINT) -> None:
    """Types of every field :func:`ref_item` reads; a one-line DataError naming ``where`` otherwise."""
    where = ref_with_keys(path, where, ref, REF_KEYS, hint)
    for field in ("ref_id", "ann_id", "image_id") + (("category_id",) if "category_id" in ref else ()):
        if not _is_id(ref[field]):
            raise _wrong(path, where, field, "a non-negative integer", ref[field], hint)
    check_split_and_sentences(path, where, ref, hint)


def check_split_and_sentences(path: str | Path, where: str, ref: dict, hint: str) -> None:
    """A ref's ``split`` (a name usable in file names) and ``sentences`` (a list of sentence dicts)."""
    if not isinstance(ref["split"], str) or not SPLIT_NAME.fullmatch(ref["split"]):
        raise _wrong(path, where, "split", "a split name such as 'train' or 'testA' (letters, digits, '_', '-')", ref["split"], hint)
    if not isinstance(ref["sentences"], list):
        raise _wrong(path, where, "sentences", "a list of sentence dicts", ref["sentences"], hint)
    for k, sentence in enumerate(ref["sentences"]):
        _check_sentence(path, f"{where} sentence {k}", sentence, hint)


def load_refs(path: str | Path) -> list[dict]:
    """The refs list with byte strings decoded, every field the preparation reads type-checked and
    ref_ids unique (they become sample keys); a one-line DataError naming the ref otherwise."""
    return checked_refs(path, load_pickle(path), check_ref, "a pickled list of ref dicts (refer API refs file)", "re-download the refs file")


def checked_refs(path: str | Path, refs: Any, check: Callable[[str | Path, str, Any], None], expected: str, fix: str) -> list[dict]:
    """``refs`` if it is a non-empty list whose every ref passes ``check(path, where, ref)`` and whose
    ref_ids are unique; a one-line DataError otherwise."""
    if not isinstance(refs, list) or not refs:
        got = "an empty list" if isinstance(refs, list) else f"a {type(refs).__name__}"
        raise DataError(f"{path}: expected {expected}, got {got}; {fix}")
    first_index: dict[int, int] = {}
    for index, ref in enumerate(refs):
        check(path, f"refs[{index}]", ref)
        first = first_index.setdefault(ref["ref_id"], index)
        if first != index:
            raise DataError(f"{path}: ref {ref['ref_id']}: ref_id appears twice (refs[{first}] and refs[{index}]) but it is the sample key; {fix}")
    return refs


def check_image_entry(path: str | Path, where: str, image: dict, hint: str = INSTANCES_HINT) -> None:
    for field in ("width", "height"):
        if not _is_id(image.get(field)) or image[field] == 0:
            raise _wrong(path, where, field, "a positive integer", image.get(field, _MISSING), hint)
    name = image.get("file_name")
    if name is None:
        return  # the COCO_train2014_%012d.jpg pattern is used instead
    if not isinstance(name, str):
        raise _wrong(path, where, "file_name", "a string", name, hint)
    # lexical only (unlike fileio.confined): train2014/ may legitimately be a folder of symbolic links
    candidate = PurePath(name)
    if candidate.is_absolute() or candidate.drive or ".." in candidate.parts or "\x00" in name:
        raise _wrong(path, where, "file_name", "a name inside the --images folder", name, hint)


def check_annotation(path: str | Path, where: str, ann: dict, hint: str = INSTANCES_HINT) -> None:
    for field in ("image_id",) + (("category_id",) if "category_id" in ann else ()):
        if not _is_id(ann.get(field)):
            raise _wrong(path, where, field, "a non-negative integer", ann.get(field, _MISSING), hint)
    bbox = ann.get("bbox")
    if bbox is not None and not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
        raise _wrong(path, where, "bbox", "4 numbers (x, y, width, height)", bbox, hint)


def _index_by_id(path: str | Path, coco: dict, section: str, check) -> dict[int, dict]:
    """``coco[section]`` (a list of dicts with unique integer ids) by id, each entry checked."""
    entries = coco.get(section)
    if not isinstance(entries, list):
        raise _wrong(path, "top level", section, "a list of dicts", entries if section in coco else _MISSING, INSTANCES_HINT)
    by_id: dict[int, dict] = {}
    for index, entry in enumerate(entries):
        where = f"{section}[{index}]"
        _require_dict(path, where, entry, "a dict", INSTANCES_HINT)
        if not _is_id(entry.get("id")):
            raise _wrong(path, where, "id", "a non-negative integer", entry.get("id", _MISSING), INSTANCES_HINT)
        where = f"{section}[{index}] (id {entry['id']})"
        check(path, where, entry)
        if entry["id"] in by_id:
            raise DataError(f"{path}: {where}: id {entry['id']} appears twice in '{section}'; {INSTANCES_HINT}")
        by_id[entry["id"]] = entry
    return by_id


def read_json_file(path: str | Path, what: str, fix: str) -> Any:
    """A JSON file's content; unreadable or malformed is one DataError line saying it is not ``what``."""
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: nesting too deep for the parser
        detail = (str(exc).strip().splitlines() or [""])[0][:160]
        raise DataError(f"{path}: not {what} ({type(exc).__name__}: {detail}); {fix}") from None


def load_instances(path: str | Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """``instances.json`` → (images by id, annotations by id), every field the preparation reads
    type-checked; a one-line DataError naming the entry otherwise."""
    coco = read_json_file(path, "a COCO instances file", "re-download it")
    if not isinstance(coco, dict):
        raise DataError(f"{path}: expected a JSON object with 'images' and 'annotations', got {type(coco).__name__}; {INSTANCES_HINT}")
    return _index_by_id(path, coco, "images", check_image_entry), _index_by_id(path, coco, "annotations", check_annotation)


def annotation_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """COCO segmentation → (H, W) uint8 in {0, 1}, as the COCO API's ``annToMask`` computes it.

    Polygons are merged as a UNION (overlapping parts stay foreground); uncompressed RLE (counts
    list) and compressed RLE (counts string) are decoded as they are. The refer API's ``getMask``
    instead sums the polygons and LAVT keeps only pixels equal to 1, so where two polygons of one
    annotation overlap its ground truth is background and ours foreground (documented in the README).
    """
    if isinstance(segmentation, dict) and segmentation.get("size") != [height, width]:
        # an RLE decodes at its own size: a tiny entry saying [50000, 50000] would be a 2.5 GB mask
        size = segmentation.get("size")
        shown = size if isinstance(size, list) and all(isinstance(v, int) for v in size) else "not a pair of integers"
        raise ValueError(f"RLE size {shown} is not the image's [{height}, {width}]")
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
    elif ann["image_id"] != ref["image_id"]:  # refs and instances.json of different datasets
        skip = f"annotation on another image (annotation {ref['ann_id']} is on image {ann['image_id']}, the ref says {ref['image_id']})"
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


def _check_image(path: str, data: bytes, width: int, height: int) -> tuple[str | None, str | None]:
    """(the shard member name for the image, None) when usable, else (None, the reason to skip).
    Checked from the header first (size, pixel bound), then decoded fully, once per image."""
    if _last_image.get("path") != path:
        extension, problem = None, None
        try:
            with Image.open(io.BytesIO(data)) as im:
                # the member name follows the format, not the file name: "x.json" must not become the json member
                extension = IMAGE_FORMATS.get(im.format or "")
                if extension is None:
                    problem = f"unsupported image format {im.format}"
                elif im.size != (width, height):  # a mismatched image (a decompression bomb, say) is never decoded
                    # worded alike for instances.json and the parquet route's raw_image_info: the manifest must not depend on the route
                    problem = f"image is {im.size[0]}x{im.size[1]} but its COCO image entry says {width}x{height}"
                elif width * height > MAX_SAMPLE_PIXELS:
                    problem = f"image of {width}x{height} pixels, over the {MAX_SAMPLE_PIXELS} that readers accept"
                else:
                    im.load()
        except Exception as exc:  # PIL raises many types for corrupt files
            problem = f"image unreadable ({type(exc).__name__})"
        _last_image.clear()
        _last_image.update(path=path, extension=extension, problem=problem)
    return (None, _last_image["problem"]) if _last_image["problem"] else (_last_image["extension"], None)


def _item_mask(item: dict) -> np.ndarray:
    """The item's one ``segmentation``, or the union of its ``segmentations`` (gRefCOCO; none: empty)."""
    height, width = item["height"], item["width"]
    if "segmentations" not in item:
        return annotation_mask(item["segmentation"], height, width)
    mask = np.zeros((height, width), np.uint8)
    for segmentation in item["segmentations"]:
        mask |= annotation_mask(segmentation, height, width)
    return mask


def make_refer_sample(item: dict) -> tuple[dict | None, list[dict]]:
    """An item → (shard sample or None, skip records). Runs in worker processes.

    Every sentence is kept with its text as it is, an empty one included, and a ref whose mask is
    empty is kept with an all-zero ``mask.png`` and ``"empty_mask": true``: evaluation scores every
    expression the refer API lists; training skips what it cannot learn from (see :mod:`.loader`).
    Only a ref that cannot be written at all is skipped (image missing or unreadable, no mask).
    """

    def skipped(reason: str, **extra) -> dict:
        return {"dataset": item["dataset"], "split": item["split"], "ref_id": item["ref_id"], "reason": reason, **extra}

    if item["skip"]:
        return None, [skipped(item["skip"])]
    if not item["sentences"]:  # a sample needs at least one expression (readers refuse an empty list)
        return None, [skipped("no sentence")]
    path = item["image_path"]
    try:
        image_bytes = Path(path).read_bytes()
    except OSError:
        return None, [skipped("image missing", path=path)]
    extension, problem = _check_image(path, image_bytes, item["width"], item["height"])
    if problem:
        return None, [skipped(problem, path=path)]
    try:
        mask = _item_mask(item)
    except Exception as exc:  # pycocotools raises bare Exceptions on malformed input
        return None, [skipped(f"bad segmentation ({exc})")]
    meta = {k: item[k] for k in ("ref_id", "ann_id", "image_id", "category_id", "bbox", "split", "dataset", "width", "height")}
    meta["empty_mask"] = not mask.any()
    meta["sentences"] = item["sentences"]
    meta.update(item.get("meta", {}))
    sample = {
        "__key__": item["key"],
        extension: image_bytes,
        "mask.png": encode_mask_png(mask),
        "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
    }
    return sample, []
