"""Hostile inputs across prepare / train / eval / predict / flops, through the real ``sris`` entry.

Every case copies a tiny prepared set and a tiny trained run into its own folder, damages one input
the way a hostile (or broken) file would, runs one command and asserts: exit code 2; exactly one
line on stderr, starting with ``error:`` and naming the file; no traceback anywhere; and not one
file created, changed or deleted outside the command's output folder (a listing plus SHA-256 of
everything else before and after). Cases that try to run a command also check that its sentinel
file was never created.
"""

from __future__ import annotations

import json
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

from cli.main import main
from fixtures_predict import gradient, make_trained_run
from hostile_fixtures import (
    bomb_png, json_member, make_data, manifest, png, read_members, record_shard, replace_member,
    rewrite_samples, shard_path, snapshot, write_manifest, write_tar,
)  # fmt: skip
from parquet_fixture import hub_rows, write_rows
from refer_fixture import build_refer_fixture, instances_document, py2_dumps, py2_refs, write_refer_root
from shared_ris.run_folder import lock_folder

SENTINEL = "PWNED"


@dataclass
class Case:
    name: str
    argv: Callable[[Path], list[str]]
    names: Callable[[Path], str]  # a fragment the error line must contain: the file it is about
    setup: Callable[[Path], None] = lambda root: None
    keeps: list[str] = field(default_factory=list)  # files that must still exist afterwards (victims)


# -- command lines -------------------------------------------------------------------------------


def data(root: Path) -> Path:
    return root / "data"


def train(root: Path, *extra: str, data_arg: str | None = None) -> list[str]:
    return ["train", "--data", data_arg if data_arg is not None else str(data(root)), "--recipe", "tiny", "--out", str(root / "out"),
            "--set", "train.batch_size=4", "--set", "data.num_workers=0", "--set", "train.max_steps=2", *extra]  # fmt: skip


def evaluate(root: Path, *extra: str, data_arg: str | None = None) -> list[str]:
    return ["eval", "-c", str(root / "run" / "best.pt"), "-d", data_arg if data_arg is not None else str(data(root)),
            "-s", "val", "--workers", "0", *extra]  # fmt: skip


def prepare(root: Path, *extra: str) -> list[str]:
    return ["prepare", "synthetic", "--out", str(root / "out"), "--train", "8", "--val", "4", "--test", "0",
            "--size", "64", "--workers", "1", "--examples", "0", *extra]  # fmt: skip


def predict(root: Path, *extra: str) -> list[str]:
    return ["predict", str(root / "images"), "--checkpoint", str(root / "run" / "best.pt"), "--out", str(root / "out"), *extra]


# -- damage ----------------------------------------------------------------------------------------


def edit_manifest(change: Callable[[dict, Path], object]) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        document = manifest(data(root))
        replaced = change(document, root)
        write_manifest(data(root), document if replaced is None else replaced)

    return setup


def shard_names(names: list[str]) -> Callable[[dict, Path], None]:
    def change(document: dict, root: Path) -> None:
        document["splits"]["val"]["shards"] = names
        document["splits"]["train"]["shards"] = names

    return change


def sample_change(split: str, change) -> Callable[[Path], None]:
    return lambda root: rewrite_samples(data(root), split, change, every=split == "train")


