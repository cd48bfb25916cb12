"""A referring-shapes set in the shard format, so the whole toolkit runs offline.

Every image holds 3-6 coloured circles, squares and triangles, large or small, on a textured
background, drawn in z-order (overlaps allowed). The target always shares its colour with one
object and its shape with another, so neither word alone finds it; each expression is a query
over attributes ("the small red circle") that is checked to select exactly the target before it is
kept. ``spatial=True`` adds relational queries ("the leftmost red one", "the triangle at the
bottom"); they are off by default because the ``tiny`` recipe stays at chance on them after its
10-minute quickstart (a relation takes far longer to learn from scratch than an attribute).
The mask is the target's visible part. A sample is a pure function of (seed, split, index), so
the set is the same whatever the number of workers.
"""

from __future__ import annotations

import io
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
from PIL import Image

from ..fileio import write_bytes_atomic
from .errors import DataError
from .shards import DEFAULT_SHARD_SIZE, Progress, write_dataset
from .transforms import encode_mask_png

DATASET = "synthetic"
SPLITS = ("train", "val", "test")
EXAMPLES = "examples"  # loose images for `sris predict`, drawn from a random stream of their own
STREAMS = {**{split: i for i, split in enumerate(SPLITS)}, EXAMPLES: len(SPLITS)}
COLOURS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 85, 225), "yellow": (235, 205, 40)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (0.085, 0.105), "large": (0.16, 0.2)}  # half-extent as a fraction of the image side
MIN_VISIBLE = 0.6  # every object keeps at least this share of its pixels, so its attributes stay visible
MARGIN = 0.12  # "leftmost" needs a lead of this share of the image side over the runner-up

ATTRIBUTE_TEMPLATES = {
    ("colour", "shape"): ("the {colour} {shape}", "{colour} {shape}", "the {shape} that is {colour}"),
    ("size", "shape"): ("the {size} {shape}", "{size} {shape}", "the {shape} that is {size}"),
    ("size", "colour"): ("the {size} {colour} one", "the {size} {colour} shape"),
    ("size", "colour", "shape"): ("the {size} {colour} {shape}",),
}
# {thing} is "{shape}" or "{colour} one"; "on the left" for a pair, "leftmost" for any group
SPATIAL_TEMPLATES = {
    "left": ("the {thing} on the left", "the leftmost {thing}"),
    "right": ("the {thing} on the right", "the rightmost {thing}"),
    "top": ("the {thing} at the top", "the topmost {thing}"),
    "bottom": ("the {thing} at the bottom", "the lowest {thing}"),
}
# Generalized set (gRefCOCO-style): several targets named by a plural group, or none. {group} is the
# plural noun phrase of an attribute combination; "both"/"two"/"three" only when the count is right.
PLURAL_GROUPS = {
    ("colour",): "{colour} shapes",
    ("shape",): "{shape}s",
    ("colour", "shape"): "{colour} {shape}s",
    ("size", "shape"): "{size} {shape}s",
    ("size", "colour"): "{size} {colour} shapes",
}
PLURAL_TEMPLATES = ("the {group}", "all the {group}")
COUNT_TEMPLATES = {2: ("both {group}", "the two {group}"), 3: ("the three {group}",)}
KIND_ODDS = {"one": 0.4, "several": 0.3, "none": 0.3}  # of a generalized ref's target kind

# The words only relational expressions use ("left", "leftmost", …), e.g. to score them apart.
RELATION_WORDS = frozenset(
    word for templates in SPATIAL_TEMPLATES.values() for t in templates for word in t.split()
) - {"the", "{thing}", "on", "at"}


