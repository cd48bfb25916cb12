"""Predictor and predict_folder on generated images: every input kind, every output, every mode."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures_predict import READABLE, UNREADABLE, gradient, image_folder, make_trained_run, trained_run, write_image_zoo  # noqa: F401
from shared_ris.checkpoint import load_run
from shared_ris.errors import SharedRISError
from shared_ris.model import logits_to_mask
from shared_ris.predict import predict_folder, read_prompts
from shared_ris.predictor import ImageReadError, Predictor, open_image


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return write_image_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def predictor(trained_run):
    return Predictor.from_checkpoint(trained_run)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- opening images -------------------------------------------------------------------------------


def test_open_image_honours_exif_orientation(zoo):
    assert Image.open(zoo["exif"]).size == (40, 24)
    assert open_image(zoo["exif"]).size == (24, 40)


@pytest.mark.parametrize("name", READABLE)
def test_open_image_gives_rgb(zoo, name):
    assert open_image(zoo[name]).mode == "RGB"


def test_open_image_converts_properly(zoo):
    assert open_image(zoo["rgba"]).getpixel((5, 5)) == (255, 255, 255)  # transparent → white
    assert open_image(zoo["png16"]).getpixel((3, 3)) == (128, 128, 128)  # scaled, not clipped to 255
    r, g, b = open_image(zoo["cmyk"]).getpixel((3, 3))
    assert r > 200 and g < 60 and b < 60  # CMYK (0, 255, 255, 0) is red


@pytest.mark.parametrize("name", UNREADABLE + ("notes",))
def test_open_image_unreadable_is_one_line(zoo, name):
    with pytest.raises(ImageReadError) as info:
        open_image(zoo[name])
    assert "\n" not in str(info.value) and str(zoo[name]) in str(info.value)


# -- the predictor --------------------------------------------------------------------------------


def test_predictor_masks_at_original_size(predictor):
    images = [gradient(50, 30), gradient(17, 61)]
    predictions = predictor.predict(images, ["the red circle", "the big blue square on the left"], attention=True)
    side = predictor.image_size // 4
    for image, pred in zip(images, predictions):
        assert pred.mask.shape == (image.height, image.width) and pred.mask.dtype == bool
        assert pred.low_res_probs.shape == (side, side)
        grid = predictor.image_size // 16
        assert set(pred.attention) == {"encoder", "fpn", "decoder"}
        assert all(a.shape == (grid, grid) for a in pred.attention.values())
        assert 0.0 <= pred.mean_prob <= 1.0
        assert pred.mean_prob == 0.0 if pred.area == 0 else pred.mean_prob > predictor.threshold


def test_predictor_agrees_with_the_evaluation_path(predictor):
    """Predict and eval threshold the same bilinearly resized map: identical masks."""
    image = gradient(45, 33)
    pred = predictor.predict([image], "the green triangle")[0]
    ids, padding = predictor.encode_texts(["the green triangle"])
    with torch.no_grad():
        logits = predictor.model(predictor.preprocess(image)[None], ids, padding)
    expected = logits_to_mask(logits[0], (33, 45), predictor.threshold).numpy()
    assert np.array_equal(pred.mask, expected)


def test_predictor_threshold_is_the_recipes(predictor):
    assert predictor.threshold == 0.35


def test_checkpoint_errors_are_one_line(tmp_path, trained_run):
    cases = {}
    cases["missing"] = tmp_path / "nope.pt"
    cases["not torch"] = tmp_path / "notes.pt"
    cases["not torch"].write_text("hello")
    cases["pretrained"] = tmp_path / "beit3.pth"
    torch.save({"model": {"beit3.text_embed.weight": torch.zeros(2, 2)}}, cases["pretrained"])
    state = torch.load(trained_run, weights_only=True)
    cases["missing keys"] = tmp_path / "partial.pt"
    torch.save({**state, "model": {k: v for k, v in state["model"].items() if not k.startswith("decoder.")}}, cases["missing keys"])
    cases["shape"] = tmp_path / "shape.pt"
    bad = dict(state["model"])
    key = next(k for k in bad if k.endswith("text_mlp.fc1.weight"))
    bad[key] = torch.zeros(3, 3)
    torch.save({**state, "model": bad}, cases["shape"])
    expected = {
        "missing": "no such checkpoint file", "not torch": "cannot be read as a PyTorch checkpoint",
        "pretrained": "this is a BEiT-3 pretrained checkpoint; use it with sris train --pretrained",
        "missing keys": "keys are missing", "shape": "shape mismatch",
    }  # fmt: skip
    for name, path in cases.items():
        with pytest.raises(SharedRISError) as info:
            load_run(path, tokenizer=trained_run.parent / "spm.model")
        assert expected[name] in str(info.value) and "\n" not in str(info.value), name


def test_tokenizer_is_required_when_none_is_found(tmp_path, trained_run):
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "best.pt").write_bytes(trained_run.read_bytes())
    with pytest.raises(SharedRISError, match="no tokenizer found.*--tokenizer"):
        load_run(lone / "best.pt")
    model, recipe, tokenizer = load_run(lone / "best.pt", tokenizer=trained_run.parent / "spm.model")
    assert tokenizer.max_len == recipe.model.max_text_len


# -- folders --------------------------------------------------------------------------------------


def test_predict_folder_every_input_kind(tmp_path, zoo, trained_run):
    out = tmp_path / "out"
    summary = predict_folder(zoo["exif"].parent, "the red circle", trained_run, out_dir=out, batch_size=4)
    assert summary.predictions == len(READABLE)
    assert sorted(f for f, _ in summary.skipped) == sorted(str(zoo[n]) for n in UNREADABLE)
    assert all("cannot read image" in reason for _, reason in summary.skipped)
    assert summary.ignored == [str(zoo["notes"])]
    records = read_jsonl(out / "predictions.jsonl")
    assert sorted(r["file"] for r in records) == sorted(zoo[n].name for n in READABLE)
    for record in records:
        mask = Image.open(out / record["mask"])
        image = open_image(zoo["exif"].parent / record["file"])
        assert mask.mode == "L" and mask.size == image.size == (record["width"], record["height"])
        values = np.unique(np.asarray(mask))
        assert set(values.tolist()) <= {0, 255}
        assert record["mask_area"] == int((np.asarray(mask) == 255).sum())
        assert Image.open(out / record["overlay"]).size == image.size
        assert record["text"] == "the red circle" and 0.0 <= record["mean_prob"] <= 1.0
    exif = next(r for r in records if r["file"] == "exif.jpg")
    assert Image.open(out / exif["mask"]).size == (24, 40)  # upright, as EXIF says
    assert (out / "exif.mask.png").is_file() and (out / "exif.overlay.jpg").is_file()


def test_rerun_overwrites_and_never_reads_its_outputs(tmp_path, trained_run):
    folder = image_folder(tmp_path / "in", {"a.png": (20, 20)})
    for _ in range(2):  # outputs written into the input folder itself
        summary = predict_folder(folder, "the circle", trained_run, out_dir=folder)
        assert summary.predictions == 1 and not summary.skipped and not summary.ignored
    assert len(read_jsonl(folder / "predictions.jsonl")) == 1
    assert sorted(p.name for p in folder.iterdir()) == ["a.mask.png", "a.overlay.jpg", "a.png", "predictions.jsonl"]


def test_a_prompts_file_beside_its_images_is_not_reported_as_ignored(tmp_path, trained_run):
    folder = image_folder(tmp_path / "in", {"a.png": (20, 16)})
    (folder / "notes.txt").write_text("not an image")
    (folder / "prompts.jsonl").write_text(json.dumps({"file": "a.png", "text": "the red circle"}) + "\n")
    summary = predict_folder(folder, None, trained_run, out_dir=tmp_path / "out", prompts=folder / "prompts.jsonl")
    assert summary.predictions == 1 and summary.ignored == [str(folder / "notes.txt")]


def test_prompts_jsonl_several_texts_per_image(tmp_path, trained_run):
    folder = image_folder(tmp_path / "in", {name: (20, 16) for name in ("a.png", "b.png", "c.png")})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(p) for p in [
        {"file": "a.png", "text": "the red circle"}, {"file": "a.png", "text": "the blue square"},
        {"file": "b.png", "text": "the green one"}, {"file": "missing.png", "text": "anything"},
    ]) + "\n")  # fmt: skip
    out = tmp_path / "out"
    summary = predict_folder(folder, "the default text", trained_run, out_dir=out, prompts=prompts, batch_size=2)
    records = read_jsonl(out / "predictions.jsonl")
    assert [(r["file"], r["text"], r["mask"]) for r in records] == [
        ("a.png", "the red circle", "a.0.mask.png"),
        ("a.png", "the blue square", "a.1.mask.png"),
        ("b.png", "the green one", "b.mask.png"),
        ("c.png", "the default text", "c.mask.png"),  # not in the prompts: gets TEXT
    ]
    assert summary.skipped == [("missing.png", "file named in the prompts not found")]
    # without TEXT, only the prompted images are predicted; predictions.jsonl is itself a prompts file
    again = predict_folder(folder, None, trained_run, out_dir=tmp_path / "again", prompts=out / "predictions.jsonl")
    assert again.predictions == 4 and not again.skipped


def test_prompts_csv_and_bad_prompt_files(tmp_path):
    good = tmp_path / "p.csv"
    good.write_text('file,text\na.png,"the red, round thing"\nb.png,the square\n')
    assert read_prompts(good) == [("a.png", "the red, round thing"), ("b.png", "the square")]
    for name, content, message in [
        ("nohead.csv", "a.png,text\n", "header"),
        ("empty_text.jsonl", '{"file": "a.png", "text": "  "}\n', "empty referring expression in"),
        ("broken.jsonl", '{"file": "a.png"\n', r"broken.jsonl:1: not valid JSON"),
    ]:
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(SharedRISError, match=message):
            read_prompts(path)


def test_name_collisions_and_recursion(tmp_path, trained_run):
    folder = image_folder(tmp_path / "in", {"cup.jpg": (20, 20), "cup.png": (20, 20), "sub/cup.jpg": (20, 20)})
    flat = predict_folder(folder, "the cup", trained_run, out_dir=tmp_path / "flat")
    assert sorted(r["mask"] for r in read_jsonl(tmp_path / "flat" / "predictions.jsonl")) == ["cup_jpg.mask.png", "cup_png.mask.png"]
    assert flat.predictions == 2
    deep = predict_folder(folder, "the cup", trained_run, out_dir=tmp_path / "deep", recursive=True)
    assert deep.predictions == 3
    assert (tmp_path / "deep" / "sub" / "cup.mask.png").is_file()


def test_attention_maps_are_written(tmp_path, trained_run):
    image = tmp_path / "photo.jpg"
    gradient(64, 48).save(image)
    out = tmp_path / "out"
    predict_folder(image, "the red circle", trained_run, out_dir=out, attention=True)
    for key in ("encoder", "fpn", "decoder"):
        attn = Image.open(out / f"photo.attn_{key}.jpg")
        assert attn.size == (64, 48) and attn.mode == "RGB"
    record = read_jsonl(out / "predictions.jsonl")[0]
    assert record["attn_fpn"] == "photo.attn_fpn.jpg"


def test_attention_without_fpn_or_decoder_layer(tmp_path):
    run = make_trained_run(tmp_path / "run", overrides=("model.fpn.stages=[]", "model.decoder.shared_layers=0"))
    image = tmp_path / "photo.png"
    gradient(20, 20).save(image)
    predict_folder(image, "the circle", run, out_dir=tmp_path / "out", attention=True)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.attn_*")) == ["photo.attn_encoder.jpg"]


def test_empty_text_fails_before_loading_anything(tmp_path):
    for text in ("", "   "):
        with pytest.raises(SharedRISError, match="empty referring expression"):
            predict_folder(tmp_path, text, tmp_path / "does-not-exist.pt", out_dir=tmp_path / "out")
    with pytest.raises(SharedRISError, match="give a TEXT"):
        predict_folder(tmp_path, None, tmp_path / "does-not-exist.pt", out_dir=tmp_path / "out")


def test_long_text_is_truncated_with_a_warning(tmp_path, trained_run):
    image = tmp_path / "a.png"
    gradient(20, 20).save(image)
    long_text = " ".join(["the big red circle on the left"] * 6)
    warnings = []
    summary = predict_folder(image, long_text, trained_run, out_dir=tmp_path / "out", warn=warnings.append)
    assert summary.predictions == 1
    limit = load_run(trained_run)[1].model.max_text_len - 2  # <s> and </s> take two positions
    assert len(warnings) == 1 and long_text in warnings[0] and f"first {limit} are used" in warnings[0]
