"""``sris eval`` on a run's checkpoint reports exactly what training's last validation logged."""

import json

from typer.testing import CliRunner

import shared_ris
from cli.main import app
from shared_ris.data import prepare_synthetic
from shared_ris.train import train


def test_eval_repeats_the_last_validation_of_training(tmp_path):
    prepare_synthetic(tmp_path / "data", train=16, val=6, test=0, size=64, workers=1)
    recipe = shared_ris.load_recipe("tiny", ["train.epochs=1", "train.batch_size=8", "data.num_workers=0", "train.eval_every=1"])
    train(recipe, tmp_path / "data", tmp_path / "run")
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last_val = [line for line in logged if line.get("split") == "val"][-1]

    out = tmp_path / "eval.json"
    args = ["eval", "-c", str(tmp_path / "run" / "last.pt"), "-d", str(tmp_path / "data"), "--json", str(out), "--workers", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())["splits"]["val"]
    assert {k: figures[k] for k in ("oIoU", "mIoU", "P@0.5", "P@0.7", "P@0.9", "n")} == {
        k: last_val[k] for k in ("oIoU", "mIoU", "P@0.5", "P@0.7", "P@0.9", "n")
    }
    assert f"{100 * last_val['oIoU']:.2f}" in result.output
