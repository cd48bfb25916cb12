"""gRefCOCO (ReLA, CVPR 2023; henghuiding/gRefCOCO): expressions that name several objects or none.

Layout (what ReLA's ``G_REFER`` reads)::

    REFER_ROOT/grefcoco/grefs(unc).json   (some copies ship grefs(unc).p: read with the restricted unpickler)
    REFER_ROOT/grefcoco/instances.json    IMAGES/COCO_train2014_000000581857.jpg

A ref is a refer API ref whose ``ann_id`` and ``category_id`` are lists; ``ann_id == [-1]`` (and
``no_target: true`` where present) marks a no-target expression. Its mask is what ``G_REFER``'s
``getMaskByRef(merge=True)`` gives: the union of the listed annotations, crowd ones left out, and
empty for a no-target ref. Like ReLA's loader we drop polygons of fewer than 3 points; unlike
``getMask``, which sums a 2-D RLE over a third axis and fails, an RLE annotation is decoded as
COCO's ``annToMask`` does. Each sample's JSON keeps the list ``ann_id`` and ``target_count``
(0 for no target, else the number of listed annotations).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import DataError, short_repr
from .refer import (
    INSTANCES_HINT,
    _is_id,
    _wrong,
    check_images_dir,
    check_split_and_sentences,
    checked_refs,
    image_path,
    load_instances,
    read_json_file,
    ref_with_keys,
)
from .safe_pickle import load_pickle

DATASET = "grefcoco"
NO_TARGET = -1  # ann_id == [-1]: the expression names nothing in the image
GREFS_HINT = "is this gRefCOCO's grefs(unc).json? re-download it"
GREF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")


def grefs_file(refer_root: str | Path, split_by: str = "unc") -> Path:
    """``REFER_ROOT/grefcoco/grefs({split_by}).json``, else ``.p`` (as G_REFER looks for them)."""
    folder = Path(refer_root) / DATASET
    candidates = [folder / f"grefs({split_by}).json", folder / f"grefs({split_by}).p"]
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        raise DataError(f"{candidates[0]}: gRefCOCO refs not found (nor {candidates[1].name}); expected the gRefCOCO download under {folder}/")
    return found


def load_grefs(path: str | Path) -> list[dict]:
    """The refs list (JSON, or a pickle read with the restricted unpickler), every field the
    preparation reads type-checked and ref_ids unique; a one-line DataError naming the ref otherwise."""
    path = Path(path)
    refs = load_pickle(path) if path.suffix == ".p" else read_json_file(path, "a JSON refs file", GREFS_HINT)
    return checked_refs(path, refs, check_gref, "a list of gRefCOCO ref dicts", GREFS_HINT)


def check_gref(path: Path, where: str, ref: Any) -> None:
    """Types of every field :func:`gref_item` reads: ``ann_id`` a non-empty list of annotation
    ids, or ``[-1]``; ``no_target``, where present, saying the same."""
    where = ref_with_keys(path, where, ref, GREF_KEYS, GREFS_HINT)
    for field in ("ref_id", "image_id"):
        if not _is_id(ref[field]):
            raise _wrong(path, where, field, "a non-negative integer", ref[field], GREFS_HINT)
    ann_ids = ref["ann_id"]
    if not (isinstance(ann_ids, list) and ann_ids and (ann_ids == [NO_TARGET] or all(_is_id(a) for a in ann_ids))):
        raise _wrong(path, where, "ann_id", "a non-empty list of annotation ids, or [-1] for no target", ann_ids, GREFS_HINT)
    if "no_target" in ref and ref["no_target"] is not (ann_ids == [NO_TARGET]):
        raise DataError(f"{path}: {where}: 'no_target' is {short_repr(ref['no_target'])} but 'ann_id' is {short_repr(ann_ids)}; {GREFS_HINT}")
    check_split_and_sentences(path, where, ref, GREFS_HINT)


def _valid_polygons(segmentation: Any) -> Any:
    """ReLA's filter: polygons of fewer than 3 points (or an odd count of numbers) are dropped."""
    if isinstance(segmentation, list):
        return [p for p in segmentation if isinstance(p, list) and len(p) % 2 == 0 and len(p) >= 6]
    return segmentation


def _targets(ref: dict, anns: dict) -> tuple[list[Any], str | None]:
    """The segmentations whose union is the mask (crowd annotations left out), or a reason to skip."""
    if ref["ann_id"] == [NO_TARGET]:
        return [], None
    segmentations = []
    for ann_id in ref["ann_id"]:
        ann = anns.get(ann_id)
        if ann is None:
            return [], f"annotation {ann_id} not in instances.json"
        if ann["image_id"] != ref["image_id"]:
            return [], f"annotation on another image (annotation {ann_id} is on image {ann['image_id']}, the ref says {ref['image_id']})"
        if ann.get("iscrowd"):
            continue  # as G_REFER.getMaskByRef
        segmentation = _valid_polygons(ann.get("segmentation"))
        if not segmentation:
            return [], f"annotation {ann_id} without segmentation"
        segmentations.append(segmentation)
    return segmentations, None


def gref_item(ref: dict, images: dict, anns: dict, images_dir: Path) -> dict:
    """One ref → an item for :func:`shared_ris.data.refer.make_refer_sample` (its ``segmentations``
    are unioned; ``meta`` goes into the sample's JSON as it is)."""
    image = images.get(ref["image_id"])
    segmentations, skip = _targets(ref, anns)
    if image is None:
        skip = f"image {ref['image_id']} not in instances.json"
    no_target = ref["ann_id"] == [NO_TARGET]
    return {
        "key": f"{DATASET}-{ref['ref_id']:08d}", "ref_id": ref["ref_id"], "ann_id": ref["ann_id"], "image_id": ref["image_id"],
        "category_id": ref.get("category_id"), "bbox": None, "split": ref["split"], "dataset": DATASET,
        "width": image["width"] if image else None, "height": image["height"] if image else None,
        "sentences": [{"sent_id": s.get("sent_id"), "sent": s.get("sent") or "", "raw": s.get("raw") or ""} for s in ref["sentences"]],
        "segmentations": segmentations,
        "meta": {"target_count": 0 if no_target else len(ref["ann_id"]), "no_target": no_target},
        "image_path": str(image_path(images_dir, image)) if image else None,
        "skip": skip,
    }  # fmt: skip


def grefcoco_files(refer_root: str | Path, split_by: str = "unc") -> tuple[Path, Path]:
    root = Path(refer_root)
    if not root.is_dir():
        raise DataError(f"{root}: refer root not found; expected a folder holding grefcoco/ (ReLA's datasets/ layout)")
    instances = root / DATASET / "instances.json"
    refs = grefs_file(root, split_by)
    if not instances.is_file():
        raise DataError(f"{instances}: not found; {INSTANCES_HINT}")
    return refs, instances


def load_grefcoco(refer_root: str | Path, images_dir: str | Path, split_by: str = "unc") -> tuple[list[dict], dict, dict, Path, dict]:
    """(refs, images by id, annotations by id, images folder, sources) for :func:`gref_item`."""
    refs_path, instances_path = grefcoco_files(refer_root, split_by)
    images_root = check_images_dir(images_dir)
    refs = load_grefs(refs_path)
    images, anns = load_instances(instances_path)
    sources = {"refs": str(refs_path.resolve()), "instances": str(instances_path.resolve()), "images": str(images_root.resolve())}
    return refs, images, anns, images_root, sources