@dataclass
class Shape:
    shape: str
    colour: str
    size: str
    cx: float
    cy: float
    r: float

    def pixels(self, grid_y: np.ndarray, grid_x: np.ndarray) -> np.ndarray:
        dx, dy = grid_x - self.cx, grid_y - self.cy
        if self.shape == "circle":
            return dx * dx + dy * dy <= self.r * self.r
        if self.shape == "square":
            return (np.abs(dx) <= self.r) & (np.abs(dy) <= self.r)
        # triangle pointing up, inscribed in the square: apex (0, -r), base corners (±r, r)
        return (dy <= self.r) & (2 * np.abs(dx) <= dy + self.r)


# -- expressions ------------------------------------------------------------------------------------


def _select(objects: list[Shape], attrs: dict[str, str], direction: str | None, size: int) -> int | None:
    """The index of the single object the query picks, or None when it picks none or several."""
    group = [i for i, o in enumerate(objects) if all(getattr(o, k) == v for k, v in attrs.items())]
    if direction is None:
        return group[0] if len(group) == 1 else None
    if len(group) < 2:
        return None  # "the leftmost red one" presumes several red ones
    sign, axis = {"left": (1, "cx"), "right": (-1, "cx"), "top": (1, "cy"), "bottom": (-1, "cy")}[direction]
    ranked = sorted(group, key=lambda i: sign * getattr(objects[i], axis))
    lead = sign * (getattr(objects[ranked[1]], axis) - getattr(objects[ranked[0]], axis))
    return ranked[0] if lead >= MARGIN * size else None


def expressions(
    objects: list[Shape], target: int, size: int, rng: np.random.Generator, spatial: bool = True
) -> list[tuple[str, str]]:
    """Every (kind, text) that selects exactly ``objects[target]``, one random phrasing per query;
    attribute queries only unless ``spatial``."""
    t = objects[target]
    found = []
    for keys, templates in ATTRIBUTE_TEMPLATES.items():
        attrs = {k: getattr(t, k) for k in keys}
        if _select(objects, attrs, None, size) == target:
            found.append(("+".join(keys), str(rng.choice(templates)).format(**attrs)))
    if not spatial:
        return found
    for key in ("colour", "shape"):
        thing = t.shape if key == "shape" else f"{t.colour} one"
        for direction, templates in SPATIAL_TEMPLATES.items():
            if _select(objects, {key: getattr(t, key)}, direction, size) == target:
                group = sum(getattr(o, key) == getattr(t, key) for o in objects)
                template = templates[int(rng.integers(2))] if group == 2 else templates[1]
                found.append((f"{key}+{direction}", template.format(thing=thing)))
    return found


def _matching(objects: list[Shape], attrs: dict[str, str]) -> list[int]:
    return [i for i, o in enumerate(objects) if all(getattr(o, k) == v for k, v in attrs.items())]


def _plural_texts(attrs: dict[str, str], count: int) -> list[str]:
    """Every phrasing of "these ``count`` objects with ``attrs``" ("the red circles", "both circles")."""
    group = PLURAL_GROUPS[tuple(attrs)].format(**attrs)
    return [tpl.format(group=group) for tpl in PLURAL_TEMPLATES + COUNT_TEMPLATES.get(count, ())]


def several_targets(objects: list[Shape], rng: np.random.Generator) -> tuple[list[int], list[str]]:
    """A random group of 2+ objects that share an attribute combination, and its phrasings."""
    groups = {}
    for keys in PLURAL_GROUPS:
        for o in objects:
            attrs = {k: getattr(o, k) for k in keys}
            members = _matching(objects, attrs)
            if len(members) >= 2:
                groups[tuple(attrs.items())] = members
    attrs = list(groups)[int(rng.integers(len(groups)))]  # the scene always has a colour twin: never empty
    return groups[attrs], _plural_texts(dict(attrs), len(groups[attrs]))