def truncate_at_member_boundary(split: str) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        path = shard_path(data(root), split)
        members = read_members(path)
        write_tar(path, members[: len(members) // 2 - len(members) // 2 % 3])  # whole samples only
        path.write_bytes(path.read_bytes()[:-1024])  # and without the end-of-archive blocks, as a cut copy

    return setup


def random_bytes_same_size(split: str) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        path = shard_path(data(root), split)
        path.write_bytes(torch.randint(0, 256, (path.stat().st_size,), generator=torch.Generator().manual_seed(0)).to(torch.uint8).numpy().tobytes())
        record_shard(data(root), split)

    return setup


def write_file(relative: str, content: bytes | str) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)

    return setup


def hold_run_lock(root: Path) -> None:
    (root / "out").mkdir()
    hold_run_lock.fd = lock_folder(root / "out")  # released in the test's teardown


def victim_in_manifest(name_of: Callable[[Path], str]) -> Callable[[Path], None]:
    """A finished preparation in ``out`` whose manifest names a file outside it among its shards."""

    def setup(root: Path) -> None:
        (root / "victim.txt").write_text("precious")
        shutil.copytree(data(root), root / "out")
        document = manifest(root / "out")
        document["shard_records"][name_of(root)] = {"split": "train", "samples": 1, "bytes": 8}
        write_manifest(root / "out", document)

    return setup


def predict_inputs(prompts: bytes | str, name: str = "prompts.jsonl") -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        (root / "images").mkdir()
        gradient(32, 24).save(root / "images" / "a.jpg")
        (root / "victim").mkdir()
        gradient(16, 16).save(root / "victim" / "photo.jpg")
        write_file(f"images/{name}", prompts)(root)

    return setup


def refer(root: Path, *extra: str, source: tuple[str, str] = ("--refer-root", "refer")) -> list[str]:
    flag, folder = source
    return ["prepare", "refcoco", flag, str(root / folder), "--images", str(root / "train2014"), "--out", str(root / "out"),
            "--workers", "1", *extra]  # fmt: skip


def refer_files(alter_refs=None, alter_instances=None, refs_bytes: Callable[[Path], bytes] | None = None) -> Callable[[Path], None]:
    """A refer root beside the fixture's images with one file altered (or replaced by raw bytes)."""

    def setup(root: Path) -> None:
        refs = py2_refs()
        document = instances_document()
        if alter_refs is not None:
            alter_refs(refs)
        if alter_instances is not None:
            alter_instances(document)
        raw = refs_bytes(root) if refs_bytes is not None else py2_dumps(refs)
        write_refer_root(root / "refer", refs_bytes=raw, instances=document)

    return setup


def parquet_route(root: Path, *extra: str) -> list[str]:
    return refer(root, *extra, source=("--parquet", "hub"))


HUB_FILE = "train-00000-of-00001.parquet"


def hub_file(change) -> Callable[[Path], None]:
    """A Hugging Face parquet copy (one file) with its rows altered by ``change(rows)``."""

    def setup(root: Path) -> None:
        rows = hub_rows("refcoco", "unc")
        change(rows)
        write_rows(root / "hub" / "data" / HUB_FILE, rows)

    return setup


def call_pickle(fn, *args) -> bytes:
    class Call:
        def __reduce__(self):
            return fn, args

    return pickle.dumps(Call(), protocol=2)


def evil_pickle_checkpoint(root: Path) -> None:
    class Evil:
        def __reduce__(self):
            import os

            return os.system, (f"touch {root / SENTINEL}",)

    (root / "evil.pt").write_bytes(pickle.dumps({"model": Evil()}))


MANIFEST = lambda root: str(data(root) / "manifest.json")  # noqa: E731
TRAIN_SHARD = lambda root: "synthetic-train-000000.tar"  # noqa: E731
VAL_SHARD = lambda root: "synthetic-val-000000.tar"  # noqa: E731
BAD_JSON = json_member  # noqa

CASES = [
    # -- where the data is -----------------------------------------------------------------------
    Case("train: missing data folder", lambda r: train(r, data_arg=str(r / "nowhere")), lambda r: "nowhere"),
    Case("train: empty --data", lambda r: train(r, data_arg=""), lambda r: "--data"),
    Case("train: pipe: without --allow-pipe", lambda r: train(r, data_arg=f"pipe:touch {r / SENTINEL}; cat {{}}"), lambda r: "--allow-pipe"),
    Case("eval: pipe: without --allow-pipe", lambda r: evaluate(r, data_arg=f"pipe:touch {r / SENTINEL}; cat {{}}"), lambda r: "--allow-pipe"),
    # -- manifests -------------------------------------------------------------------------------
    Case("train: shard name is a pipe: command", lambda r: train(r), MANIFEST,
         edit_manifest(shard_names([f"pipe:touch {SENTINEL}; cat a.tar"]))),
    Case("eval: shard name is a pipe: command", lambda r: evaluate(r), MANIFEST,
         edit_manifest(shard_names([f"pipe:touch {SENTINEL}; cat a.tar"]))),
    Case("eval: shard name injects into an allowed pipe: template", lambda r: evaluate(r, "--allow-pipe", data_arg=f"pipe:cat {data(r)}/{{}}"),
         lambda r: "manifest.json", edit_manifest(shard_names([f"a.tar; touch {SENTINEL}"]))),
    Case("eval: shard name is an absolute path", lambda r: evaluate(r), MANIFEST, edit_manifest(shard_names(["/etc/hostname"]))),
    Case("eval: shard name climbs out", lambda r: evaluate(r), MANIFEST, edit_manifest(shard_names(["../data/x.tar"]))),
    Case("train: manifest is a list", lambda r: train(r), MANIFEST, edit_manifest(lambda d, r: [1, 2, 3])),
    Case("eval: manifest is not JSON", lambda r: evaluate(r), MANIFEST, write_file("data/manifest.json", "{not json")),
    Case("train: samples is a word", lambda r: train(r), MANIFEST, edit_manifest(lambda d, r: d["splits"]["train"].update(samples="lots"))),
    Case("eval: shard list is not a list", lambda r: evaluate(r), MANIFEST, edit_manifest(lambda d, r: d["splits"]["val"].update(shards="x.tar"))),
    Case("eval: counts do not add up", lambda r: evaluate(r), MANIFEST, edit_manifest(lambda d, r: d["splits"]["val"].update(sentences=999))),
    Case("eval: digest is not a digest", lambda r: evaluate(r), MANIFEST,
         edit_manifest(lambda d, r: d["splits"]["val"].update(shard_sha256=["abc"]))),
    # -- shards ----------------------------------------------------------------------------------
    Case("eval: shard cut at a member boundary", lambda r: evaluate(r), VAL_SHARD, truncate_at_member_boundary("val")),
    Case("train: shard cut at a member boundary", lambda r: train(r), TRAIN_SHARD, truncate_at_member_boundary("train")),
    Case("eval: shard deleted", lambda r: evaluate(r), VAL_SHARD, lambda r: shard_path(data(r), "val").unlink()),
    Case("eval: random bytes of the right size", lambda r: evaluate(r), VAL_SHARD, random_bytes_same_size("val")),
    Case("eval: member climbs out (../)", lambda r: evaluate(r, "--save-masks", str(r / "out")), VAL_SHARD,
         sample_change("val", lambda m: [("../../" + n, b) for n, b in m])),
    Case("eval: member is an absolute path", lambda r: evaluate(r, "--save-masks", str(r / "out")), VAL_SHARD,
         sample_change("val", lambda m: [("/tmp/" + n, b) for n, b in m])),
    Case("eval: a sample key appears twice", lambda r: evaluate(r), VAL_SHARD, sample_change("val", lambda m: m + m)),
    Case("train: mask.png missing", lambda r: train(r), TRAIN_SHARD, sample_change("train", replace_member("mask.png", None))),
    Case("eval: json missing", lambda r: evaluate(r), VAL_SHARD, sample_change("val", replace_member("json", None))),
    Case("eval: json is not JSON", lambda r: evaluate(r), VAL_SHARD, sample_change("val", replace_member("json", b"\xff{"))),
    Case("train: json without sentences", lambda r: train(r), TRAIN_SHARD, sample_change("train", replace_member("json", b'{"ref_id": 1}'))),
    Case("train: sentences is empty", lambda r: train(r), TRAIN_SHARD, sample_change("train", replace_member("json", json_member([])))),
    Case("eval: sentences is empty", lambda r: evaluate(r), VAL_SHARD, sample_change("val", replace_member("json", json_member([])))),
    Case("eval: a sentence is a string", lambda r: evaluate(r), VAL_SHARD, sample_change("val", replace_member("json", json_member(["the cup"])))),
    Case("train: sent is not a string", lambda r: train(r), TRAIN_SHARD,
         sample_change("train", replace_member("json", json_member([{"sent_id": 1, "sent": 5, "raw": "x"}])))),
    Case("eval: mask size differs from the image", lambda r: evaluate(r), VAL_SHARD, sample_change("val", replace_member("mask.png", png(10, 10)))),
    Case("train: mask size differs from the image", lambda r: train(r), TRAIN_SHARD, sample_change("train", replace_member("mask.png", png(10, 10)))),
    Case("eval: image is a decompression bomb", lambda r: evaluate(r), VAL_SHARD, sample_change("val", replace_member("jpg", bomb_png()))),
    Case("train: image is not an image", lambda r: train(r), TRAIN_SHARD, sample_change("train", replace_member("jpg", b"not a jpeg"))),
    # -- refer files -------------------------------------------------------------------------------
    Case("prepare: refs pickle calls os.system", lambda r: refer(r), lambda r: "refs(unc).p",
         refer_files(refs_bytes=lambda r: call_pickle(__import__("os").system, f"touch {r / SENTINEL}"))),
    Case("prepare: refs pickle asks for bytes(10**9)", lambda r: refer(r), lambda r: "refs(unc).p", refer_files(refs_bytes=lambda r: call_pickle(bytes, 10**9))),
    Case("prepare: a ref_id twice", lambda r: refer(r), lambda r: "refs(unc).p", refer_files(alter_refs=lambda refs: refs.append(dict(refs[0])))),
    Case("prepare: a string ref_id", lambda r: refer(r), lambda r: "refs(unc).p", refer_files(alter_refs=lambda refs: refs[0].update({b"ref_id": b"12"}))),
    Case("prepare: a sentence given as a string", lambda r: refer(r), lambda r: "refs(unc).p",
         refer_files(alter_refs=lambda refs: refs[0].update({b"sentences": [b"the cup"]}))),
    Case("prepare: an image without width", lambda r: refer(r), lambda r: "instances.json",
         refer_files(alter_instances=lambda d: d["images"][0].pop("width"))),
    Case("prepare: file_name climbs out of --images", lambda r: refer(r), lambda r: "instances.json",
         refer_files(alter_instances=lambda d: d["images"][0].update(file_name="../victim.jpg"))),
    Case("prepare --parquet: raw_anns is not JSON", lambda r: parquet_route(r), lambda r: HUB_FILE,
         hub_file(lambda rows: rows[0].update(raw_anns="{oops"))),
    Case("prepare --parquet: image file_name climbs out of --images", lambda r: parquet_route(r), lambda r: HUB_FILE,
         hub_file(lambda rows: rows[0].update(raw_image_info=json.dumps({"id": rows[0]["image_id"], "width": 64, "height": 48, "file_name": "../victim.jpg"})))),
    Case("prepare --parquet: not a parquet file", lambda r: parquet_route(r), lambda r: "x.parquet", write_file("hub/x.parquet", "PAR1 not really")),
    # -- checkpoints, tokenizers, recipes ------------------------------------------------------------
    Case("eval: checkpoint pickles os.system", lambda r: evaluate(r)[:2] + [str(r / "evil.pt")] + evaluate(r)[3:], lambda r: "evil.pt",
         evil_pickle_checkpoint),
    Case("eval: checkpoint is random bytes", lambda r: evaluate(r), lambda r: "best.pt", write_file("run/best.pt", b"\x00" * 100)),
    Case("eval: tokenizer is not a sentencepiece model", lambda r: evaluate(r, "--tokenizer", str(r / "bad.spm")), lambda r: "bad.spm",
         write_file("bad.spm", "hello")),
    Case("train: recipe YAML asks for a Python object", lambda r: ["train", "--data", str(data(r)), "--recipe", str(r / "evil.yaml")],
         lambda r: "evil.yaml", write_file("evil.yaml", f'!!python/object/apply:os.system ["touch {SENTINEL}"]\n')),
    Case("flops: recipe is a YAML list", lambda r: ["flops", "--recipe", str(r / "list.yaml")], lambda r: "list.yaml", write_file("list.yaml", "- 1\n- 2\n")),
    Case("flops: recipe is not UTF-8", lambda r: ["flops", "--recipe", str(r / "latin.yaml")], lambda r: "latin.yaml", write_file("latin.yaml", b"model: \xe9\n")),
    Case("flops: FPN stage outside the encoder", lambda r: ["flops", "--recipe", "tiny", "--set", "model.fpn.stages=[99]"], lambda r: "model.fpn.stages"),
    Case("flops: --json is a folder", lambda r: ["flops", "--recipe", "tiny", "--json", str(r / "data")], lambda r: str(r / "data")),
    # -- options that can only be wrong --------------------------------------------------------------
    Case("train: batch size 0", lambda r: train(r, "--set", "train.batch_size=0"), lambda r: "train.batch_size"),
    Case("train: negative lr", lambda r: train(r, "--set", "train.lr=-1"), lambda r: "train.lr"),
    Case("train: lr is NaN", lambda r: train(r, "--set", "train.lr=.nan"), lambda r: "train.lr"),
    Case("train: --gpus -1", lambda r: train(r, "--gpus", "-1"), lambda r: "--gpus"),
    Case("train: --out is a file", lambda r: train(r), lambda r: str(r / "out"), write_file("out", "a file")),
    Case("train: run folder in use", lambda r: train(r), lambda r: str(r / "out"), hold_run_lock),
    Case("prepare: --out is a file", lambda r: prepare(r), lambda r: str(r / "out"), write_file("out", "a file")),
    Case("prepare: --workers -1", lambda r: prepare(r, "--workers", "-1"), lambda r: "--workers"),
    Case("prepare: old manifest is a list", lambda r: prepare(r), lambda r: "manifest.json", write_file("out/manifest.json", "[1, 2, 3]")),
    Case("prepare --overwrite: manifest names an absolute file", lambda r: prepare(r, "--overwrite"), lambda r: "manifest",
         victim_in_manifest(lambda r: str(r / "victim.txt")), keeps=["victim.txt"]),
    Case("prepare --overwrite: manifest names ../victim.txt", lambda r: prepare(r, "--overwrite"), lambda r: "manifest",
         victim_in_manifest(lambda r: "../victim.txt"), keeps=["victim.txt"]),
    Case("eval: --json is a folder", lambda r: evaluate(r, "--json", str(r / "data")), lambda r: str(r / "data")),
    Case("eval: --plot is a folder", lambda r: evaluate(r, "--plot", str(r / "data")), lambda r: str(r / "data")),
    Case("eval: --save-masks is a file", lambda r: evaluate(r, "--save-masks", str(r / "out")), lambda r: str(r / "out"), write_file("out", "x")),
    Case("eval: --workers -1", lambda r: evaluate(r)[:-2] + ["--workers", "-1"], lambda r: "--workers"),
    Case("eval: --gpus 0", lambda r: evaluate(r, "--gpus", "0"), lambda r: "--gpus"),
    # -- predict -------------------------------------------------------------------------------------
    Case("predict: prompts entry climbs out", lambda r: predict(r, "--prompts", str(r / "images" / "prompts.jsonl")), lambda r: "prompts.jsonl",
         predict_inputs('{"file": "../victim/photo.jpg", "text": "the cup"}\n')),
    Case("predict: prompts entry is an absolute path outside", lambda r: predict(r, "--prompts", str(r / "images" / "prompts.jsonl")),
         lambda r: "prompts.jsonl", lambda r: predict_inputs(json.dumps({"file": str(r / "victim" / "photo.jpg"), "text": "the cup"}) + "\n")(r)),
    Case("predict: prompts CSV is not UTF-8", lambda r: predict(r, "--prompts", str(r / "images" / "prompts.csv")), lambda r: "prompts.csv",
         predict_inputs(b"file,text\na.jpg,caf\xe9\n", name="prompts.csv")),
    Case("predict: prompts line is not JSON", lambda r: predict(r, "--prompts", str(r / "images" / "prompts.jsonl")), lambda r: "prompts.jsonl",
         predict_inputs("not json\n")),
    Case("predict: --out is a file", lambda r: predict(r, "the cup"), lambda r: str(r / "out"),
         lambda r: (predict_inputs("")(r), write_file("out", "x")(r))),
]  # fmt: skip


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("originals")
    make_data(root / "data")
    make_trained_run(root / "run")
    build_refer_fixture(root / "refer_fixture")
    return root


def run_sris(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input_is_one_line_and_touches_nothing_outside(case: Case, originals: Path, tmp_path: Path, capsys):
    shutil.copytree(originals / "data", tmp_path / "data")
    shutil.copytree(originals / "run", tmp_path / "run")
    shutil.copytree(originals / "refer_fixture" / "train2014", tmp_path / "train2014")
    case.setup(tmp_path)
    argv = case.argv(tmp_path)
    before = snapshot(tmp_path, exclude=tmp_path / "out")
    try:
        code, out, err = run_sris(argv, capsys)
    finally:
        if getattr(hold_run_lock, "fd", None) is not None:
            import os

            os.close(hold_run_lock.fd)
            hold_run_lock.fd = None
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert case.names(tmp_path) in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert not (tmp_path / SENTINEL).exists() and not Path(SENTINEL).exists()
    assert snapshot(tmp_path, exclude=tmp_path / "out") == before
    for kept in case.keeps:
        assert (tmp_path / kept).is_file()


def test_the_table_is_long_enough():
    assert len(CASES) >= 40
