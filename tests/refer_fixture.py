"""A miniature RefCOCO / RefCOCO+ / RefCOCOg in the real formats, for tests and benchmarks.

- ``refs(*).p``: protocol-2 pickles written with Python 2's opcodes (byte strings as BINSTRING,
  text as BINUNICODE), keys and most strings as bytes, one non-ASCII sentence in each encoding.
- ``instances.json``: COCO format with single polygons, two overlapping polygons in one annotation,
  uncompressed RLE (counts list), compressed RLE (counts string), an RLE of an empty mask, and an
  empty segmentation.
- images: JPEGs named ``COCO_train2014_%012d.jpg``, one PNG, one missing file, one corrupt file.
- splits: unc (train/val/testA/testB), umd (train/val/test), google (train/val).

Expected counts are computed here from the tables, independently of ``shared_ris.data``.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

# image id -> (width, height, kind); kind: jpg, png, missing (listed but no file), corrupt
IMAGES = {
    1: (64, 48, "jpg"), 2: (80, 60, "jpg"), 3: (72, 56, "jpg"), 4: (64, 64, "jpg"), 5: (60, 40, "png"),
    6: (50, 50, "missing"), 7: (64, 48, "jpg"), 8: (48, 64, "jpg"), 9: (64, 48, "corrupt"),
}
# ann id -> (image id, category, segmentation kind)
ANNS = {
    101: (1, 1, "polygon"), 102: (1, 2, "overlapping"), 103: (2, 1, "rle"), 104: (3, 3, "crle"),
    105: (4, 2, "polygon"), 106: (5, 1, "polygon"), 107: (6, 1, "polygon"), 108: (7, 1, "none"),
    109: (8, 3, "rle"), 110: (2, 2, "polygon"), 111: (9, 1, "polygon"), 112: (4, 2, "empty"), 113: (4, 1, "overlapping"),
}
NON_ASCII_UTF8 = "café au lait, naïve — 日本の犬"
NON_ASCII_UNICODE = "der große Bär über dem Fluß"
# (dataset, split_by) -> [(ref_id, ann_id, split, [sentence, ...])]; a sentence is one text for both
# `raw` and `sent`, or a (raw, sent) pair; "" is an empty text (the refer API has them: LAVT scores them)
REFS = {
    ("refcoco", "unc"): [
        (1, 101, "train", ["the left cup", "cup on the left"]),
        (2, 102, "train", ["the overlapping thing"]),
        (3, 103, "train", ["the rle mask", ""]),
        (4, 104, "train", ["compressed rle", NON_ASCII_UTF8]),
        (5, 108, "train", ["no segmentation here"]),
        (6, 107, "train", ["image file is missing"]),
        (12, 111, "train", ["image file is corrupt"]),
        (13, 110, "train", ["second object of image two"]),
        (7, 105, "val", ["the square", NON_ASCII_UNICODE]),
        (8, 105, "val", ["same object, other ref", " "]),
        (9, 106, "testA", ["png picture"]),
        (10, 109, "testB", ["tall image"]),
        (11, 109, "testB", ["", ""]),
        (14, 112, "testB", [("?", ""), "nothing to see here"]),  # an empty mask; a raw text whose sent is empty
        (15, 113, "testB", [("?!", "")]),  # punctuation only: the refer API's sent is empty, raw is not
    ],
    ("refcoco+", "unc"): [
        (1, 105, "train", ["plus, on refcoco's val image"]),
        (2, 101, "train", ["plus left"]),
        (3, 109, "val", ["plus val"]),
        (4, 106, "testA", ["plus testA"]),
        (5, 105, "testB", ["plus testB"]),
    ],
    ("refcocog", "umd"): [
        (1, 101, "train", ["g umd train one", "a longer umd sentence"]),
        (2, 109, "train", ["g umd on refcoco testB image"]),
        (3, 104, "train", ["g umd on google val image"]),
        (4, 105, "val", ["g umd val"]),
        (5, 106, "test", ["g umd test"]),
    ],
    ("refcocog", "google"): [
        (1, 101, "train", ["g google train"]),
        (2, 110, "train", ["g google train two"]),
        (3, 104, "val", ["g google val"]),
    ],
}
SKIP_REASONS = {"missing": "image missing", "corrupt": "image unreadable", "none": "annotation without segmentation"}


# -- pickles as Python 2 writes them ---------------------------------------------------------------


class Py2Pickler(pickle._Pickler):
    """Writes ``bytes`` as Python 2's ``str`` (SHORT_BINSTRING / BINSTRING), not via _codecs.encode."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def texts(sentence: str | tuple[str, str]) -> tuple[str, str]:
    """A REFS sentence → (raw, sent)."""
    return sentence if isinstance(sentence, tuple) else (sentence, sentence)