def no_target(objects: list[Shape], rng: np.random.Generator) -> list[str]:
    """Phrasings of one attribute combination no object has, preferably one whose every word
    fits some object ("the green triangle" beside a green square and a red triangle)."""
    values = {"colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES)}
    absent, subtle = [], []
    for keys, templates in ATTRIBUTE_TEMPLATES.items():
        for combo in itertools.product(*(values[k] for k in keys)):
            attrs = dict(zip(keys, combo))
            if not _matching(objects, attrs):
                absent.append((templates, attrs))
                if all(_matching(objects, {k: v}) for k, v in attrs.items()):
                    subtle.append((templates, attrs))
    templates, attrs = (subtle or absent)[int(rng.integers(len(subtle or absent)))]
    return [tpl.format(**attrs) for tpl in templates]


def vocabulary_sentences(generalized: bool = False) -> list[str]:
    """Every expression the generator can write (for training the tokenizer); with
    ``generalized``, the plural ones too."""
    values = {"colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES)}
    out = []
    for keys, templates in ATTRIBUTE_TEMPLATES.items():
        for combo in itertools.product(*(values[k] for k in keys)):
            out += [tpl.format(**dict(zip(keys, combo))) for tpl in templates]
    things = list(SHAPES) + [f"{c} one" for c in COLOURS]
    out += [tpl.format(thing=thing) for templates in SPATIAL_TEMPLATES.values() for tpl in templates for thing in things]
    if generalized:
        for keys in PLURAL_GROUPS:
            for combo in itertools.product(*(values[k] for k in keys)):
                out += [text for count in (2, 3) for text in _plural_texts(dict(zip(keys, combo)), count)]
    return out


def raw_text(sent: str) -> str:
    """The "as typed" variant kept in ``raw``: capitalised, with a full stop."""
    return sent[:1].upper() + sent[1:] + "."


# -- scenes -----------------------------------------------------------------------------------------


def _random_shape(rng: np.random.Generator, size: int, shape=None, colour=None, size_name=None) -> Shape:
    size_name = size_name or str(rng.choice(list(SIZES)))
    low, high = SIZES[size_name]
    r = float(rng.uniform(low, high)) * size
    return Shape(
        shape=shape or str(rng.choice(SHAPES)),
        colour=colour or str(rng.choice(list(COLOURS))),
        size=size_name,
        cx=float(rng.uniform(r, size - r)),
        cy=float(rng.uniform(r, size - r)),
        r=r,
    )


def _scene_objects(rng: np.random.Generator, size: int) -> list[Shape]:
    """Target first, then a colour twin and a shape twin (so no single word suffices), then others."""
    target = _random_shape(rng, size)
    colour_twin = _random_shape(rng, size, shape=str(rng.choice([s for s in SHAPES if s != target.shape])), colour=target.colour)
    shape_twin = _random_shape(rng, size, shape=target.shape, colour=str(rng.choice([c for c in COLOURS if c != target.colour])))
    others = [_random_shape(rng, size) for _ in range(int(rng.integers(0, 4)))]
    return [target, colour_twin, shape_twin, *others]


def _render_labels(objects: list[Shape], size: int, order: list[int]) -> tuple[np.ndarray, list[np.ndarray]]:
    grid_y, grid_x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    labels = np.full((size, size), -1, dtype=np.int16)
    full = [o.pixels(grid_y, grid_x) for o in objects]
    for i in order:  # back to front
        labels[full[i]] = i
    return labels, full


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    grid_y, grid_x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(95, 165) + rng.uniform(-12, 12, size=3)
    texture = np.zeros((size, size), np.float32)
    for _ in range(3):
        fx, fy, phase = rng.uniform(1, 6), rng.uniform(1, 6), rng.uniform(0, 2 * np.pi)
        texture += np.sin(2 * np.pi * (fx * grid_x + fy * grid_y) + phase) * rng.uniform(4, 10)
    return base[None, None, :].astype(np.float32) + texture[..., None] + 5 * rng.standard_normal((size, size, 3), dtype=np.float32)


def make_scene(rng: np.random.Generator, size: int, attempts: int = 100):
    """(image HxWx3 uint8, objects, label map) with every object visible enough; target is index 0."""
    for _ in range(attempts):
        objects = _scene_objects(rng, size)
        order = [int(i) for i in rng.permutation(len(objects))]
        labels, full = _render_labels(objects, size, order)
        visible = [(labels == i).sum() / max(int(f.sum()), 1) for i, f in enumerate(full)]
        if min(visible) < MIN_VISIBLE:
            continue
        image = _background(rng, size)
        for i, obj in enumerate(objects):
            shade = np.asarray(COLOURS[obj.colour], np.float32) * rng.uniform(0.85, 1.1)
            region = labels == i
            image[region] = shade + 6 * rng.standard_normal((int(region.sum()), 3), dtype=np.float32)
        return np.clip(image, 0, 255).astype(np.uint8), objects, labels
    raise RuntimeError("could not place the shapes; the image size is too small")  # pragma: no cover


def _referred_scene(rng: np.random.Generator, size: int, spatial: bool, generalized: bool):
    """(image, objects, label map, target indices, 2-3 texts). Classic: the target is object 0 and
    at least two cue combinations single it out. Generalized: also a group of 2+ objects, or none."""
    kind = str(rng.choice(list(KIND_ODDS), p=list(KIND_ODDS.values()))) if generalized else "one"
    while True:
        image, objects, labels = make_scene(rng, size)
        if kind == "several":
            targets, phrasings = several_targets(objects, rng)
        elif kind == "none":
            targets, phrasings = [], no_target(objects, rng)
        else:
            targets, phrasings = [0], [text for _, text in expressions(objects, 0, size, rng, spatial)]
            if len(phrasings) < 2:
                continue
        texts = [phrasings[j] for j in rng.permutation(len(phrasings))[: int(rng.integers(2, 4))]]
        return image, objects, labels, targets, texts


def _bbox(mask: np.ndarray) -> list[int] | None:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)] if len(xs) else None


