"""Malformed and hostile refer files: each is refused with one line naming the file (and the ref or
entry), never a traceback, a silent drop, a wrong answer, a write outside ``--out`` or gigabytes of memory.

Every file starts as the miniature RefCOCO of ``refer_fixture`` in the real on-disk formats (Python 2
protocol-2 refs pickles, COCO ``instances.json``) with one field altered.
"""

from __future__ import annotations

import io
import json
import pickle
import reprlib
import shutil
import struct
import tarfile
import tracemalloc
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from refer_fixture import build_refer_fixture, instances_document, py2_dumps, py2_refs, write_refer_root
from shared_ris.data import DataError, UnsafePickleError, load_pickle, prepare_refer
from shared_ris.data.refer import load_instances, load_refs

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools on numpy 2
GIGA = 10**9
MEMORY_LIMIT = 64 * 2**20  # bytes a load of these tiny files may allocate at its peak


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory) -> Path:
    return build_refer_fixture(tmp_path_factory.mktemp("refer")).images_dir


class Call:
    """Pickles as ``fn(*args)`` without calling it: what a hostile file can ask the unpickler to do."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def peak_allocation(fn) -> tuple[object, int]:
    """``fn()``'s outcome (value or exception) and the peak bytes Python allocated while it ran."""
    tracemalloc.start()
    try:
        try:
            outcome = fn()
        except Exception as exc:  # the caller asserts on it
            outcome = exc
        return outcome, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def refused(load, path: Path, *fragments: str) -> str:
    """``load(path)`` raises a one-line DataError naming ``path`` and every fragment."""
    with pytest.raises(DataError) as info:
        load(path)
    return one_line(info.value, path, *fragments)


def one_line(error: Exception, path: Path, *fragments: str) -> str:
    message = str(error)
    assert "\n" not in message and str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# -- defect 1: the unpickler never builds more than the pickle spells out ------------------------------


AMPLIFYING = {
    # a 29-byte file: bytes(1000000000) is a gigabyte of zeros
    "bytes-of-a-size": pickle.dumps(Call(bytes, GIGA), protocol=2),
    # the same through NEWOBJ: bytes.__new__(bytes, 10**9), no REDUCE involved
    "newobj-bytes": b"\x80\x02" + pickle.GLOBAL + b"__builtin__\nbytes\n" + pickle.BININT + struct.pack("<i", GIGA) + pickle.TUPLE1 + pickle.NEWOBJ + pickle.STOP,
    # protocol 5: a bytearray of a declared length the file does not hold
    "bytearray8": b"\x80\x05" + pickle.BYTEARRAY8 + struct.pack("<Q", GIGA) + pickle.STOP,
    # set() of anything but a list is not how a set is written
    "set-of-a-string": pickle.dumps(Call(set, "abc"), protocol=2),
}


@pytest.mark.parametrize("name", list(AMPLIFYING))
def test_calls_and_opcodes_that_allocate_more_than_the_file_are_refused(tmp_path, name):
    assert len(AMPLIFYING[name]) < 64
    path = tmp_path / "refs(unc).p"
    path.write_bytes(AMPLIFYING[name])
    outcome, peak = peak_allocation(lambda: load_pickle(path))
    assert isinstance(outcome, UnsafePickleError), reprlib.repr(outcome)  # not a gigabyte of repr when it fails
    one_line(outcome, path, "refused to load")
    assert peak < MEMORY_LIMIT, f"{peak / 2**20:.0f} MiB allocated for a {len(AMPLIFYING[name])}-byte file"


def test_a_large_memo_index_allocates_nothing(tmp_path):
    # 9 bytes: an empty list stored at memo index 100000000 (the C unpickler sizes an array to 2x that)
    path = tmp_path / "refs(unc).p"
    path.write_bytes(b"\x80\x02]" + pickle.LONG_BINPUT + struct.pack("<I", 100_000_000) + pickle.STOP)
    outcome, peak = peak_allocation(lambda: load_pickle(path))
    assert outcome == []
    assert peak < MEMORY_LIMIT, f"{peak / 2**20:.0f} MiB allocated for a 9-byte file"


