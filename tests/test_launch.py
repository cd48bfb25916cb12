"""The launcher re-runs the parsed command for torchrun's workers, minus its own options."""

from pathlib import Path

import typer
from typer.testing import CliRunner

from cli.launch import worker_args
from cli.main import app


def parsed_worker_args(monkeypatch, argv: list[str]) -> tuple[list[str], int]:
    """Run ``sris eval ARGV`` up to the relaunch; return the workers' arguments instead of launching."""
    seen = {}

    def fake_relaunch(ctx: typer.Context, processes: int, *, device):
        seen["args"], seen["processes"] = worker_args(ctx, device=device), processes
        raise typer.Exit(0)

    monkeypatch.setattr("cli.evaluate.relaunch", fake_relaunch)
    monkeypatch.setattr("cli.evaluate.check_eval_inputs", lambda *a, **k: None)
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    return seen["args"], seen["processes"]


def test_eval_workers_get_the_parsed_options_without_the_launcher_ones(monkeypatch, tmp_path):
    args, processes = parsed_worker_args(monkeypatch, [
        "eval", "-c", str(tmp_path / "best.pt"), "-d", str(tmp_path), "-s", "val,test", "--nproc=2",
        "--protocol", "lavt", "--precision", "strict", "--json", str(tmp_path / "e.json"),
    ])  # fmt: skip
    assert processes == 2 and args[0] == "eval"
    assert "--nproc" not in args and "--gpus" not in args
    pairs = dict(zip(args[1::2], args[2::2]))
    assert pairs["--checkpoint"] == str(tmp_path / "best.pt") and pairs["--data"] == str(tmp_path)
    assert pairs["--split"] == "val,test" and pairs["--protocol"] == "lavt" and pairs["--precision"] == "strict"
    assert pairs["--device"] == "cpu" and Path(pairs["--json"]) == tmp_path / "e.json"
    assert "--threshold" not in args  # not given: the worker resolves the same default


def test_train_workers_keep_every_override_and_a_resolved_out(monkeypatch, tmp_path):
    seen = {}

    def fake_relaunch(ctx, processes, *, device, out, **kwargs):
        seen["args"] = worker_args(ctx, device=device, out=out)
        raise typer.Exit(0)

    monkeypatch.setattr("cli.train.relaunch", fake_relaunch)
    monkeypatch.setattr("cli.train.preflight", lambda *a, **k: None)
    argv = ["train", "--data", str(tmp_path), "--recipe", "tiny", "--nproc", "2", "--set", "train.lr=1e-4",
            "--set", "model.fpn.stages=[2,4]", "--resume", "auto"]  # fmt: skip
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    args = seen["args"]
    assert args[:1] == ["train"] and "--nproc" not in args
    assert [args[i + 1] for i, a in enumerate(args) if a == "--set"] == ["train.lr=1e-4", "model.fpn.stages=[2,4]"]
    pairs = dict(zip(args[1::2], args[2::2]))
    assert pairs["--out"] == str(Path("runs") / "tiny") and pairs["--device"] == "cpu" and pairs["--resume"] == "auto"
