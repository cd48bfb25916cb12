"""Issue #11: scores comparable to the literature.

- ``--protocol lavt``'s S×S ground truth is LAVT's: PIL ``Image.NEAREST`` on a "P" image, checked
  against PIL itself on non-square and odd sizes (torch's nearest picks other pixels on them);
- an empty prediction of an empty ground truth is IoU 1 by default and 0 under LAVT's rule;
- every sentence of every ref is scored: eval's ``n`` is the refer API's count on a fixture with
  empty texts, an empty mask and overlapping polygons;
- ``--save-masks`` holds the scored masks and their ground truth: the JSON's figures are recomputed
  from the PNGs alone, with numpy, under both presets.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from fixtures_predict import make_trained_run
from refer_fixture import ANNS, REFS, build_refer_fixture, texts
from shared_ris import Tokenizer, load_recipe
from shared_ris.data import build_eval_loader, prepare_refer, read_manifest
from shared_ris.data.synthetic import train_tokenizer
from shared_ris.evaluate import evaluate_model, evaluate_run, lavt_target
from shared_ris.metrics import MetricAccumulator, sample_ious, summarize

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools on numpy 2
SIDE = 480
# width x height: COCO's 500x333 and its transpose, odd sides, extreme aspect ratios, one near-square
SIZES = [(500, 333), (333, 500), (481, 97), (37, 641), (479, 481), (640, 427), (7, 5)]


def pil_lavt_target(mask: np.ndarray, side: int) -> np.ndarray:
    """LAVT's target, written as its dataset does: a "P" image of 0/1 resized with Image.NEAREST."""
    image = Image.frombytes("P", (mask.shape[1], mask.shape[0]), mask.astype(np.uint8).tobytes())
    return np.asarray(image.resize((side, side), Image.NEAREST)) == 1


def noise_mask(width: int, height: int) -> np.ndarray:
    """Every pixel independent, so any different choice of source pixel shows."""
    return np.random.default_rng(width * 1000 + height).random((height, width)) < 0.4


# -- LAVT's ground truth -------------------------------------------------------------------------------


@pytest.mark.parametrize("width,height", SIZES)
def test_lavt_target_is_pil_nearest(width, height):
    mask = noise_mask(width, height)
    ours = lavt_target(torch.from_numpy(mask.astype(np.uint8)), SIDE)
    assert ours.dtype == torch.bool and ours.shape == (SIDE, SIDE)
    np.testing.assert_array_equal(ours.numpy(), pil_lavt_target(mask, SIDE))


def test_torch_nearest_is_not_lavts_on_these_sizes():
    """Why PIL: torch's nearest (what eval used) differs from LAVT's target on non-square images."""
    differs = 0
    for width, height in SIZES:
        mask = torch.from_numpy(noise_mask(width, height))
        torch_nearest = F.interpolate(mask[None, None].float(), size=(SIDE, SIDE), mode="nearest")[0, 0].bool().numpy()
        differs += not np.array_equal(torch_nearest, pil_lavt_target(mask.numpy(), SIDE))
    assert differs >= len(SIZES) - 2


class Replay(torch.nn.Module):
    """Outputs fixed S×S logits: +10 where ``masks[i]`` is set, -10 elsewhere."""

    def __init__(self, masks: list[np.ndarray]):
        super().__init__()
        self.logits = [torch.where(torch.from_numpy(m), 10.0, -10.0)[None] for m in masks]

    def forward(self, images, text_ids, text_padding_mask):
        return torch.stack(self.logits[: len(images)])


