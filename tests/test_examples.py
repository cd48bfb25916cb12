import json

from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from shared_ris.data import export_examples


def test_export_examples_writes_images_and_prompts(tmp_path):
    folder = export_examples(tmp_path / "ex", count=3, size=96, seed=1)
    prompts = [json.loads(line) for line in (folder / "prompts.jsonl").read_text().splitlines()]
    assert [p["file"] for p in prompts] == ["000.jpg", "001.jpg", "002.jpg"]
    for p in prompts:
        assert p["text"].strip()
        assert Image.open(folder / p["file"]).size == (96, 96)
    again = export_examples(tmp_path / "ex2", count=3, size=96, seed=1)
    assert (again / "001.jpg").read_bytes() == (folder / "001.jpg").read_bytes()
    assert (again / "prompts.jsonl").read_text() == (folder / "prompts.jsonl").read_text()


def test_examples_are_not_training_images(tmp_path):
    out = tmp_path / "syn"
    result = CliRunner().invoke(app, ["prepare", "synthetic", "--out", str(out), "--train", "4", "--val", "2",
                                      "--test", "0", "--examples", "2", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert len(list((out / "examples").glob("*.jpg"))) == 2
    import tarfile

    with tarfile.open(out / "synthetic-train-000000.tar") as tar:
        train_jpgs = {tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")}
    assert not train_jpgs & {p.read_bytes() for p in (out / "examples").glob("*.jpg")}
