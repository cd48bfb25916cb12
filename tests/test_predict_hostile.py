"""``sris predict`` on hostile or careless input: prompts files that point outside the folder,
names that collide, images that decode to far more memory than their file size, and malformed
prompts or output folders. Each must give one line and exit 2 (or a listed skip), never a
traceback, a silent drop or a file written outside ``--out``."""

import hashlib
import json
import os
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from shared_ris import predict as predict_module
from fixtures_predict import gradient, image_folder, trained_run  # noqa: F401
from shared_ris.errors import SharedRISError
from shared_ris.predict import predict_folder
from shared_ris.predictor import Predictor, open_image

runner = CliRunner()


def sris_predict(*args) -> "CliRunner.invoke":
    return runner.invoke(app, ["predict", *map(str, args)])


def assert_one_error_line(result, *names: str) -> None:
    """Exit 2, one non-empty line of output, it starts with ``error:`` and names ``names``."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert all(name in lines[0] for name in names), lines[0]
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


def digests(root: Path, leave_out: Path) -> dict[str, str]:
    """Every folder, file and link under ``root`` except ``leave_out`` and what is inside it →
    "dir", its sha256 or its link target."""
    listing = {}
    for folder, subfolders, files in os.walk(root):
        for name in subfolders + files:
            path = Path(folder, name)
            if path == leave_out or leave_out in path.parents:
                continue
            key = path.relative_to(root).as_posix()
            if path.is_symlink():
                listing[key] = "link:" + os.readlink(path)
            elif path.is_dir():
                listing[key] = "dir"
            else:
                listing[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return listing


def write_prompts(path: Path, entries: list[dict]) -> Path:
    path.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_every_result_kept(out: Path, folder: Path, expected: int) -> list[dict]:
    """``expected`` records, output names distinct under case-folding, and every mask / overlay on
    disk has the size of the image its record names (a result overwritten by another would not)."""
    records = read_jsonl(out / "predictions.jsonl")
    assert len(records) == expected
    for key in ("mask", "overlay"):
        assert len({r[key].casefold() for r in records}) == expected, [r[key] for r in records]
    for record in records:
        size = Image.open(folder / record["file"]).size
        assert Image.open(out / record["mask"]).size == size, record
        assert Image.open(out / record["overlay"]).size == size, record
    return records


# -- 1. a prompts file cannot reach outside PATH's folder -----------------------------------------


@pytest.fixture
def victim_layout(tmp_path):
    """tmp_path/in/a.png (+ in/sub/), tmp_path/victim/photo.jpg with a mask of its own."""
    folder, victim = tmp_path / "in", tmp_path / "victim"
    (folder / "sub").mkdir(parents=True)
    victim.mkdir()
    gradient(20, 16).save(folder / "a.png")
    gradient(30, 20).save(victim / "photo.jpg")
    (victim / "photo.mask.png").write_bytes(b"the victim's own mask")
    return folder, victim


@pytest.mark.parametrize("escape", ["../victim/photo.jpg", "sub/../../victim/photo.jpg", "absolute", "/etc/hostname", "symlink"])
def test_a_prompts_entry_cannot_leave_the_folder(tmp_path, trained_run, victim_layout, escape):
    folder, victim = victim_layout
    if escape == "absolute":
        escape = str(victim / "photo.jpg")
    elif escape == "symlink":
        (folder / "link").symlink_to(victim, target_is_directory=True)
        escape = "link/photo.jpg"
    prompts = write_prompts(tmp_path / "prompts.jsonl", [{"file": "a.png", "text": "the cup"}, {"file": escape, "text": "the photo"}])
    out = tmp_path / "out"
    before = digests(tmp_path, out)
    result = sris_predict(folder, "--prompts", prompts, "-c", trained_run, "-o", out)
    assert_one_error_line(result, f"{prompts}:2")
    assert digests(tmp_path, out) == before  # nothing outside --out was written, deleted or created
    assert not out.exists()  # refused while planning, before the model loaded


def test_an_absolute_path_inside_the_folder_is_accepted(tmp_path, trained_run, victim_layout):
    folder, _ = victim_layout
    prompts = write_prompts(tmp_path / "prompts.jsonl", [{"file": str(folder.resolve() / "a.png"), "text": "the cup"}])
    summary = predict_folder(folder, None, trained_run, out_dir=tmp_path / "out", prompts=prompts)
    assert summary.predictions == 1 and not summary.skipped
    assert read_jsonl(tmp_path / "out" / "predictions.jsonl")[0]["file"] == "a.png"


@pytest.mark.parametrize("planted, batch_pixels", [("a.mask.png", "1"), ("a.mask.png", "1000000"), ("predictions.jsonl", "1000000")])
def test_outputs_are_not_written_through_a_link_out_of_the_output_folder(tmp_path, trained_run, victim_layout, planted, batch_pixels):
    """With --batch-pixels 1, a.png's batch is written while b.png is being opened."""
    folder, victim = victim_layout
    gradient(20, 16).save(folder / "b.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / planted).symlink_to(victim / "photo.mask.png")
    before = digests(tmp_path, out)
    result = sris_predict(folder, "the cup", "-c", trained_run, "-o", out, "--batch-pixels", batch_pixels)
    assert_one_error_line(result, planted)
    assert digests(tmp_path, out) == before


# -- 2. output names never collide ----------------------------------------------------------------


def test_case_variants_and_lookalike_names_all_keep_their_results(tmp_path, trained_run):
    sizes = {"cup.jpg": (20, 16), "cup.JPG": (24, 18), "CUP.png": (22, 14), "cup_jpg.png": (18, 20), "cup_JPG.gif": (16, 12)}
    folder = image_folder(tmp_path / "in", sizes)
    runs = []
    for run in ("first", "second"):
        predict_folder(folder, "the cup", trained_run, out_dir=tmp_path / run)
        records = assert_every_result_kept(tmp_path / run, folder, len(sizes))
        runs.append({r["file"]: r["mask"] for r in records})
    assert runs[0] == runs[1]  # deterministic
    # today's convention where it is enough, a counter in sorted order where it is not
    assert runs[0]["cup.JPG"] == "cup_jpg.mask.png" and runs[0]["cup.jpg"] == "cup_jpg_2.mask.png"


def test_a_dotted_name_does_not_collide_with_several_texts(tmp_path, trained_run):
    folder = image_folder(tmp_path / "in", {"a.png": (20, 16), "a.0.png": (26, 14)})  # a.0: NAME.0 of a.png's first text
    prompts = write_prompts(tmp_path / "p.jsonl", [{"file": "a.png", "text": "the cup"}, {"file": "a.png", "text": "the plate"}])
    summary = predict_folder(folder, "the bowl", trained_run, out_dir=tmp_path / "out", prompts=prompts)
    assert summary.predictions == 3
    assert_every_result_kept(tmp_path / "out", folder, 3)


def test_two_spellings_of_one_image_are_one_image(tmp_path, trained_run):
    folder = image_folder(tmp_path / "in", {"a.png": (20, 16)})
    (folder / "sub").mkdir()
    os.link(folder / "a.png", folder / "sub" / "same.png")  # one file, as cup.JPG is cup.jpg on a case-insensitive disk
    texts = ["the cup", "the plate", "the bowl", "the fork", "the knife"]
    spellings = ["a.png", "sub/../a.png", str(folder / "a.png"), "./a.png", "sub/same.png"]
    prompts = write_prompts(tmp_path / "p.jsonl", [{"file": f, "text": t} for f, t in zip(spellings, texts)])
    out = tmp_path / "out"
    predict_folder(folder, None, trained_run, out_dir=out, prompts=prompts)
    records = assert_every_result_kept(out, folder, 5)
    assert [(r["file"], r["text"], r["mask"]) for r in records] == [("a.png", t, f"a.{i}.mask.png") for i, t in enumerate(texts)]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == []  # no out/sub from "sub/../a"


# -- 3. bounded decoded pixels --------------------------------------------------------------------


def test_an_image_over_the_pixel_limit_is_skipped_from_its_header(tmp_path, trained_run):
    folder = image_folder(tmp_path / "in", {"small.png": (20, 16)})
    Image.new("1", (400, 300), 1).save(folder / "big_full.png")
    whole = (folder / "big_full.png").read_bytes()
    (folder / "big_full.png").unlink()
    (folder / "big.png").write_bytes(whole[: len(whole) - 30])  # header intact, pixel data cut short
    summary = predict_folder(folder, "the cup", trained_run, out_dir=tmp_path / "out", max_pixels=100_000)
    assert summary.predictions == 1
    [(file, reason)] = summary.skipped
    assert file == str(folder / "big.png")
    assert "400×300" in reason and "100000" in reason.replace(",", "") and "--max-pixels" in reason  # not "cannot read"
    with pytest.raises(SharedRISError, match="--max-pixels"):
        open_image(folder / "big.png", max_pixels=119_999)
    assert open_image(folder / "small.png", max_pixels=320).size == (20, 16)  # the limit itself is allowed


def test_the_default_limit_skips_a_tiny_file_that_decodes_to_72_megapixels(tmp_path, trained_run):
    folder = image_folder(tmp_path / "in", {"photo.png": (20, 16)})
    Image.new("1", (9000, 8000), 0).save(folder / "bomb.png")  # ~9 KB, under Pillow's own limit
    assert (folder / "bomb.png").stat().st_size < 20_000
    result = sris_predict(folder, "the cup", "-c", trained_run, "-o", tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert "1 prediction(s)" in result.output and "1 file(s) skipped" in result.output
    assert f"skipped {folder / 'bomb.png'}" in result.output and "Traceback" not in result.output
    assert [r["file"] for r in read_jsonl(tmp_path / "out" / "predictions.jsonl")] == ["photo.png"]


def test_max_pixels_option_and_its_check(tmp_path, trained_run):
    gradient(20, 16).save(tmp_path / "a.png")
    result = sris_predict(tmp_path / "a.png", "the cup", "-c", trained_run, "-o", tmp_path / "out", "--max-pixels", "319")
    assert result.exit_code == 1 and "1 file(s) skipped" in result.output, result.output
    result = sris_predict(tmp_path / "a.png", "the cup", "-c", tmp_path / "missing.pt", "-o", tmp_path / "out2", "--max-pixels", "0")
    assert_one_error_line(result, "--max-pixels")


def test_a_batch_is_flushed_early_when_its_pixels_exceed_the_budget(tmp_path, trained_run, monkeypatch):
    sides = {"a.png": 100, "b.png": 100, "c.png": 100, "d.png": 160, "e.png": 100}  # 10 000 or 25 600 pixels
    folder = image_folder(tmp_path / "in", {name: (side, side) for name, side in sides.items()})
    batches = []
    original = Predictor.predict_tensors

    def spy(self, pixels, sizes, texts, attention=False):
        batches.append([h * w for h, w in sizes])
        return original(self, pixels, sizes, texts, attention)

    monkeypatch.setattr(Predictor, "predict_tensors", spy)
    summary = predict_folder(folder, "the cup", trained_run, out_dir=tmp_path / "out", batch_size=8, batch_pixels=25_000)
    assert summary.predictions == 5
    # filled in order, a batch never holds more than 25 000 pixels unless one image alone does
    assert batches == [[10_000, 10_000], [10_000], [25_600], [10_000]]


def test_a_failure_writing_an_earlier_batch_is_not_blamed_on_the_next_image(tmp_path, trained_run, monkeypatch):
    folder = image_folder(tmp_path / "in", {"a.png": (20, 16), "b.png": (20, 16)})
    original, calls = predict_module.save_mask, []

    def fails_once(mask, path):
        calls.append(path)
        if len(calls) == 1:
            raise ValueError("disk trouble")
        original(mask, path)

    monkeypatch.setattr(predict_module, "save_mask", fails_once)
    # a.png's batch is flushed while b.png is opened (batch_pixels=1): the error is the run's, and
    # b.png must not be reported as an unreadable image
    with pytest.raises(ValueError, match="disk trouble"):
        predict_folder(folder, "the cup", trained_run, out_dir=tmp_path / "out", batch_pixels=1)
    assert calls == [tmp_path / "out" / "a.mask.png"]


# -- 4. malformed prompts and output folders: one line, before the model loads --------------------


@pytest.mark.parametrize("suffix, content", [(".csv", b"file,text\na.png,caf\xe9 cup\n"), (".jsonl", b'{"file": "a.png", "text": "caf\xe9"}\n')])
def test_a_prompts_file_that_is_not_utf8(tmp_path, suffix, content):
    gradient(20, 16).save(tmp_path / "a.png")
    prompts = tmp_path / f"prompts{suffix}"
    prompts.write_bytes(content)
    result = sris_predict(tmp_path, "--prompts", prompts, "-c", tmp_path / "missing.pt", "-o", tmp_path / "out")
    assert_one_error_line(result, str(prompts), "UTF-8")  # named before the missing checkpoint is noticed


@pytest.mark.parametrize("entry", [
    {"file": 3, "text": "the cup"}, {"file": ["a.png"], "text": "the cup"}, {"file": None, "text": "the cup"},
    {"file": "a.png", "text": 7}, {"file": "a.png", "text": ["the cup"]}, {"file": "a.png", "text": None},
    {"file": {"name": "a.png"}, "text": "the cup"}, {"file": True, "text": "the cup"},
])  # fmt: skip
def test_a_prompts_entry_whose_file_or_text_is_not_a_string(tmp_path, entry):
    gradient(20, 16).save(tmp_path / "a.png")
    prompts = write_prompts(tmp_path / "prompts.jsonl", [{"file": "a.png", "text": "the bowl"}, entry])
    result = sris_predict(tmp_path, "--prompts", prompts, "-c", tmp_path / "missing.pt", "-o", tmp_path / "out")
    assert_one_error_line(result, f"{prompts}:2", "must be a string")


@pytest.mark.parametrize("below", [False, True])
def test_out_that_is_an_existing_file(tmp_path, below):
    gradient(20, 16).save(tmp_path / "a.png")
    existing = tmp_path / "results.txt"
    existing.write_text("keep me")
    out = existing / "masks" if below else existing
    result = sris_predict(tmp_path / "a.png", "the cup", "-c", tmp_path / "missing.pt", "-o", out)
    assert_one_error_line(result, str(existing), "folder")
    assert existing.read_text() == "keep me"


def test_file_names_and_texts_are_printed_as_they_are(tmp_path, trained_run):
    """Names and texts are data, not console markup: ``[/x]`` must neither crash nor vanish."""
    gradient(20, 16).save(tmp_path / "a.png")
    prompts = write_prompts(tmp_path / "p.jsonl", [{"file": "a.png", "text": "the cup [/x]"}, {"file": "[/x].png", "text": "the [bold]"}])
    result = sris_predict(tmp_path, "--prompts", prompts, "-c", trained_run, "-o", tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert "skipped [/x].png: file named in the prompts not found" in result.output and "Traceback" not in result.output



def test_an_error_quoting_a_prompts_file_is_printed_as_it_is(tmp_path):
    gradient(20, 16).save(tmp_path / "a.png")
    prompts = write_prompts(tmp_path / "p.jsonl", [{"file": "../[/x].png", "text": "the cup"}])
    result = sris_predict(tmp_path, "--prompts", prompts, "-c", tmp_path / "missing.pt", "-o", tmp_path / "out")
    assert_one_error_line(result, f"{prompts}:1", "'../[/x].png'")
