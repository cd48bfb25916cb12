"""``train()`` and ``sris train`` on real shards: one-line errors, the run folder, exact resume
through the shard loader, and SIGTERM through torchrun with 2 gloo processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from shared_ris import load_recipe
from shared_ris.data import prepare_synthetic, read_manifest
from shared_ris.train import train
from shared_ris.checkpoint import load_checkpoint
from train_helpers import SMALL_MODEL, sigterm_after_step

# The tiny recipe, smaller still: a step takes tens of milliseconds.
SMALL = [
    "model.image_size=64", "model.max_text_len=12", *SMALL_MODEL,
    "train.batch_size=4", "train.warmup_steps=2", "train.log_every=1", "train.eval_every=1", "data.num_workers=0",
]  # fmt: skip
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("synthetic")
    prepare_synthetic(folder, train=24, val=6, test=0, size=64, workers=1)
    return folder


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def invoke(*args: str):
    return CliRunner().invoke(app, ["train", *args])


def one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_errors_before_work_starts_are_one_line(data_dir, tmp_path):
    base = ["--recipe", "tiny", "--out", str(tmp_path / "run"), "--set", "train.batch_size=4"]
    one_line_error(invoke("--data", str(tmp_path / "nowhere"), *base), "nowhere", "data directory not found")
    one_line_error(invoke("--data", str(data_dir), "--tokenizer", str(tmp_path / "beit3.spm"), *base), "beit3.spm", "not found")
    one_line_error(invoke("--data", str(data_dir), "--pretrained", str(tmp_path / "b.pth"), *base), "b.pth", "pretrained file not found")
    one_line_error(invoke("--data", str(data_dir), "--gpus", str(torch.cuda.device_count() + 1), *base), "GPU")
    one_line_error(invoke("--data", str(data_dir), *base, "--set", "train.batch_size=64"), "24 samples", "train.batch_size")
    one_line_error(invoke("--data", str(data_dir), "--set", "model.encoder.vocab_size=5", *base), "vocab_size")
    one_line_error(invoke("--data", str(data_dir), "--set", "data.val_split=testB", *base), "testB")
    one_line_error(invoke("--data", str(data_dir), "--resume", str(tmp_path / "x.pt"), *base), "x.pt")
    assert not (tmp_path / "run").exists()


def test_cli_writes_the_run_folder_and_refuses_to_overwrite_it(data_dir, tmp_path):
    run = tmp_path / "run"
    args = ["--data", str(data_dir), "--recipe", "tiny", "--out", str(run), *(f"--set={o}" for o in SMALL)]
    result = invoke(*args, "--set", "train.epochs=2")
    assert result.exit_code == 0, result.output
    assert "done: 12 steps" in result.output
    assert {p.name for p in run.iterdir()} == {"recipe.yaml", "tokenizer.model", "metrics.jsonl", "last.pt", "best.pt"}
    assert (run / "tokenizer.model").read_bytes() == (data_dir / "spm.model").read_bytes()
    assert load_recipe(run / "recipe.yaml").train.epochs == 2
    lines = records(run)
    train_lines = [r for r in lines if "loss" in r]
    val_lines = [r for r in lines if r.get("split") == "val"]
    assert [r["step"] for r in train_lines] == list(range(1, 13))
    assert set(train_lines[0]) == {"step", "epoch", "loss", "bce", "dice", "lr", "img_s"}
    assert [(r["epoch"], r["step"]) for r in val_lines] == [(1, 6), (2, 12)]
    assert set(val_lines[0]) == {"epoch", "step", "split", "oIoU", "mIoU", "P@0.5", "P@0.7", "P@0.9", "n"}
    assert val_lines[0]["n"] == read_manifest(data_dir)["splits"]["val"]["sentences"] > 6  # every sentence, not one per ref
    best = load_checkpoint(run / "best.pt")
    assert best["best_oiou"] == max(r["oIoU"] for r in val_lines)
    assert best["tokenizer_path"] == "tokenizer.model"  # the copy beside it: the run folder is self-contained

    one_line_error(invoke(*args), "already holds a run", "--resume auto")
    result = invoke(*args, "--set", "train.epochs=3", "--resume", "auto")
    assert result.exit_code == 0, result.output
    assert "resumed from" in result.output and "train.epochs" in result.output
    assert load_checkpoint(run / "last.pt")["step"] == 18


def test_sigterm_and_resume_through_the_shard_loader_are_exact(data_dir, tmp_path):
    recipe = load_recipe("tiny", [*SMALL, "train.max_steps=10", "model.encoder.drop_path_rate=0.1"])  # 6 steps per epoch
    train(recipe, data_dir, tmp_path / "whole")

    assert train(recipe, data_dir, tmp_path / "split", progress=sigterm_after_step(4))["step"] == 5
    assert train(recipe, data_dir, tmp_path / "split", resume="auto")["step"] == 10
    a, b = (load_checkpoint(tmp_path / run / "last.pt")["model"] for run in ("whole", "split"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=0, rtol=0, msg=key)
    timeless = [[{k: v for k, v in r.items() if k != "img_s"} for r in records(tmp_path / run)] for run in ("whole", "split")]
    assert timeless[0] == timeless[1]  # same losses, lrs and validation figures at every step


@pytest.mark.slow
def test_torchrun_two_cpu_processes_stop_on_sigterm_and_exit_0(data_dir, tmp_path):
    run = tmp_path / "run"
    command = [
        sys.executable, "-m", "cli.main", "train", "--data", str(data_dir), "--recipe", "tiny", "--out", str(run),
        "--nproc", "2", *(f"--set={o}" for o in SMALL), "--set", "train.batch_size=2",
        "--set", "train.epochs=1000",
    ]  # fmt: skip
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").is_file() or len(records(run)) < 3:
        assert child.poll() is None and time.time() < deadline, child.stdout.read() if child.poll() is not None else "timeout"
        time.sleep(0.2)
    child.send_signal(signal.SIGTERM)
    output, _ = child.communicate(timeout=120)
    assert child.returncode == 0, output
    assert "Traceback" not in output and "SignalException" not in output, output  # torchrun ends quietly
    state = load_checkpoint(run / "last.pt")
    assert state["step"] >= 3 and len(state["rng"]) == 2
    assert output.count("stopped at step") == 1, output  # rank 0 speaks, rank 1 stays quiet
    steps = [r["step"] for r in records(run) if "loss" in r]
    assert steps == list(range(1, state["step"] + 1))