def test_a_string_referenced_many_times_is_decoded_once(tmp_path):
    # Python 2 writes a repeated str once and then 2-byte memo references to it: 1 MiB, 1000 references
    path = tmp_path / "refs(unc).p"
    path.write_bytes(py2_dumps([b"a" * 2**20] * 1000))
    outcome, peak = peak_allocation(lambda: load_pickle(path))
    assert isinstance(outcome, list) and len(outcome) == 1000 and outcome[0] == "a" * 2**20
    assert peak < MEMORY_LIMIT, f"{peak / 2**20:.0f} MiB allocated for a {path.stat().st_size / 2**20:.0f} MiB file"
    assert all(item is outcome[0] for item in outcome)


@pytest.mark.parametrize("fix_imports", [True, False])
def test_what_python3_writes_at_protocol_2_still_loads(tmp_path, fix_imports):
    # b"" is bytes() (no argument), other bytes _codecs.encode(text, "latin1"), sets set([...])
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([b"", b"caf\xc3\xa9", {1, 2}, frozenset([b"x"])], protocol=2, fix_imports=fix_imports))
    assert load_pickle(path) == ["", "café", {1, 2}, frozenset(["x"])]


def test_self_referencing_and_deeply_nested_pickles_are_one_line_errors(tmp_path):
    loop: list = []
    loop.append(loop)
    deep = b"\x80\x02" + pickle.EMPTY_LIST * 100_000 + pickle.APPEND * 99_999 + pickle.STOP
    for name, data in (("loop", pickle.dumps(loop, protocol=2)), ("deep", deep)):
        path = tmp_path / f"{name}.p"
        path.write_bytes(data)
        refused(load_refs, path, "refs[0]")


# -- defect 2: duplicate ref_ids ----------------------------------------------------------------------


def test_a_duplicate_ref_id_is_refused(tmp_path):
    refs = py2_refs()
    refs[4][b"ref_id"] = refs[1][b"ref_id"]
    path = tmp_path / "refs(unc).p"
    path.write_bytes(py2_dumps(refs))
    refused(load_refs, path, f"ref {refs[1][b'ref_id']}", "twice", "refs[1] and refs[4]")


# -- defect 3: types of every field, checked at load time -------------------------------------------


def _set_ref(field: bytes, value, index: int = 0):
    def alter(refs: list) -> list:
        refs[index][field] = value
        return refs

    return alter


def _set_sentence(field: bytes, value):
    def alter(refs: list) -> list:
        refs[0][b"sentences"][0][field] = value
        return refs

    return alter


def _replace_first_sentence(value):
    def alter(refs: list) -> list:
        refs[0][b"sentences"][0] = value
        return refs

    return alter


