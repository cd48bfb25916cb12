"""Defects of the untrusted-files issue that need more than one command: the working directory as
``--data``, resuming a damaged preparation, folders named like URLs, and killed launchers."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli.main import main
from fixtures_predict import make_trained_run
from hostile_fixtures import make_data, manifest, read_members, shard_path, write_manifest, write_tar
from shared_ris import build_model, load_recipe
from shared_ris.checkpoint import load_run, read_trained, save_trained
from shared_ris.data import build_eval_loader, prepare_synthetic, read_manifest
from shared_ris.distributed import child_processes
from shared_ris.errors import SharedRISError
from shared_ris.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("data_arg", [".", ""])
def test_manifest_shard_names_never_run_a_command_from_the_working_directory(tmp_path, monkeypatch, capsys, data_arg):
    data = make_data(tmp_path / "data")
    document = manifest(data)
    document["splits"]["train"]["shards"] = ["pipe:touch PWNED; cat synthetic-train-000000.tar"]
    write_manifest(data, document)
    monkeypatch.chdir(data)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", data_arg, "--recipe", "tiny", "--out", str(tmp_path / "run"), "--set", "train.batch_size=4"])
    assert exit_info.value.code == 2
    assert not (data / "PWNED").exists() and not (tmp_path / "PWNED").exists()
    assert "Traceback" not in capsys.readouterr().err


def test_a_rerun_of_prepare_rebuilds_a_truncated_shard(tmp_path):
    data = make_data(tmp_path / "data")
    path = shard_path(data, "val")
    original = hashlib.sha256(path.read_bytes()).hexdigest()
    write_tar(path, read_members(path)[:3])  # one whole sample of four: a valid tar, cut short
    prepare_synthetic(data, train=8, val=4, test=0, size=64, shard_size=100, workers=1)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == original
    assert read_manifest(data)["splits"]["val"]["samples"] == 4


@pytest.mark.parametrize("name", ["syn{}x", "syn:x", "http:x"])
def test_a_local_folder_named_like_a_url_is_a_folder(tmp_path, monkeypatch, name):
    data = make_data(tmp_path / "data")
    shutil.copytree(data, tmp_path / name)
    monkeypatch.chdir(tmp_path)  # as typed: --data syn:x
    recipe = load_recipe("tiny")
    tokenizer = Tokenizer(Path(name) / "spm.model", max_len=recipe.model.max_text_len)
    batches = list(build_eval_loader(name, "val", recipe, tokenizer, num_workers=0))
    assert sum(len(b["keys"]) for b in batches) == read_manifest(name)["splits"]["val"]["sentences"]


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent has not collected it yet


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux's")
def test_killing_the_launcher_takes_torchrun_and_its_workers_down(tmp_path):
    data = make_data(tmp_path / "data")
    run = tmp_path / "run"
    small = ["model.image_size=64", "model.encoder.depth=2", "model.fpn.stages=[1,2]", "train.batch_size=2", "train.epochs=1000",
             "train.log_every=1", "data.num_workers=0"]  # fmt: skip
    command = [sys.executable, "-m", "cli.main", "train", "--data", str(data), "--recipe", "tiny", "--out", str(run), "--nproc", "2"]
    launcher = subprocess.Popen([*command, *(f"--set={o}" for o in small)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, 120, "training to start")
    [torchrun] = child_processes(launcher.pid)
    workers = child_processes(torchrun)
    assert len(workers) == 2
    launcher.kill()
    launcher.wait()
    _wait_for(lambda: not any(_alive(pid) for pid in [torchrun, *workers]), 90, "torchrun and its workers to exit")
    assert (run / "last.pt").is_file()  # the workers got SIGTERM and saved before exiting
    resumed = subprocess.run([*command, "--resume", "auto", *(f"--set={o}" for o in small[:-3]), "--set=train.epochs=1"],
                             cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux's")
def test_killing_prepare_takes_its_pool_workers_down(tmp_path):
    command = [sys.executable, "-m", "cli.main", "prepare", "synthetic", "--out", str(tmp_path / "data"), "--train", "4000",
               "--val", "0", "--test", "0", "--shard-size", "50", "--workers", "2", "--examples", "0"]  # fmt: skip
    parent = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: len(child_processes(parent.pid)) >= 2 and any((tmp_path / "data").glob("*.tar")), 120, "the pool to work")
    workers = child_processes(parent.pid)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    _wait_for(lambda: not any(_alive(pid) for pid in workers), 30, "the pool workers to exit")


def test_a_tokenizer_path_recorded_in_a_checkpoint_is_not_followed_outside_its_folder(tmp_path):
    source = make_trained_run(tmp_path / "source")
    trained = read_trained(source)
    (tmp_path / "elsewhere").mkdir()
    shutil.move(source.parent / "spm.model", tmp_path / "elsewhere" / "spm.model")
    with_path = tmp_path / "run" / "best.pt"
    with_path.parent.mkdir()
    model = build_model(trained.recipe)
    model.load_state_dict(trained.state_dict)
    save_trained(model, trained.recipe, with_path, tokenizer_path=str(tmp_path / "elsewhere" / "spm.model"))
    with pytest.raises(SharedRISError, match="no tokenizer found"):
        load_run(with_path)
    shutil.copy(tmp_path / "elsewhere" / "spm.model", with_path.parent / "spm.model")  # the recorded name, beside it
    assert load_run(with_path)[2].path == with_path.parent / "spm.model"