def py2_dumps(obj) -> bytes:
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def _py2_ref(dataset: str, ref_id: int, ann_id: int, split: str, sentences: list[str]) -> dict:
    image_id, category, _ = ANNS[ann_id]
    sents = []
    for k, sentence in enumerate(sentences):
        sent_id = ref_id * 100 + k
        raw, sent = texts(sentence)
        # py2 refs mix str (bytes) and unicode: the Unicode-only sentence stays text, the rest are bytes
        py2 = lambda text: text if text == NON_ASCII_UNICODE else text.encode("utf-8")  # noqa: E731
        sents.append({b"tokens": [w.encode("utf-8") for w in sent.split()], b"raw": py2(raw), b"sent": py2(sent), b"sent_id": sent_id})
    return {
        b"ref_id": ref_id, b"ann_id": ann_id, b"image_id": image_id, b"split": split.encode(),
        b"sentences": sents, b"category_id": category, b"sent_ids": [s[b"sent_id"] for s in sents],
        b"file_name": f"COCO_train2014_{image_id:012d}_{ref_id}.jpg".encode(),
    }


# -- masks ------------------------------------------------------------------------------------------


def _box_polygon(x0, y0, x1, y1) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _blob(width: int, height: int, seed: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    cx, cy = width * (0.3 + 0.1 * (seed % 4)), height * 0.5
    return (((xx - cx) / (width * 0.25)) ** 2 + ((yy - cy) / (height * 0.3)) ** 2 <= 1).astype(np.uint8)


def _uncompressed_rle(mask: np.ndarray) -> dict:
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def segmentation(ann_id: int):
    image_id, _, kind = ANNS[ann_id]
    width, height, _ = IMAGES[image_id]
    if kind == "polygon":
        return [_box_polygon(width * 0.2, height * 0.2, width * 0.6, height * 0.7)]
    if kind == "overlapping":  # two polygons sharing a region: the union keeps it foreground
        return [_box_polygon(5, 5, 35, 30), _box_polygon(20, 15, 55, 42)]
    if kind == "rle":
        return _uncompressed_rle(_blob(width, height, ann_id))
    if kind == "crle":
        rle = mask_utils.encode(np.asfortranarray(_blob(width, height, ann_id)))
        return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    if kind == "empty":  # a mask without a single pixel
        return _uncompressed_rle(np.zeros((height, width), np.uint8))
    return []


def _instances() -> dict:
    return {
        "images": [{"id": i, "file_name": f"COCO_train2014_{i:012d}.{'png' if kind == 'png' else 'jpg'}", "width": w, "height": h} for i, (w, h, kind) in IMAGES.items()],
        "annotations": [
            {
                "id": a, "image_id": img, "category_id": cat, "segmentation": segmentation(a), "iscrowd": int(kind in ("rle", "crle")),
                "area": 100.0, "bbox": [1.0, 2.0, 10.0, 12.0],
            }
            for a, (img, cat, kind) in ANNS.items()
        ],
        "categories": [{"id": c, "name": f"category{c}", "supercategory": "thing"} for c in (1, 2, 3)],
    }


def _write_image(path: Path, image_id: int, width: int, height: int, kind: str) -> None:
    rng = np.random.default_rng(image_id)
    pixels = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    if kind == "jpg":
        Image.fromarray(pixels).save(path, format="JPEG", quality=90)
    elif kind == "png":
        Image.fromarray(pixels).save(path, format="PNG")
    elif kind == "corrupt":
        path.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")


# -- the fixture --------------------------------------------------------------------------------------


@dataclass
class ReferFixture:
    refer_root: Path
    images_dir: Path

    @staticmethod
    def refs(dataset: str, split_by: str, split: str | None = None) -> list[tuple]:
        return [r for r in REFS[(dataset, split_by)] if split is None or r[2] == split]

    @staticmethod
    def usable(ann_id: int) -> bool:
        image_id, _, kind = ANNS[ann_id]
        return kind != "none" and IMAGES[image_id][2] in ("jpg", "png")

    @staticmethod
    def empty_mask(ann_id: int) -> bool:
        return ANNS[ann_id][2] == "empty"

    def expected(self, dataset: str, split_by: str, split: str, exclude_images: set[int] = frozenset()) -> dict:
        """samples, sentences, images of a split as the spec says they must come out: every ref that
        can be written (image readable, segmentation present) with every one of its sentences."""
        kept = [
            (ref_id, ann_id, sents)
            for ref_id, ann_id, _, sents in self.refs(dataset, split_by, split)
            if ANNS[ann_id][0] not in exclude_images and self.usable(ann_id)
        ]
        return {"samples": len(kept), "sentences": sum(len(s) for _, _, s in kept), "images": len({ANNS[a][0] for _, a, _ in kept})}

    def expected_flags(self, dataset: str, split_by: str, split: str) -> dict:
        """The manifest's flag counts of a split: empty masks, empty texts per field, trainable refs per field."""
        kept = [(ann_id, sents) for _, ann_id, _, sents in self.refs(dataset, split_by, split) if self.usable(ann_id)]
        flags = {"empty_mask_samples": sum(self.empty_mask(a) for a, _ in kept), "empty_text_sentences": {}, "trainable_samples": {}}
        for index, field in enumerate(("raw", "sent")):
            filled = [[t for t in (texts(s)[index] for s in sents) if t.strip()] for _, sents in kept]
            flags["empty_text_sentences"][field] = sum(len(sents) - len(f) for (_, sents), f in zip(kept, filled))
            flags["trainable_samples"][field] = sum(bool(f) and not self.empty_mask(a) for (a, _), f in zip(kept, filled))
        return flags

    @staticmethod
    def refer_api_counts(dataset: str, split_by: str, split: str) -> tuple[int, int]:
        """(refs, sentences) of a split as the refer API lists them: every sentence of every ref."""
        refs = ReferFixture.refs(dataset, split_by, split)
        return len(refs), sum(len(sents) for _, _, _, sents in refs)

    @staticmethod
    def held_out_images() -> set[int]:
        keys = [("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd"), ("refcocog", "google")]
        return {ANNS[ann][0] for key in keys for _, ann, split, _ in REFS[key] if split != "train"}


def build_refer_fixture(root: str | Path) -> ReferFixture:
    """Write the miniature refer root and image folder under ``root``."""
    root = Path(root)
    refer_root, images_dir = root / "refer", root / "train2014"
    images_dir.mkdir(parents=True, exist_ok=True)
    for image_id, (width, height, kind) in IMAGES.items():
        extension = "png" if kind == "png" else "jpg"
        _write_image(images_dir / f"COCO_train2014_{image_id:012d}.{extension}", image_id, width, height, kind)
    instances = json.dumps(_instances())
    for (dataset, split_by), refs in REFS.items():
        folder = refer_root / dataset
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "instances.json").write_text(instances)
        (folder / f"refs({split_by}).p").write_bytes(py2_dumps([_py2_ref(dataset, *ref) for ref in refs]))
    return ReferFixture(refer_root, images_dir)