BAD_REFS = {
    "ref_id-a-string": (_set_ref(b"ref_id", b"12"), ["refs[0]", "'ref_id' must be a non-negative integer, got '12'"]),
    "ref_id-too-long-to-print": (_set_ref(b"ref_id", 10**5000), ["refs[0]", "'ref_id' must be a non-negative integer, got <int too long to print>"]),
    "ref_id-negative": (_set_ref(b"ref_id", -1), ["refs[0]", "'ref_id' must be a non-negative integer, got -1"]),
    "ann_id-a-bool": (_set_ref(b"ann_id", True), ["ref 1", "'ann_id' must be a non-negative integer, got True"]),
    "image_id-a-float": (_set_ref(b"image_id", 1.5), ["ref 1", "'image_id' must be a non-negative integer, got 1.5"]),
    "category_id-a-set": (_set_ref(b"category_id", {1}), ["ref 1", "'category_id' must be a non-negative integer"]),
    "split-an-int": (_set_ref(b"split", 3), ["ref 1", "'split' must be a split name"]),
    "split-leaves-the-folder": (_set_ref(b"split", b"x/../../escape"), ["ref 1", "'split' must be a split name"]),
    "sentences-a-string": (_set_ref(b"sentences", b"the left cup"), ["ref 1", "'sentences' must be a list"]),
    "sentence-a-plain-string": (_replace_first_sentence(b"the left cup"), ["ref 1 sentence 0", "not a sentence dict"]),
    "sent-an-int": (_set_sentence(b"sent", 5), ["ref 1 sentence 0", "'sent' must be a string, got 5"]),
    "raw-a-list": (_set_sentence(b"raw", [b"a"]), ["ref 1 sentence 0", "'raw' must be a string"]),
    "sent_id-a-string": (_set_sentence(b"sent_id", b"x"), ["ref 1 sentence 0", "'sent_id' must be a non-negative integer"]),
    # it names the expression in eval's records and saved masks (the shard readers refuse a sentence without one)
    "sent_id-missing": (lambda refs: [refs[0][b"sentences"][0].pop(b"sent_id"), refs][1], ["ref 1 sentence 0", "'sent_id' must be a non-negative integer, got nothing"]),
    "ref-lacks-split": (lambda refs: [{k: v for k, v in r.items() if k != b"split"} for r in refs], ["ref 1", "lacks split"]),
    "a-dict-not-a-list": (lambda refs: {r[b"ref_id"]: r for r in refs}, ["expected a pickled list of ref dicts", "got a dict"]),
    "a-list-of-strings": (lambda refs: [b"ref"] * len(refs), ["refs[0] is a str, not a ref dict"]),
    "an-empty-list": (lambda refs: [], ["got an empty list"]),
}


@pytest.mark.parametrize("case", list(BAD_REFS))
def test_wrongly_typed_ref_fields_are_one_line_errors(tmp_path, case):
    alter, fragments = BAD_REFS[case]
    path = tmp_path / "refs(unc).p"
    path.write_bytes(py2_dumps(alter(py2_refs())))
    refused(load_refs, path, *fragments)


def _set_entry(section: str, field: str, value, index: int = 0):
    def alter(doc: dict) -> dict:
        if value is None:
            del doc[section][index][field]
        else:
            doc[section][index][field] = value
        return doc

    return alter


BAD_INSTANCES = {
    "image-lacks-width": (_set_entry("images", "width", None), ["images[0] (id 1)", "'width' must be a positive integer, got nothing"]),
    "height-a-string": (_set_entry("images", "height", "48"), ["images[0] (id 1)", "'height' must be a positive integer, got '48'"]),
    "width-a-float": (_set_entry("images", "width", 64.0), ["'width' must be a positive integer, got 64.0"]),
    "width-zero": (_set_entry("images", "width", 0), ["'width' must be a positive integer, got 0"]),
    "image-id-a-string": (_set_entry("images", "id", "1"), ["images[0]", "'id' must be a non-negative integer, got '1'"]),
    "file_name-leaves-the-folder": (_set_entry("images", "file_name", "../secret.jpg"), ["'file_name' must be a name inside the --images folder"]),
    "file_name-absolute": (_set_entry("images", "file_name", "/etc/passwd"), ["'file_name' must be a name inside the --images folder"]),
    "annotation-lacks-id": (_set_entry("annotations", "id", None), ["annotations[0]", "'id' must be a non-negative integer, got nothing"]),
    "annotation-lacks-image_id": (_set_entry("annotations", "image_id", None), ["annotations[0] (id 101)", "'image_id' must be a non-negative integer, got nothing"]),
    "category_id-a-string": (_set_entry("annotations", "category_id", "1"), ["annotations[0] (id 101)", "'category_id' must be a non-negative integer"]),
    "bbox-a-string": (_set_entry("annotations", "bbox", "1 2 3 4"), ["annotations[0] (id 101)", "'bbox' must be 4 numbers"]),
    "duplicate-image-id": (lambda doc: {**doc, "images": doc["images"] + doc["images"][:1]}, ["(id 1): id 1 appears twice in 'images'"]),
    "images-a-dict": (lambda doc: {**doc, "images": {"1": doc["images"][0]}}, ["'images' must be a list of dicts"]),
    "images-lacking": (lambda doc: {k: v for k, v in doc.items() if k != "images"}, ["'images' must be a list of dicts, got nothing"]),
    "annotations-of-lists": (lambda doc: {**doc, "annotations": [[1, 2]]}, ["annotations[0] is [1, 2], not a dict"]),
    "a-list-not-an-object": (lambda doc: [doc], ["expected a JSON object with 'images' and 'annotations', got list"]),
}