def make_synthetic_sample(item: dict) -> tuple[dict, list[dict]]:
    """One ref: image, visible mask of its target(s), 2-3 expressions that each select exactly them."""
    size, spatial, generalized = item["size"], item.get("spatial", False), item.get("generalized", False)
    rng = np.random.default_rng([item["seed"], STREAMS[item["split"]], item["index"]])
    image, objects, labels, targets, texts = _referred_scene(rng, size, spatial, generalized)
    mask = np.isin(labels, targets).astype(np.uint8)
    categories = [SHAPES.index(objects[i].shape) + 1 for i in targets]
    meta = {
        "ref_id": item["ref_id"], "ann_id": item["ref_id"], "image_id": item["image_id"],
        "category_id": categories if generalized else categories[0], "bbox": _bbox(mask),
        "split": item["split"], "dataset": DATASET, "width": size, "height": size,
        "sentences": [{"sent_id": item["ref_id"] * 10 + k, "sent": text, "raw": raw_text(text)} for k, text in enumerate(texts)],
        "objects": [  # the scene, target first, for analyses (e.g. IoU by cue) and tests
            {"shape": o.shape, "colour": o.colour, "size": o.size, "cx": round(o.cx, 2), "cy": round(o.cy, 2), "r": round(o.r, 2)}
            for o in objects
        ],
    }  # fmt: skip
    if generalized:  # which objects the expressions name (indices into "objects"), as gRefCOCO's list ann_id
        meta.update(target_count=len(targets), targets=targets, empty_mask=not targets)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=92)
    sample = {
        "__key__": f"{DATASET}-{item['split']}-{item['index']:07d}",
        "jpg": buffer.getvalue(),
        "mask.png": encode_mask_png(mask),
        "json": json.dumps(meta).encode("utf-8"),
    }
    return sample, []


# -- tokenizer and entry point ------------------------------------------------------------------------


