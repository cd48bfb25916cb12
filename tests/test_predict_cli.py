"""``sris predict`` through the CLI layer, and the memory bound on a 12-megapixel photo."""

import json
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from cli.main import app
from fixtures_predict import gradient, image_folder, trained_run, write_image_zoo  # noqa: F401

runner = CliRunner()


def test_cli_skips_unreadable_files_and_exits_1(tmp_path, trained_run):
    zoo = write_image_zoo(tmp_path / "zoo")
    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", str(tmp_path / "zoo"), "the red circle", "--checkpoint", str(trained_run), "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "6 prediction(s)" in result.output
    assert "2 file(s) skipped" in result.output and str(zoo["truncated"]) in result.output and str(zoo["fake"]) in result.output
    assert "ignored 1 file(s)" in result.output
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 6


def test_cli_one_image_with_attention_and_explicit_tokenizer(tmp_path, trained_run):
    image = tmp_path / "photo.jpg"
    gradient(40, 30).save(image)
    args = ["predict", str(image), "the blue square", "-c", str(trained_run), "-o", str(tmp_path / "out"), "--attention",
            "--tokenizer", str(trained_run.parent / "spm.model"), "--device", "cpu", "--batch-size", "1"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["photo.attn_decoder.jpg", "photo.attn_encoder.jpg", "photo.attn_fpn.jpg", "photo.mask.png", "photo.overlay.jpg", "predictions.jsonl"]


def test_cli_prompts_without_text(tmp_path, trained_run):
    folder = image_folder(tmp_path / "in", {"a.png": (20, 20), "b.png": (20, 20)})
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("file,text\na.png,the circle\n")
    result = runner.invoke(app, ["predict", str(folder), "--prompts", str(prompts), "-c", str(trained_run), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["file"] for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()] == ["a.png"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["", "-c", "missing.pt"], "empty referring expression"),
        (["the cup", "-c", "missing.pt"], "no such checkpoint file"),
        (["the cup", "-c", "missing.pt", "--device", "cuda"], None),  # cuda absent here, or the checkpoint is missing
    ],
)
def test_cli_user_errors_are_one_line(tmp_path, args, message):
    gradient(10, 10).save(tmp_path / "a.png")
    result = runner.invoke(app, ["predict", str(tmp_path / "a.png"), *args, "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error:") and len(result.output.strip().splitlines()) == 1
    if message:
        assert message in result.output
    assert not (tmp_path / "out").exists()


MEMORY_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from shared_ris.predict import predict_folder

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) / 1024

    checkpoint, small, big, out = map(Path, sys.argv[1:])
    predict_folder(small, "the red circle", checkpoint, out_dir=out / "warm")  # imports, weights, thread pools
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    base = status("VmRSS")
    predict_folder(big, "the red circle", checkpoint, out_dir=out / "big")
    print(status("VmHWM") - base)
    """
)


@pytest.mark.slow
def test_12_megapixel_photo_stays_in_bounded_memory(tmp_path, trained_run):
    small, big = tmp_path / "small.jpg", tmp_path / "big.jpg"
    gradient(64, 48).save(small)
    gradient(4000, 3000).save(big, quality=85)
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(trained_run), str(small), str(big), str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    peak_mb = float(done.stdout.strip().splitlines()[-1])
    # RGB pixels are 36 MB and one float map 48 MB; the predictor never holds more than a few of them
    assert peak_mb < 400, f"peak RSS grew by {peak_mb:.0f} MB on a 4000×3000 image"
    from PIL import Image

    assert Image.open(tmp_path / "big" / "big.mask.png").size == (4000, 3000)
