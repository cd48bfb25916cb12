"""``sris demo`` without a browser: the page's work (:class:`Segmenter`), what the page says about
the model, and the command's one-line failures. The page itself: ``test_demo_browser.py``."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from fixtures_predict import gradient, short_run, trained_run  # noqa: F401
from hostile_fixtures import bomb_png
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from shared_ris.bundle import write_bundle
from shared_ris.checkpoint import read_trained, save_checkpoint
from shared_ris.demo import MAX_EXPRESSIONS, NEEDS_EXTRA, Segmenter, describe_checkpoint, example_inputs, expressions
from shared_ris.errors import SharedRISError
from shared_ris.model import NoTargetRule
from shared_ris.predictor import Predictor
from shared_ris.visualize import MASK_PALETTE


@pytest.fixture(scope="module")
def segmenter(trained_run, tmp_path_factory):
    return Segmenter(Predictor.from_checkpoint(trained_run), tmp_path_factory.mktemp("results"), max_pixels=200 * 200, max_bytes=50_000)


def test_expressions_one_per_line():
    assert expressions("the red circle\n\n  blue square  \n") == ["the red circle", "blue square"]
    for empty in ("", "  \n \n", None):
        with pytest.raises(SharedRISError, match="empty referring expression in the text box"):
            expressions(empty)
    with pytest.raises(SharedRISError, match=f"at most {MAX_EXPRESSIONS}"):
        expressions("\n".join(f"shape {i}" for i in range(MAX_EXPRESSIONS + 1)))


def test_segment_writes_one_mask_per_expression(segmenter, tmp_path):
    gradient(50, 40).save(tmp_path / "photo.png")
    result = segmenter.segment(tmp_path / "photo.png", "the red circle\nthe blue square")
    assert len(result.masks) == 2 and [row[0] for row in result.rows] == [1, 2]
    assert len({row[1] for row in result.rows}) == 2 and all(row[1] in MASK_PALETTE for row in result.rows)
    assert [row[2] for row in result.rows] == ["the red circle", "the blue square"]
    assert result.overlay.size == (50, 40) and len(result.attention) == 6  # encoder, FPN, decoder per expression
    for path, text, row in zip(result.masks, ["the red circle", "the blue square"], result.rows):
        mask = np.asarray(Image.open(path)) == 255
        reference = segmenter.predictor.predict([Image.open(tmp_path / "photo.png").convert("RGB")], text)[0]
        assert np.array_equal(mask, reference.mask) and row[3] == reference.area
    assert all(path.parent.parent == segmenter.results for path in result.masks)


def test_a_no_target_decision_says_so_in_the_table(trained_run, tmp_path):
    predictor = Predictor.from_checkpoint(trained_run)
    predictor.no_target = NoTargetRule(min_area=10**6)  # every mask "too small": the expression names nothing
    gradient(50, 40).save(tmp_path / "photo.png")
    result = Segmenter(predictor, tmp_path / "results").segment(tmp_path / "photo.png", "the green triangle")
    assert result.rows[0][3] == "no target" and not (np.asarray(Image.open(result.masks[0])) > 0).any()


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("notes.png", b"not an image at all", "notes.png is not an image we can read: cannot read image"),
        ("huge.png", bomb_png(), "the image is too large: over Pillow's limit"),
        ("big.png", bomb_png(300, 300), "the image is too large: 300×300 = 90,000 pixels, over the limit of 40,000"),
        ("heavy.jpg", b"\xff" * 60_000, "the file is 0.1 MB, over the limit of 0.0476837 MB; upload a smaller image"),
    ],
)
def test_bad_uploads_are_one_message(segmenter, tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(SharedRISError) as caught:
        segmenter.segment(tmp_path / name, "the red circle")
    assert message in str(caught.value) and str(tmp_path) not in str(caught.value)  # the temporary path is not shown
    assert "\n" not in str(caught.value)


def test_no_image_is_one_message(segmenter):
    with pytest.raises(SharedRISError, match="no image: upload one"):
        segmenter.segment(None, "the red circle")


def test_page_describes_the_model(short_run, tmp_path):
    info = describe_checkpoint(short_run)
    assert (info.recipe, info.dataset, info.image_size, info.step) == ("tiny", "synthetic", 64, 300)
    assert read_trained(short_run).meta["dataset"] == "synthetic"  # sris train records it
    assert "recipe **tiny**" in info.markdown() and "trained on **synthetic** for 300 steps" in info.markdown()
    examples = example_inputs(tmp_path / "examples", info)
    assert len(examples) == 8 and all(Image.open(path).size == (64, 64) and text for path, text in examples)
    bundle = tmp_path / "bundle"
    write_bundle(short_run, bundle, data_dir=short_run.parent.parent / "data")
    assert describe_checkpoint(bundle).dataset == "synthetic"  # from the model card's front matter


def test_a_checkpoint_without_a_dataset_says_so(trained_run, tmp_path):
    info = describe_checkpoint(trained_run)  # save_trained records no dataset
    assert info.dataset is None and "training set not recorded" in info.markdown()
    assert example_inputs(tmp_path / "examples", info) == [] and not (tmp_path / "examples").exists()
    state = {"model": {}, "recipe": read_trained(trained_run).recipe.to_dict(), "dataset": ["not", "a", "name"]}
    save_checkpoint(state, tmp_path / "odd.pt")
    assert describe_checkpoint(tmp_path / "odd.pt").dataset is None


def test_missing_extra_is_one_line(monkeypatch, trained_run):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    result = CliRunner().invoke(app, ["demo", "--checkpoint", str(trained_run)])
    assert result.exit_code == 2 and NEEDS_EXTRA in result.output and "Traceback" not in result.output


def test_bad_checkpoint_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--checkpoint", str(tmp_path / "nope.pt")])
    assert result.exit_code == 2 and "nope.pt" in result.output and "Traceback" not in result.output