def train_tokenizer(path: str | Path, vocab_size: int = 128, generalized: bool = False) -> Path:
    """A small BPE sentencepiece model over every expression the generator writes (sent and raw;
    the plural ones too with ``generalized``).

    BPE at 128 pieces keeps every word of the generator whole and still spells unseen words.
    """
    sentences = vocabulary_sentences(generalized)
    corpus = sentences + [raw_text(s) for s in sentences]
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus * 4), model_writer=buffer, vocab_size=vocab_size, model_type="bpe",
        hard_vocab_limit=False, character_coverage=1.0, num_threads=1, minloglevel=2,
    )
    return write_bytes_atomic(path, buffer.getvalue())


def prepare_synthetic(
    out_dir: str | Path,
    train: int = 4000,
    val: int = 300,
    test: int = 300,
    size: int = 128,
    seed: int = 0,
    progress: Progress | None = None,
    *,
    spatial: bool = False,
    workers: int | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    generalized: bool = False,
) -> dict:
    """Write ``synthetic-{split}-NNNNNN.tar``, ``manifest.json`` and ``spm.model`` to ``out_dir``.

    Args:
        train, val, test: refs (one per image) per split; 0 leaves a split out.
        size: image side in pixels (at least 64).
        seed: the whole set is a function of it (and of the counts, size and ``spatial``).
        spatial: also write relational expressions ("the leftmost red one"); see the module docstring.
        generalized: gRefCOCO-style refs: besides one target (40%), a group of 2+ objects named
            by a plural ("all the red shapes", "the two circles", 30%) or an attribute combination
            no object has ("the green triangle", 30%; empty mask). Each sample's JSON says
            ``target_count``; the manifest says ``"generalized": true``.
        progress, workers, shard_size, overwrite: as :func:`prepare_refer`.
    """
    if size < 64:
        raise DataError(f"--size {size} is too small to draw several distinguishable shapes; use 64 or more")
    counts = {"train": train, "val": val, "test": test}
    if any(n < 0 for n in counts.values()) or not any(counts.values()):
        raise DataError(f"sample counts must be >= 0 and not all 0, got train={train} val={val} test={test}")
    splits = {
        split: [_item(split, i, seed, size, spatial, generalized) for i in range(n)]
        for split, n in counts.items() if n
    }
    # "generalized" only when set, so that a folder prepared before it existed still resumes
    options = {"spatial": spatial, **({"generalized": True} if generalized else {})}
    config = {"dataset": DATASET, "counts": counts, "size": size, "seed": seed, **options, "shard_size": shard_size}
    sources = {"generator": "shared_ris.data.synthetic", "seed": seed, "size": size, **options}
    manifest = write_dataset(
        DATASET, out_dir, splits, make_synthetic_sample, config=config, sources=sources, shard_size=shard_size,
        workers=workers, strict=True, overwrite=overwrite, progress=progress,
        extra={"tokenizer": "spm.model", **({"generalized": True} if generalized else {})},
    )
    train_tokenizer(Path(out_dir) / "spm.model", generalized=generalized)
    return manifest


def _item(split: str, index: int, seed: int, size: int, spatial: bool, generalized: bool) -> dict:
    item = {"split": split, "index": index, "ref_id": index, "image_id": index, "seed": seed, "size": size, "spatial": spatial}
    return {**item, "generalized": True} if generalized else item


def export_examples(
    out_dir: str | Path, count: int = 8, size: int = 128, seed: int = 0, spatial: bool = False, generalized: bool = False
) -> Path:
    """Write ``count`` fresh scenes (in no split) as ``NNN.jpg`` plus ``prompts.jsonl`` with one
    expression per image, ready for ``sris predict DIR --prompts DIR/prompts.jsonl``. Returns DIR."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(count):
        sample, _ = make_synthetic_sample(_item(EXAMPLES, index, seed, size, spatial, generalized))
        name = f"{index:03d}.jpg"
        (folder / name).write_bytes(sample["jpg"])
        lines.append(json.dumps({"file": name, "text": json.loads(sample["json"])["sentences"][0]["sent"]}))
    (folder / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return folder