@pytest.mark.parametrize("width,height", SIZES[:4])
def test_lavt_protocol_scores_lavts_own_target_as_perfect(width, height):
    """The issue's check: fed LAVT's target as the prediction, --protocol lavt must score 1."""
    mask = np.zeros((height, width), bool)
    mask[height // 5 : height * 3 // 5 + 1, width // 3 : width * 5 // 6] = True  # a box, as a mask would be
    batch = {
        "images": torch.zeros(1, 3, SIDE, SIDE), "text_ids": torch.zeros(1, 4, dtype=torch.long),
        "text_padding_mask": torch.zeros(1, 4, dtype=torch.bool), "orig_masks": [torch.from_numpy(mask.astype(np.uint8))],
        "keys": ["a"], "sent_ids": [0],
    }  # fmt: skip
    stats = evaluate_model(Replay([pil_lavt_target(mask, SIDE)]), [batch], threshold=0.5, resolution="input").summary(inclusive=True, empty_iou=0.0)
    assert (stats["oIoU"], stats["mIoU"], stats["n"]) == (1.0, 1.0, 1)


# -- empty ground truth, empty prediction ----------------------------------------------------------------


def test_empty_union_is_one_by_default_and_zero_under_lavt():
    # three expressions: (I, U) = (3, 4), a correct "nothing there" (0, 0), a miss (0, 5)
    intersections, unions = [3, 0, 0], [4, 0, 5]
    default, lavt = summarize(intersections, unions), summarize(intersections, unions, inclusive=True, empty_iou=0.0)
    assert default["oIoU"] == lavt["oIoU"] == 3 / 9  # an empty union adds nothing to the sums
    assert default["mIoU"] == pytest.approx((0.75 + 1.0 + 0.0) / 3) and lavt["mIoU"] == pytest.approx(0.75 / 3)
    assert default["P@0.9"] == pytest.approx(1 / 3) and lavt["P@0.9"] == 0.0
    assert sample_ious(np.array([0, 2]), np.array([0, 4]), empty_iou=0.0).tolist() == [0.0, 0.5]
    assert summarize([0], [0], empty_iou=0.0)["oIoU"] == 0.0 and summarize([0], [0])["oIoU"] == 1.0
    acc = MetricAccumulator()
    empty = torch.zeros(2, 2, dtype=torch.bool)
    acc.add("k_1", empty, empty)
    assert acc.summary()["by_size"][0]["mIoU"] == 1.0 and acc.summary(empty_iou=0.0)["by_size"][0]["mIoU"] == 0.0


# -- every expression of the refer API, scored ------------------------------------------------------------


@pytest.fixture(scope="module")
def refcoco(tmp_path_factory):
    root = tmp_path_factory.mktemp("refcoco")
    fixture = build_refer_fixture(root / "src")
    prepare_refer("refcoco", fixture.refer_root, fixture.images_dir, root / "out", shard_size=3, workers=1)
    return root / "out"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_trained_run(tmp_path_factory.mktemp("run"), seed=5)


def shard_masks(data: Path, split: str) -> dict[str, np.ndarray]:
    """key → stored mask (bool) of every sample of the split, read with tarfile alone."""
    masks = {}
    for name in read_manifest(data)["splits"][split]["shards"]:
        with tarfile.open(data / name) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".mask.png"):
                    masks[member.name.split(".")[0]] = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read()))) > 127
    return masks


class Nothing(torch.nn.Module):
    def forward(self, images, text_ids, text_padding_mask):
        return torch.full((len(images), 1, 8, 8), -10.0)


@pytest.mark.parametrize("text_field", ["sent", "raw"])
def test_eval_scores_every_refer_api_expression(refcoco, tmp_path, text_field):
    """testB holds a ref whose sentences are all empty, one with an empty mask, one with two
    overlapping polygons, and sentences whose sent is empty but raw is not: all are scored."""
    recipe = load_recipe("tiny", [f"data.text_field={text_field}"])
    tokenizer = Tokenizer(train_tokenizer(tmp_path / "spm.model"), recipe.model.max_text_len)
    batches = list(build_eval_loader(refcoco, "testB", recipe, tokenizer, num_workers=0, batch_size=4))
    refs, sentences = len([r for r in REFS[("refcoco", "unc")] if r[2] == "testB"]), sum(len(r[3]) for r in REFS[("refcoco", "unc")] if r[2] == "testB")
    texts_seen = [t for b in batches for t in b["texts"]]
    assert len(texts_seen) == sentences and refs == len({k for b in batches for k in b["keys"]})
    field = 0 if text_field == "raw" else 1
    assert sorted(texts_seen) == sorted(texts(s)[field] for r in REFS[("refcoco", "unc")] if r[2] == "testB" for s in r[3])
    assert "" in texts_seen  # an empty text is scored, tokenised as <s></s>
    for batch in batches:
        for text, ids in zip(batch["texts"], batch["text_ids"]):
            if not text.strip():
                assert ids.tolist() == [0, 2] + [1] * (recipe.model.max_text_len - 2)

    # an empty prediction everywhere: only the empty-mask ref's sentences have an empty union
    empty_gt = sum(len(sents) for _, ann, split, sents in REFS[("refcoco", "unc")] if split == "testB" and ANNS[ann][2] == "empty")
    assert empty_gt > 0
    acc = evaluate_model(Nothing(), batches, threshold=0.5)
    assert acc.summary()["n"] == sentences
    assert acc.summary()["mIoU"] == pytest.approx(empty_gt / sentences)
    assert acc.summary(empty_iou=0.0)["mIoU"] == 0.0