@pytest.mark.parametrize("case", list(BAD_INSTANCES))
def test_wrongly_typed_instances_fields_are_one_line_errors(tmp_path, case):
    alter, fragments = BAD_INSTANCES[case]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(alter(instances_document())))
    refused(load_instances, path, *fragments)


def test_json_nested_too_deep_is_a_one_line_error(tmp_path):
    path = tmp_path / "instances.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    refused(load_instances, path, "not a COCO instances file")


def test_genuine_files_pass_every_check(tmp_path):
    root = write_refer_root(tmp_path)
    refs = load_refs(root / "refcoco" / "refs(unc).p")
    images, anns = load_instances(root / "refcoco" / "instances.json")
    assert [r["ref_id"] for r in refs] == [r[b"ref_id"] for r in py2_refs()]
    assert set(images) == {im["id"] for im in instances_document()["images"]} and 110 in anns


# -- answers that were wrong: an annotation's mask must belong to the ref's image, at its size ------------


def _prepared_ref_ids(out: Path, manifest: dict) -> set[int]:
    ids = set()
    for split in manifest["splits"].values():
        for name in split["shards"]:
            with tarfile.open(out / name) as tar:
                ids |= {json.loads(tar.extractfile(m).read())["ref_id"] for m in tar.getmembers() if m.name.endswith(".json")}
    return ids


def test_an_rle_larger_than_its_image_is_skipped(images_dir, tmp_path):
    doc = instances_document()
    ann = next(a for a in doc["annotations"] if a["id"] == 103)  # ref 3's uncompressed RLE on the 80x60 image 2
    ann["segmentation"] = {"size": [3000, 3000], "counts": [0, 3000 * 3000]}
    root = write_refer_root(tmp_path / "refer", instances=doc)
    manifest = prepare_refer("refcoco", root, images_dir, tmp_path / "out", splits="train", workers=1)
    assert 3 not in _prepared_ref_ids(tmp_path / "out", manifest)
    assert any(s["ref_id"] == 3 and "RLE size [3000, 3000] is not the image's [60, 80]" in s["reason"] for s in manifest["skipped"])


def test_an_annotation_of_another_image_is_skipped(images_dir, tmp_path):
    refs = py2_refs()
    assert refs[0][b"ann_id"] == 101 and refs[0][b"image_id"] == 1
    refs[0][b"image_id"] = 2  # a real image, but annotation 101 was drawn on image 1
    root = write_refer_root(tmp_path / "refer", refs_bytes=py2_dumps(refs))
    manifest = prepare_refer("refcoco", root, images_dir, tmp_path / "out", splits="train", workers=1)
    assert 1 not in _prepared_ref_ids(tmp_path / "out", manifest)
    assert [s["reason"] for s in manifest["skipped"] if s["ref_id"] == 1] == ["annotation on another image (annotation 101 is on image 1, the ref says 2)"]


def test_an_image_whose_header_disagrees_is_skipped_without_decoding(images_dir, tmp_path):
    # a 4000x4000 PNG cut after its header: decoding it would fail, so the reason shows it never was
    buffer = io.BytesIO()
    Image.new("L", (4000, 4000)).save(buffer, format="PNG")
    images = Path(shutil.copytree(images_dir, tmp_path / "images"))
    (images / "COCO_train2014_000000000001.jpg").write_bytes(buffer.getvalue()[:200])
    manifest = prepare_refer("refcoco", write_refer_root(tmp_path / "refer"), images, tmp_path / "out", splits="train", workers=1)
    reasons = {s["reason"] for s in manifest["skipped"] if s["ref_id"] in (1, 2)}  # refs 1 and 2 are on image 1
    assert reasons == {"image is 4000x4000 but its COCO image entry says 64x48"}  # worded alike for the parquet route