# -- altered copies, for tests of malformed and hostile files ----------------------------------------


def py2_refs(dataset: str = "refcoco", split_by: str = "unc") -> list[dict]:
    """The fixture's refs as Python 2 holds them (byte-string keys and values), to alter before :func:`py2_dumps`."""
    return [_py2_ref(dataset, *ref) for ref in REFS[(dataset, split_by)]]


def instances_document() -> dict:
    """The fixture's ``instances.json`` content, to alter before :func:`write_refer_root` writes it."""
    return _instances()


def write_refer_root(root: str | Path, dataset: str = "refcoco", split_by: str = "unc", refs_bytes: bytes | None = None, instances: dict | None = None) -> Path:
    """A refer root holding only ``dataset``: ``refs_bytes`` and ``instances`` where given, else the fixture's files."""
    folder = Path(root) / dataset
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"refs({split_by}).p").write_bytes(py2_dumps(py2_refs(dataset, split_by)) if refs_bytes is None else refs_bytes)
    (folder / "instances.json").write_text(json.dumps(_instances() if instances is None else instances))
    return Path(root)


# -- pytest fixtures, imported by the test modules that use them -----------------------------------------


@pytest.fixture(scope="module")
def fixture(tmp_path_factory) -> ReferFixture:
    """The miniature refer root and image folder, once per test module."""
    return build_refer_fixture(tmp_path_factory.mktemp("refer"))


@pytest.fixture(scope="module")
def refcoco(fixture, tmp_path_factory) -> tuple[Path, dict]:
    """(output folder, manifest) of the fixture's RefCOCO (unc), 2 refs per shard."""
    from shared_ris.data import prepare_refer

    out = tmp_path_factory.mktemp("refcoco-out")
    return out, prepare_refer("refcoco", fixture.refer_root, fixture.images_dir, out, shard_size=2, workers=1)