# -- saved masks reproduce the figures ----------------------------------------------------------------------


def recompute(folder: Path, inclusive: bool, empty_iou: float) -> dict:
    """oIoU, mIoU, P@X and n from the saved PNGs alone, with numpy."""
    inters, unions = [], []
    for path in sorted(folder.glob("*.png")):
        key = path.stem.rsplit("_", 1)[0]
        pred = np.asarray(Image.open(path)) > 127
        target = np.asarray(Image.open(folder / "gt" / f"{key}.png")) > 127
        assert pred.shape == target.shape
        inters.append(int((pred & target).sum()))
        unions.append(int((pred | target).sum()))
    inters, unions = np.array(inters), np.array(unions)
    ious = np.array([i / u if u else empty_iou for i, u in zip(inters, unions)])
    out = {"oIoU": inters.sum() / unions.sum(), "mIoU": ious.mean(), "n": len(ious)}
    for x in (0.5, 0.7, 0.9):
        out[f"P@{x}"] = np.mean(ious >= x) if inclusive else np.mean(ious > x)
    return out


@pytest.mark.parametrize("preset", ["default", "lavt"])
def test_saved_masks_reproduce_the_json(refcoco, run, tmp_path, preset):
    masks = tmp_path / "masks"
    report = evaluate_run(run, refcoco, "testB", protocol=preset, save_masks=masks, num_workers=0, batch_size=3)
    protocol, figures = report["protocol"], report["splits"]["testB"]
    again = recompute(masks / "testB", protocol["inclusive"], protocol["empty_iou"])
    assert figures["n"] == again["n"] == sum(len(r[3]) for r in REFS[("refcoco", "unc")] if r[2] == "testB")
    for name in ("oIoU", "mIoU", "P@0.5", "P@0.7", "P@0.9"):
        assert figures[name] == pytest.approx(again[name], abs=1e-12), name
    # the saved ground truth is the shards' mask, at the scoring resolution (LAVT's resize for lavt)
    stored = shard_masks(refcoco, "testB")
    assert {p.stem for p in (masks / "testB" / "gt").glob("*.png")} == set(stored)
    for key, mask in stored.items():
        saved = np.asarray(Image.open(masks / "testB" / "gt" / f"{key}.png")) > 127
        side = protocol["image_size"]
        np.testing.assert_array_equal(saved, mask if preset == "default" else pil_lavt_target(mask, side))
    assert any(not m.any() for m in stored.values())  # the empty-mask ref is among them


def test_cli_empty_iou_override_and_json(refcoco, run, tmp_path):
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(app, ["eval", "-c", str(run), "-d", str(refcoco), "-s", "testB", "--protocol", "lavt",
                                      "--empty-iou", "1", "--json", str(out), "--workers", "0"])  # fmt: skip
    assert result.exit_code == 0, result.output
    protocol = json.loads(out.read_text())["protocol"]
    assert protocol["empty_iou"] == 1.0 and protocol["resolution"] == "input" and "both empty: IoU 1" in result.output
    result = CliRunner().invoke(app, ["eval", "-c", str(run), "-d", str(refcoco), "-s", "testB", "--empty-iou", "0.5"])
    assert result.exit_code == 2 and "Traceback" not in result.output