def test_an_image_file_named_json_becomes_the_image_member_not_the_json(images_dir, tmp_path):
    images = Path(shutil.copytree(images_dir, tmp_path / "images"))
    (images / "COCO_train2014_000000000001.jpg").rename(images / "picture.json")
    doc = instances_document()
    next(im for im in doc["images"] if im["id"] == 1)["file_name"] = "picture.json"
    root = write_refer_root(tmp_path / "refer", instances=doc)
    manifest = prepare_refer("refcoco", root, images, tmp_path / "out", splits="train", workers=1)
    assert 1 in _prepared_ref_ids(tmp_path / "out", manifest)
    with tarfile.open(tmp_path / "out" / manifest["splits"]["train"]["shards"][0]) as tar:
        names = {m.name for m in tar.getmembers()}
    assert {"refcoco-00000001.jpg", "refcoco-00000001.json", "refcoco-00000001.mask.png"} <= names  # the image kept, as a JPEG


def test_an_image_over_the_readers_pixel_bound_is_skipped(images_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("shared_ris.data.refer.MAX_SAMPLE_PIXELS", 64 * 48 - 1)  # image 1 is 64x48
    manifest = prepare_refer("refcoco", write_refer_root(tmp_path / "refer"), images_dir, tmp_path / "out", splits="train", workers=1)
    reasons = {s["reason"] for s in manifest["skipped"] if s["ref_id"] in (1, 2)}
    assert reasons == {f"image of 64x48 pixels, over the {64 * 48 - 1} that readers accept"}


# -- through the command line ----------------------------------------------------------------------------


def _bad_refs(alter) -> dict:
    return {"refs_bytes": py2_dumps(alter(py2_refs()))}


CLI_CASES = {
    "duplicate-ref_id": (lambda: _bad_refs(_set_ref(b"ref_id", 1, index=1)), "refs(unc).p", "ref 1: ref_id appears twice"),
    "ref_id-a-string": (lambda: _bad_refs(_set_ref(b"ref_id", b"12")), "refs(unc).p", "'ref_id' must be a non-negative integer"),
    "sentence-a-plain-string": (lambda: _bad_refs(_replace_first_sentence(b"the left cup")), "refs(unc).p", "not a sentence dict"),
    "split-leaves-the-folder": (lambda: _bad_refs(_set_ref(b"split", b"x/../../escape")), "refs(unc).p", "'split' must be a split name"),
    "split-looks-like-console-markup": (lambda: _bad_refs(_set_ref(b"split", b"[/x]")), "refs(unc).p", "got '[/x]'"),
    "bytes-of-a-size": (lambda: {"refs_bytes": AMPLIFYING["bytes-of-a-size"]}, "refs(unc).p", "refused to load, the pickle asks for bytes(1000000000)"),
    "image-lacks-width": (lambda: {"instances": _set_entry("images", "width", None)(instances_document())}, "instances.json", "'width'"),
}


def _files_under(root: Path, but: Path) -> dict[str, int]:
    return {str(p): p.stat().st_size for p in root.rglob("*") if p.is_file() and but not in p.parents}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_prints_one_error_line_and_writes_nothing_elsewhere(images_dir, tmp_path, case):
    files, path_fragment, message_fragment = CLI_CASES[case]
    root = write_refer_root(tmp_path / "work" / "refer", **files())
    out = tmp_path / "work" / "out"
    before = _files_under(tmp_path, out)
    result = CliRunner().invoke(app, ["prepare", "refcoco", "--refer-root", str(root), "--images", str(images_dir), "--out", str(out), "--workers", "1"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert str(root / "refcoco" / path_fragment) in lines[0] and message_fragment in lines[0], lines[0]
    assert _files_under(tmp_path, out) == before
    assert not out.exists() or not any(out.rglob("*.tar"))
