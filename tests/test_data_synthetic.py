"""The synthetic referring-shapes set: determinism, unique referents, masks, tokenizer; and the CLI."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from shard_reading import members_by_key
from shared_ris import Tokenizer, load_recipe
from shared_ris.data import prepare_synthetic, read_manifest
from shared_ris.data.synthetic import COLOURS, SHAPES, SIZES, Shape, expressions, raw_text, vocabulary_sentences

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools on numpy 2


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    return out, prepare_synthetic(out, train=60, val=20, test=10, size=96, seed=5, shard_size=25, workers=2)




def referents(sentence: str, objects: list[dict], size: int) -> list[int]:
    """An independent reading of an expression: which objects fit it (attributes, then position)."""
    words = sentence.replace("-", " ").split()
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((w for w in words if w in SHAPES), None)
    size_word = next((w for w in words if w in SIZES), None)
    group = [i for i, o in enumerate(objects) if (colour is None or o["colour"] == colour) and (shape is None or o["shape"] == shape) and (size_word is None or o["size"] == size_word)]
    direction = next((d for d, cues in {"left": ("left", "leftmost"), "right": ("right", "rightmost"), "top": ("top", "topmost"), "bottom": ("bottom", "lowest")}.items() if set(cues) & set(words)), None)
    if direction is None:
        return group
    axis, sign = {"left": ("cx", 1), "right": ("cx", -1), "top": ("cy", 1), "bottom": ("cy", -1)}[direction]
    best = min(group, key=lambda i: sign * objects[i][axis])
    clear = all(sign * (objects[j][axis] - objects[best][axis]) >= 0.1 * size for j in group if j != best)
    return [best] if clear and len(group) >= 2 else group


@pytest.fixture(scope="module")
def spatial_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn_spatial")
    return out, prepare_synthetic(out, train=40, val=10, test=0, size=96, seed=5, shard_size=25, workers=1, spatial=True)


DIRECTION_WORDS = {"left", "leftmost", "right", "rightmost", "top", "topmost", "bottom", "lowest"}


@pytest.mark.parametrize("which", ["small_set", "spatial_set"])
def test_every_expression_picks_exactly_its_target(which, request):
    out, manifest = request.getfixturevalue(which)
    single_cue_would_do, relational = 0, 0
    for split in manifest["splits"]:
        for key, sample in members_by_key(out, manifest, split).items():
            meta = json.loads(sample["json"])
            objects = meta["objects"]
            assert 3 <= len(objects) <= 6 and 2 <= len(meta["sentences"]) <= 3
            for s in meta["sentences"]:
                assert referents(s["sent"], objects, meta["width"]) == [0], (key, s["sent"])
                assert s["raw"].lower().rstrip(".") == s["sent"]
                relational += bool(DIRECTION_WORDS & set(s["sent"].split()))
            target = objects[0]
            single_cue_would_do += sum(o["colour"] == target["colour"] for o in objects) == 1
            single_cue_would_do += sum(o["shape"] == target["shape"] for o in objects) == 1
    assert single_cue_would_do == 0  # colour alone or shape alone never suffices
    assert manifest["config"]["spatial"] == (which == "spatial_set")
    # attribute phrases only by default; --spatial mixes relational ones in
    assert relational == 0 if which == "small_set" else relational > 10


def test_masks_are_visible_parts_of_sizeable_targets(small_set):
    out, manifest = small_set
    for sample in members_by_key(out, manifest, "val").values():
        meta = json.loads(sample["json"])
        mask = np.asarray(Image.open(io.BytesIO(sample["mask.png"])))
        assert mask.shape == (96, 96) and set(np.unique(mask)) == {0, 255}
        target = meta["objects"][0]
        full_area = {"circle": np.pi, "square": 4.0, "triangle": 2.0}[target["shape"]] * target["r"] ** 2
        assert 0.55 * full_area <= (mask > 0).sum() <= 1.1 * full_area
        x, y, w, h = meta["bbox"]
        ys, xs = np.nonzero(mask)
        assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert image.size == (96, 96) and image.mode == "RGB"


def test_deterministic_for_a_seed_whatever_the_workers(small_set, tmp_path):
    out, manifest = small_set
    again = prepare_synthetic(tmp_path / "a", train=60, val=20, test=10, size=96, seed=5, shard_size=25, workers=1)
    assert again["splits"] == manifest["splits"]
    for name in (n for s in manifest["splits"].values() for n in s["shards"]):
        assert (tmp_path / "a" / name).read_bytes() == (out / name).read_bytes()
    assert (tmp_path / "a" / "spm.model").read_bytes() == (out / "spm.model").read_bytes()
    other = prepare_synthetic(tmp_path / "b", train=60, val=0, test=0, size=96, seed=6, shard_size=25, workers=1)
    assert (tmp_path / "b" / other["splits"]["train"]["shards"][0]).read_bytes() != (out / manifest["splits"]["train"]["shards"][0]).read_bytes()


def test_tokenizer_fits_the_tiny_recipe_and_knows_every_word(small_set):
    out, _ = small_set
    tiny = load_recipe("tiny").model
    tokenizer = Tokenizer(out / "spm.model", max_len=tiny.max_text_len)
    assert tokenizer.vocab_size <= tiny.encoder.vocab_size
    for sentence in vocabulary_sentences():
        for text in (sentence, raw_text(sentence)):
            pieces = tokenizer.pieces(text)
            assert 3 not in pieces and len(pieces) + 2 <= tiny.max_text_len, text  # no unknowns; <s> + </s> fit
        assert len(tokenizer.pieces(sentence)) == len(sentence.split()), sentence  # every word is one piece


def test_expressions_on_a_hand_made_scene():
    rng = np.random.default_rng(0)
    objects = [
        Shape("circle", "red", "large", 20, 60, 20), Shape("square", "red", "small", 100, 60, 10),
        Shape("circle", "blue", "small", 60, 60, 10),
    ]
    kinds = dict(expressions(objects, 0, 128, rng))
    assert kinds["colour+shape"] == "the red circle" or kinds["colour+shape"] in ("red circle", "the circle that is red")
    assert "colour+left" in kinds and "shape+left" in kinds and "colour+top" not in kinds  # same height: no top
    assert "size+colour" in kinds
    assert expressions([objects[0], Shape("circle", "red", "large", 30, 60, 20)], 0, 128, rng) == []  # too close to tell


def test_cli_prepare_synthetic_and_refcoco(tmp_path):
    from cli.main import app

    runner = CliRunner()
    result = runner.invoke(app, ["prepare", "synthetic", "--out", str(tmp_path / "syn"), "--train", "12", "--val", "4", "--test", "0", "--size", "64", "--workers", "1", "--spatial"])
    assert result.exit_code == 0, result.output
    assert re.search(r"train\s.*12\s", result.output) and "nothing skipped" in result.output
    assert read_manifest(tmp_path / "syn")["splits"]["val"]["samples"] == 4
    assert read_manifest(tmp_path / "syn")["config"]["spatial"] is True
    result = runner.invoke(app, ["prepare", "refcoco", "--refer-root", str(tmp_path / "none"), "--images", str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "refer root not found" in result.output and "Traceback" not in result.output
