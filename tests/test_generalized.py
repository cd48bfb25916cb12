"""Generalized RIS end to end: the synthetic set with several / no targets, the no-target head and
the area rule, training on empty masks, scoring with ReLA's rules, and predict's ``no_target``."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import shared_ris
from cli.main import app
from shard_reading import members_by_key
from shared_ris.config import RecipeError
from shared_ris.data import DataError, build_train_loader, prepare_synthetic
from shared_ris.data.sample import parse_sample
from shared_ris.data.synthetic import COLOURS, SHAPES, SIZES
from shared_ris.evaluate import evaluate_model
from shared_ris.generalized_metrics import summarize_by_target_count
from shared_ris.model import NoTargetRule, segmentation_loss
from shared_ris.predictor import Predictor
from shared_ris.trainee import build_trainee, train_step
from shared_ris.distributed import DistEnv

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools on numpy 2
SMALL = ("model.image_size=64", "train.batch_size=8", "data.shuffle_buffer=20", "data.num_workers=0")


@pytest.fixture(scope="module")
def generalized_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("gsyn")
    return out, prepare_synthetic(out, train=60, val=24, test=0, size=64, seed=3, workers=1, generalized=True)


def named_objects(sentence: str, objects: list[dict]) -> list[int]:
    """An independent reading: the objects whose attributes fit every attribute word (plural or not)."""
    words = [w[:-1] if w[:-1] in SHAPES else w for w in sentence.split()]  # "circles" → "circle"
    wanted = {"colour": set(words) & set(COLOURS), "shape": set(words) & set(SHAPES), "size": set(words) & set(SIZES)}
    return [i for i, o in enumerate(objects) if all(not values or o[key] in values for key, values in wanted.items())]


def test_every_expression_names_exactly_its_targets(generalized_set):
    out, manifest = generalized_set
    kinds = {0: 0, 1: 0, 2: 0}
    for split in manifest["splits"]:
        for sample in members_by_key(out, manifest, split).values():
            meta = json.loads(sample["json"])
            for sentence in meta["sentences"]:
                assert named_objects(sentence["sent"], meta["objects"]) == meta["targets"], sentence["sent"]
            assert meta["target_count"] == len(meta["targets"]) and meta["empty_mask"] is (not meta["targets"])
            mask = np.asarray(Image.open(io.BytesIO(sample["mask.png"]))) > 127
            assert bool(mask.any()) is bool(meta["targets"])
            kinds[min(meta["target_count"], 2)] += 1
            plural = any(w.endswith("s") and w[:-1] in SHAPES or w in ("shapes", "both", "two", "three") for w in meta["sentences"][0]["sent"].split())
            assert plural is (meta["target_count"] >= 2)  # several targets: always a plural; one or none: never
    assert all(kinds.values()) and manifest["generalized"] is True


def test_no_target_expressions_use_words_the_image_has(generalized_set):
    """An absent combination whose every word fits some object: the hard kind of no-target."""
    out, manifest = generalized_set
    subtle = total = 0
    for sample in members_by_key(out, manifest, "train").values():
        meta = json.loads(sample["json"])
        if meta["target_count"] == 0:
            words = set(meta["sentences"][0]["sent"].split())
            attributes = words & (set(COLOURS) | set(SHAPES) | set(SIZES))
            total += 1
            subtle += all(any(word in o.values() for o in meta["objects"]) for word in attributes)
    assert total and subtle / total > 0.8


def test_plain_set_is_unchanged_by_the_option(tmp_path):
    plain = prepare_synthetic(tmp_path / "plain", train=8, val=0, test=0, size=64, workers=1)
    assert "generalized" not in plain and "generalized" not in plain["config"]
    sample = json.loads(next(iter(members_by_key(tmp_path / "plain", plain, "train").values()))["json"])
    assert "target_count" not in sample and isinstance(sample["category_id"], int)


def test_no_target_samples_are_trained_on_and_labelled(generalized_set):
    out, manifest = generalized_set
    info = manifest["splits"]["train"]
    assert info["trainable_samples"]["sent"] == info["samples"] and info["target_samples"]["0"] > 0
    recipe = shared_ris.load_recipe("tiny", list(SMALL))
    tokenizer = shared_ris.Tokenizer(out / "spm.model", max_len=recipe.model.max_text_len)
    batches = list(build_train_loader(out, recipe, tokenizer))
    labels = torch.cat([b["no_target"] for b in batches])
    masks = torch.cat([b["masks"] for b in batches])
    assert labels.any() and (~labels).any()
    assert torch.equal(labels, masks.flatten(1).sum(1) == 0)  # no target ⇔ empty mask


def test_target_count_must_agree_with_the_mask_flag():
    raw = {"__key__": "k", "jpg": b"", "mask.png": b"", "json": json.dumps({"sentences": [{"sent_id": 1, "sent": "a", "raw": "a"}], "target_count": 0}).encode()}
    with pytest.raises(DataError, match="'target_count' is 0 \\(no target\\) but 'empty_mask' is not true"):
        parse_sample(raw, "shard.tar", "sent")
    raw["json"] = json.dumps({"sentences": [{"sent_id": 1, "sent": "a", "raw": "a"}], "target_count": "two"}).encode()
    with pytest.raises(DataError, match="'target_count' must be a non-negative integer"):
        parse_sample(raw, "shard.tar", "sent")


def test_empty_targets_train_cleanly():
    """Dice smoothing keeps an all-empty batch finite, gradients included, and a step with the head
    on no-target samples changes the weights without a non-finite value."""
    logits = torch.randn(4, 1, 8, 8, requires_grad=True)
    parts = segmentation_loss(logits, torch.zeros(4, 1, 32, 32))
    parts["loss"].backward()
    assert torch.isfinite(parts["loss"]) and torch.isfinite(logits.grad).all() and 0 < parts["dice"] < 1
    recipe = shared_ris.load_recipe("tiny", [*SMALL, "model.no_target_head=true"])
    trainee = build_trainee(recipe, DistEnv())
    head_before = trainee.model.no_target_head.out.weight.detach().clone()
    batch = {"images": torch.randn(4, 3, 64, 64), "text_ids": torch.randint(4, 100, (4, 10)), "text_padding_mask": torch.zeros(4, 10, dtype=torch.bool),
             "masks": torch.zeros(4, 1, 64, 64), "no_target": torch.ones(4, dtype=torch.bool)}  # fmt: skip
    losses = train_step(trainee, [batch], recipe)
    assert trainee.loss_keys == ("loss", "bce", "dice", "no_target") and torch.isfinite(losses).all()
    assert not torch.equal(head_before, trainee.model.no_target_head.out.weight)


def test_head_logits_come_with_the_same_masks():
    recipe = shared_ris.load_recipe("tiny", [*SMALL, "model.no_target_head=true"])
    model = shared_ris.build_model(recipe).eval()
    inputs = (torch.randn(3, 3, 64, 64), torch.randint(4, 100, (3, 10)), torch.zeros(3, 10, dtype=torch.bool))
    logits, no_target = model.forward_with_no_target(*inputs)
    assert no_target.shape == (3,) and torch.equal(logits, model(*inputs))
    with pytest.raises(ValueError, match="no no-target head"):
        shared_ris.build_model(shared_ris.load_recipe("tiny", list(SMALL))).forward_with_no_target(*inputs)
    assert NoTargetRule.of(model) == NoTargetRule(head=True, head_threshold=0.5)
    tuned = shared_ris.build_model(shared_ris.load_recipe("tiny", [*SMALL, "model.no_target_head=true", "model.no_target_threshold=0.3"]))
    assert NoTargetRule.of(tuned) == NoTargetRule(head=True, head_threshold=0.3)
    with pytest.raises(RecipeError, match="no_target_threshold"):
        shared_ris.load_recipe("tiny", ["model.no_target_threshold=1"])


def test_attention_maps_come_from_the_head_models_one_pass(generalized_run):
    predictor = Predictor.from_checkpoint(generalized_run)
    calls = []
    predictor.model.beit3.register_forward_hook(lambda *_: calls.append(1))
    image = Image.new("RGB", (64, 64), (120, 120, 120))
    with_maps = predictor.predict([image, image], ["the red circle", "the green triangle"], attention=True)
    assert len(calls) == 1
    plain = predictor.predict([image, image], ["the red circle", "the green triangle"])
    pixels = torch.stack([predictor.preprocess(image)] * 2)
    ids, padding = predictor.encode_texts(["the red circle", "the green triangle"])
    with torch.no_grad():
        _, maps = predictor.model.attention_maps(pixels, ids, padding)
    for a, b, i in zip(with_maps, plain, range(2)):
        assert a.no_target == b.no_target and np.array_equal(a.mask, b.mask) and set(a.attention) == set(maps)
        assert all(np.allclose(a.attention[k], maps[k][i].numpy()) for k in maps)


def test_area_rule_and_head_rule_on_hand_made_logits():
    logits = torch.full((3, 1, 4, 4), -10.0)
    logits[0, 0, :2, :2] = 10.0  # a quarter of the 16×16 input, less its bilinear corner
    logits[1, 0, 0, 0] = 10.0  # one corner cell: a few pixels
    areas = shared_ris.model.no_target.mask_areas(logits, 16, 0.35)
    assert areas.tolist() == [int(shared_ris.model.logits_to_mask(row, (16, 16), 0.35).sum()) for row in logits]
    assert 56 <= areas[0] <= 64 and 0 < areas[1] < 16 and areas[2] == 0
    assert NoTargetRule(min_area=16).decide(logits, None, 16, 0.35).tolist() == [False, True, True]
    assert NoTargetRule(min_area=0).decide(logits, None, 16, 0.35).tolist() == [False, False, False]
    assert NoTargetRule(head=True).decide(logits, torch.tensor([-1.0, 2.0, 0.5]), 16, 0.35).tolist() == [False, True, True]
    # σ(-1) = 0.269, σ(2) = 0.881, σ(0.5) = 0.622
    assert NoTargetRule(head=True, head_threshold=0.25).decide(logits, torch.tensor([-1.0, 2.0, 0.5]), 16, 0.35).tolist() == [True, True, True]
    assert NoTargetRule(head=True, head_threshold=0.7).decide(logits, torch.tensor([-1.0, 2.0, 0.5]), 16, 0.35).tolist() == [False, True, False]
    assert NoTargetRule(head=True, head_threshold=0.7).describe() == "no-target head (σ > 0.7)"
    with pytest.raises(ValueError, match="probability"):
        NoTargetRule(head=True, head_threshold=1.0)


class _Fixed(torch.nn.Module):
    """Logits: a full square for every row but the second; the head says "nothing" for rows 1 and 2."""

    no_target_min_area = 0

    def __init__(self) -> None:
        super().__init__()
        self.no_target_head = torch.nn.Identity()

    def forward_with_no_target(self, images, text_ids, text_padding_mask):
        logits = torch.full((4, 1, 4, 4), -10.0)
        logits[:, 0, :2, :2] = 10.0
        logits[1] = -10.0
        return logits, torch.tensor([-5.0, 5.0, 5.0, -5.0])


def test_eval_empties_decided_masks_and_scores_with_relas_rules():
    target = torch.zeros(8, 8, dtype=torch.uint8)
    target[:4, :4] = 1
    empty = torch.zeros(8, 8, dtype=torch.uint8)
    batch = {
        "images": torch.zeros(4, 3, 16, 16), "text_ids": torch.zeros(4, 4, dtype=torch.long), "text_padding_mask": torch.zeros(4, 4, dtype=torch.bool),
        "orig_masks": [target, empty, target, empty], "keys": ["a", "b", "c", "d"], "sent_ids": [0, 1, 2, 3], "target_counts": [1, 0, 2, 0],
    }  # fmt: skip
    saved = {}
    acc = evaluate_model(_Fixed(), [batch], threshold=0.35, on_mask=lambda k, s, m: saved.setdefault(k, m))
    # a: TN, perfect; b: TP (nothing predicted, nothing there); c: FP (mask emptied); d: FN (16 px predicted)
    assert [int(saved[k].sum()) for k in "abcd"] == [16, 0, 0, 16]
    figures = acc.summary(generalized=True)
    expected = summarize_by_target_count([16, 0, 16, 0], [16, 0, 16, 16], [1, 0, 2, 0], [False, True, True, False])
    assert json.dumps(figures["generalized"]) == json.dumps(expected)  # NaN (a kind absent from a group) equal too
    everything = figures["generalized"]["all"]
    assert (everything["gIoU"], everything["cIoU"], everything["N-acc"], everything["T-acc"]) == (0.5, 16 / 48, 0.5, 0.5)
    assert (figures["oIoU"], figures["mIoU"]) == (16 / 48, 0.5)  # the plain figures see the emptied mask


@pytest.fixture(scope="module")
def generalized_run(tmp_path_factory, generalized_set):
    from fixtures_predict import make_trained_run

    folder = tmp_path_factory.mktemp("grun")
    checkpoint = make_trained_run(folder, overrides=("model.image_size=64", "model.no_target_head=true"))
    (folder / "spm.model").write_bytes((generalized_set[0] / "spm.model").read_bytes())
    return checkpoint


def test_cli_eval_prints_generalized_figures_and_strict_json(tmp_path, generalized_set, generalized_run):
    out, _ = generalized_set
    args = ["eval", "--checkpoint", str(generalized_run), "--data", str(out), "--split", "val", "--json", str(tmp_path / "e.json"), "--workers", "0"]
    result = CliRunner().invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "generalized (gRefCOCO) figures" in result.output and "no-target head" in result.output
    report = json.loads((tmp_path / "e.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in strict JSON"))
    groups = report["splits"]["val"]["generalized"]
    assert set(groups) == {"all", "0", "1", "2+"} and groups["0"]["T-acc"] is None and groups["1"]["N-acc"] is None
    result = CliRunner().invoke(app, [*args[:-4], "--no-target-area", "100000", "--json", str(tmp_path / "a.json")], terminal_width=200)
    area = json.loads((tmp_path / "a.json").read_text())
    assert area["no_target_rule"].startswith("area rule") and area["splits"]["val"]["generalized"]["all"]["N-acc"] == 1.0


def test_cli_eval_moves_the_heads_threshold(tmp_path, generalized_set, generalized_run):
    """--no-target-threshold P decides with σ > P: near 0 every expression is "no target", near 1 none;
    with --no-target-area, or on a model without a head, it is one line and exit 2."""
    from fixtures_predict import make_trained_run

    out, _ = generalized_set
    args = ["eval", "--checkpoint", str(generalized_run), "--data", str(out), "--split", "val", "--workers", "0"]
    figures = {}
    for p in ("1e-9", "0.999999999"):
        result = CliRunner().invoke(app, [*args, "--no-target-threshold", p, "--json", str(tmp_path / f"{p}.json")], terminal_width=200)
        assert result.exit_code == 0, result.output
        report = json.loads((tmp_path / f"{p}.json").read_text())
        assert report["no_target_rule"] == f"no-target head (σ > {float(p):g})"
        figures[p] = report["splits"]["val"]["generalized"]["all"]
    assert (figures["1e-9"]["N-acc"], figures["1e-9"]["T-acc"]) == (1.0, 0.0)
    assert (figures["0.999999999"]["N-acc"], figures["0.999999999"]["T-acc"]) == (0.0, 1.0)
    for extra, message in ((["--no-target-threshold", "0.5", "--no-target-area", "10"], "not both"), (["--no-target-threshold", "1.5"], "(0, 1)")):
        result = CliRunner().invoke(app, [*args, *extra], terminal_width=200)
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    plain = make_trained_run(tmp_path / "plain", overrides=("model.image_size=64",))
    (tmp_path / "plain" / "spm.model").write_bytes((out / "spm.model").read_bytes())
    result = CliRunner().invoke(app, [*args[:2], str(plain), *args[3:], "--no-target-threshold", "0.5"], terminal_width=200)
    assert result.exit_code == 2 and "no no-target head" in result.output and len(result.output.strip().splitlines()) == 1


def test_predict_reports_no_target(tmp_path, generalized_set, generalized_run):
    out, _ = generalized_set
    image = tmp_path / "in" / "scene.png"
    image.parent.mkdir()
    Image.new("RGB", (64, 64), (120, 120, 120)).save(image)
    predictor = Predictor.from_checkpoint(generalized_run)
    head_says = predictor.predict([Image.open(image).convert("RGB")], "the green triangle")[0].no_target
    args = ["predict", str(image), "the green triangle", "--checkpoint", str(generalized_run), "--out", str(tmp_path / "p")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "p" / "predictions.jsonl").read_text())
    assert record["no_target"] is head_says
    if head_says:
        assert record["mask_area"] == 0
    predictor.no_target = NoTargetRule(min_area=10**6)  # every mask is "too small": decided no target, emptied
    decided = predictor.predict([Image.open(image).convert("RGB")], "the green triangle")[0]
    assert decided.no_target and not decided.mask.any() and decided.mean_prob == 0.0


def test_onnx_export_refuses_a_head_model(tmp_path, generalized_run):
    pytest.importorskip("onnxruntime")
    result = CliRunner().invoke(app, ["export", "--checkpoint", str(generalized_run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2 and "no-target head" in result.output and not (tmp_path / "m.onnx").exists()


def test_a_bundle_keeps_the_head_and_says_so(tmp_path, generalized_run):
    result = CliRunner().invoke(app, ["export", "--checkpoint", str(generalized_run), "--format", "bundle", "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert "no target | an expression that names nothing gets an empty mask" in (tmp_path / "b" / "README.md").read_text()
    image = Image.new("RGB", (64, 64), (40, 165, 60))
    texts = ["the green square", "all the red shapes", "the small blue circle"]
    original = Predictor.from_checkpoint(generalized_run).predict([image] * 3, texts)
    bundled = Predictor.from_pretrained(tmp_path / "b").predict([image] * 3, texts)
    assert [p.no_target for p in bundled] == [p.no_target for p in original]
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(original, bundled))
