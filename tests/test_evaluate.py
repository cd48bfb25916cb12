"""evaluate_run / sris eval on a small synthetic split: protocols, saved masks, JSON, 2 ranks == 1 rank."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from fixtures_predict import make_trained_run
from shard_reading import all_sentences
from shared_ris.data import prepare_synthetic
from shared_ris.errors import SharedRISError
from shared_ris.evaluate import PROTOCOLS, Protocol, evaluate_model, evaluate_run, resolve_protocol
from shared_ris.model import logits_to_mask

runner = CliRunner()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    prepare_synthetic(folder, train=0, val=10, test=6, size=64, workers=1)
    return folder


def sentences(data_dir, split: str) -> int:
    return sum(all_sentences(data_dir, split).values())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_trained_run(tmp_path_factory.mktemp("run"), seed=3)


@pytest.fixture(scope="module")
def single(run, data_dir):
    return evaluate_run(run, data_dir, "val,test", num_workers=0, batch_size=4)


def test_report_layout_and_ranges(single, run, data_dir):
    assert single["checkpoint"] == str(run)
    assert single["protocol"] == {
        "resolution": "original", "threshold": 0.35, "inclusive": False, "empty_iou": 1.0, "resampling": "bilinear", "image_size": 128,
        "description": "protocol: masks at original size, σ>0.35, P@X: IoU > X, both empty: IoU 1, per expression",
    }  # fmt: skip
    assert list(single["splits"]) == ["val", "test"]
    val = single["splits"]["val"]
    assert val["n"] == sentences(data_dir, "val") and single["splits"]["test"]["n"] == sentences(data_dir, "test")  # each once
    for key in ("oIoU", "mIoU", "P@0.5", "P@0.7", "P@0.9"):
        assert 0.0 <= val[key] <= 1.0
    assert sum(row["n"] for row in val["by_size"]) == val["n"]
    json.dumps(single)  # plain JSON types only


def test_batch_size_and_workers_do_not_change_the_figures(single, run, data_dir):
    other = evaluate_run(run, data_dir, ["val", "test"], num_workers=2, batch_size=3)
    assert other["splits"] == single["splits"]


def test_lavt_protocol_scores_at_the_input_size(run, data_dir):
    lavt = resolve_protocol("lavt")
    chosen = Protocol(resolution=lavt.resolution, threshold=lavt.threshold, inclusive=lavt.inclusive, empty_iou=lavt.empty_iou)
    report = evaluate_run(run, data_dir, "val", protocol=chosen, num_workers=0)
    assert evaluate_run(run, data_dir, "val", protocol="lavt", num_workers=0) == report
    assert report["protocol"]["description"] == (
        "protocol: masks at 128×128 input size (ground truth resized, PIL nearest), σ>0.5, P@X: IoU ≥ X, both empty: IoU 0, per expression"
    )
    assert report["splits"]["val"]["n"] == sentences(data_dir, "val")


def test_protocol_presets_and_overrides():
    assert PROTOCOLS["default"] == Protocol("original", None, False, 1.0)
    assert PROTOCOLS["lavt"] == Protocol("input", 0.5, True, 0.0)
    assert resolve_protocol("lavt", resolution="original") == Protocol("original", 0.5, True, 0.0)
    assert resolve_protocol("default", threshold=0.4, inclusive=True) == Protocol("original", 0.4, True, 1.0)
    assert resolve_protocol("lavt", empty_iou=1) == Protocol("input", 0.5, True, 1.0)
    with pytest.raises(SharedRISError, match="must be 1 or 0"):
        Protocol(empty_iou=0.5)
    assert PROTOCOLS["cris"] == Protocol("original", 0.35, False, 0.0, "cris")
    with pytest.raises(SharedRISError, match="unknown protocol"):
        resolve_protocol("mattnet")
    with pytest.raises(SharedRISError, match="resampling"):
        Protocol(resampling="nearest")
    with pytest.raises(SharedRISError, match="threshold"):
        Protocol(threshold=1.5)
    with pytest.raises(SharedRISError, match="resolution"):
        Protocol(resolution="480")


def test_saved_masks_are_the_scored_masks(tmp_path, run, data_dir):
    report = evaluate_run(run, data_dir, "test", save_masks=tmp_path / "masks", num_workers=0)
    files = sorted((tmp_path / "masks" / "test").glob("*.png"))
    assert len(files) == report["splits"]["test"]["n"] == sentences(data_dir, "test")
    for file in files:
        mask = Image.open(file)
        assert mask.mode == "L" and mask.size == (64, 64)  # the synthetic images' original size
        assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}


def test_eval_scores_what_the_model_predicts():
    """evaluate_model on a hand-made batch: one perfect and one empty prediction."""

    class Fixed(torch.nn.Module):
        def forward(self, images, text_ids, text_padding_mask):
            logits = torch.full((2, 1, 4, 4), -10.0)
            logits[0, 0, :2, :2] = 10.0
            return logits

    target = torch.zeros(8, 8, dtype=torch.uint8)
    target[:4, :4] = 1
    batch = {
        "images": torch.zeros(2, 3, 16, 16), "text_ids": torch.zeros(2, 4, dtype=torch.long),
        "text_padding_mask": torch.zeros(2, 4, dtype=torch.bool), "orig_masks": [target, target],
        "keys": ["a", "b"], "sent_ids": [0, 1],
    }  # fmt: skip
    saved = {}
    acc = evaluate_model(Fixed(), [batch], threshold=0.35, on_mask=lambda k, s, m: saved.setdefault(f"{k}_{s}", m))
    stats = acc.summary()
    assert (stats["oIoU"], stats["mIoU"], stats["n"]) == (16 / 32, 0.5, 2)
    assert saved["a_0"].shape == (8, 8) and int(saved["a_0"].sum()) == 16 and int(saved["b_1"].sum()) == 0
    assert torch.equal(logits_to_mask(torch.full((1, 4, 4), 10.0), (8, 8), 0.35), torch.ones(8, 8, dtype=torch.bool))


def test_errors_are_one_line(tmp_path, run, data_dir):
    with pytest.raises(SharedRISError) as info:
        evaluate_run(run, data_dir, "testZ", num_workers=0)
    assert "testZ" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(SharedRISError, match="no split given"):
        evaluate_run(run, data_dir, " , ")


def test_cli_prints_tables_with_the_protocol_and_writes_json_and_plot(tmp_path, run, data_dir, single):
    out = tmp_path / "eval.json"
    plot = tmp_path / "by_size.png"
    result = runner.invoke(app, ["eval", "-c", str(run), "-d", str(data_dir), "-s", "val,test", "--json", str(out),
                                 "--plot", str(plot), "--workers", "0", "--batch-size", "4"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.output.count("protocol: masks at original size, σ>0.35, P@X: IoU > X, both empty: IoU 1, per expression") == 4
    assert f"{100 * single['splits']['val']['oIoU']:.2f}" in result.output
    assert json.loads(out.read_text()) == single
    assert Image.open(plot).size == (900, 520)


def test_cli_lavt_preset_with_an_override(tmp_path, run, data_dir):
    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", "-c", str(run), "-d", str(data_dir), "-s", "test", "--protocol", "lavt",
                                 "--precision", "strict", "--json", str(out), "--workers", "0"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "σ>0.5, P@X: IoU > X" in result.output
    assert json.loads(out.read_text())["protocol"]["inclusive"] is False


def test_cli_user_errors(tmp_path, run, data_dir):
    result = runner.invoke(app, ["eval", "-c", str(tmp_path / "nope.pt"), "-d", str(data_dir)])
    assert result.exit_code == 2 and "no such checkpoint file" in result.output
    result = runner.invoke(app, ["eval", "-c", str(run), "-d", str(data_dir), "--gpus", "2", "--nproc", "2"])
    assert result.exit_code == 2 and "not both" in result.output
    # the launcher checks before starting any rank: one line, not one per rank
    result = runner.invoke(app, ["eval", "-c", str(run), "-d", str(data_dir), "-s", "val,testZ", "--nproc", "2"])
    assert result.exit_code == 2 and "no samples for split 'testZ'" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_exactly(tmp_path, run, data_dir, single):
    out = tmp_path / "eval2.json"
    masks = tmp_path / "masks"
    result = runner.invoke(app, ["eval", "-c", str(run), "-d", str(data_dir), "-s", "val,test", "--nproc", "2",
                                 "--json", str(out), "--save-masks", str(masks), "--workers", "0", "--batch-size", "4"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text()) == single  # exact: integer records gathered and merged by key
    assert len(list((masks / "val").glob("*.png"))) == sentences(data_dir, "val")  # each rank saved its own share
