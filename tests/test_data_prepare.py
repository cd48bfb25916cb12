"""``prepare_refer`` (each dataset and the combined set) on a miniature RefCOCO in the real formats."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from refer_fixture import ANNS, IMAGES, NON_ASCII_UNICODE, NON_ASCII_UTF8, REFS, SKIP_REASONS, build_refer_fixture, py2_dumps, fixture, refcoco  # noqa: F401
from refer_fixture import texts as raw_and_sent
from shared_ris.data import DataError, UnsafePickleError, load_pickle, prepare_refer, read_manifest

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools on numpy 2
SPLITS = {("refcoco", "unc"): ["train", "val", "testA", "testB"], ("refcocog", "umd"): ["train", "val", "test"], ("refcocog", "google"): ["train", "val"]}




def read_tar(path: Path) -> list[dict]:
    """Samples of a shard, read with tarfile alone (independent of the code under test)."""
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
    return list(samples.values())


def read_split(out: Path, manifest: dict, split: str) -> list[dict]:
    return [s for name in manifest["splits"][split]["shards"] for s in read_tar(out / name)]


def shard_contents(out: Path) -> dict[str, list[dict]]:
    return {p.name: read_tar(p) for p in sorted(out.glob("*.tar"))}


# -- safe unpickling ----------------------------------------------------------------------------------


def test_py2_pickle_with_byte_strings_decodes_to_text(fixture):
    refs = load_pickle(fixture.refer_root / "refcoco" / "refs(unc).p")
    assert isinstance(refs, list) and all(isinstance(k, str) for k in refs[0])
    texts = [s["sent"] for r in refs for s in r["sentences"]]
    assert NON_ASCII_UTF8 in texts and NON_ASCII_UNICODE in texts
    assert refs[0]["split"] == "train" and isinstance(refs[0]["file_name"], str)
    raw = (fixture.refer_root / "refcoco" / "refs(unc).p").read_bytes()
    assert pickle.SHORT_BINSTRING in raw and b"_codecs" not in raw  # really Python 2's opcodes


def test_py3_protocol2_bytes_and_latin1_fallback(tmp_path):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{b"sent": b"caf\xe9", b"ids": {1, 2}, b"t": (1.5, None)}], protocol=2))
    assert load_pickle(path) == [{"sent": "café", "ids": {1, 2}, "t": (1.5, None)}]


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_pickle_asking_for_os_system_is_refused(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 1, "x": _Evil(marker)}], protocol=protocol))
    with pytest.raises(UnsafePickleError) as info:
        load_pickle(path)
    message = str(info.value)
    assert str(path) in message and "system" in message and "\n" not in message
    assert not marker.exists()


def test_pickle_refusal_reaches_prepare_as_data_error(fixture, tmp_path):
    root = tmp_path / "refer"
    (root / "refcoco").mkdir(parents=True)
    (root / "refcoco" / "instances.json").write_text((fixture.refer_root / "refcoco" / "instances.json").read_text())
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps([_Evil(tmp_path / "pwned")], protocol=2))
    with pytest.raises(DataError, match=r"refs\(unc\)\.p: refused to load"):
        prepare_refer("refcoco", root, fixture.images_dir, tmp_path / "out")
    assert not (tmp_path / "pwned").exists()


def test_garbage_pickle_is_a_one_line_error(tmp_path):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(b"\x80\x02not a pickle at all")
    with pytest.raises(DataError, match="not a readable pickle"):
        load_pickle(path)


# -- counts, masks, content ------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset,split_by", list(SPLITS))
def test_counts_per_split_match_the_fixture(fixture, tmp_path, dataset, split_by):
    manifest = prepare_refer(dataset, fixture.refer_root, fixture.images_dir, tmp_path, split_by=split_by, shard_size=2, workers=1)
    assert list(manifest["splits"]) == SPLITS[(dataset, split_by)]
    for split in SPLITS[(dataset, split_by)]:
        stats, expected = manifest["splits"][split], fixture.expected(dataset, split_by, split)
        assert {k: stats[k] for k in expected} == expected, split
        samples = read_split(tmp_path, manifest, split)
        assert len(samples) == expected["samples"]
        assert sum(len(json.loads(s["json"])["sentences"]) for s in samples) == expected["sentences"]
        assert stats["bytes"] == sum((tmp_path / n).stat().st_size for n in stats["shards"])
        assert all(n.startswith(f"{dataset}-{split}-") and n.endswith(".tar") for n in stats["shards"])
    assert read_manifest(tmp_path) == manifest


def test_every_mask_equals_coco_ann_to_mask(fixture, refcoco):
    out, manifest = refcoco
    coco = COCO(str(fixture.refer_root / "refcoco" / "instances.json"))
    checked = 0
    for split in manifest["splits"]:
        for sample in read_split(out, manifest, split):
            meta = json.loads(sample["json"])
            stored = np.asarray(Image.open(io.BytesIO(sample["mask.png"])))
            assert stored.dtype == np.uint8 and set(np.unique(stored)) <= {0, 255}
            expected = coco.annToMask(coco.anns[meta["ann_id"]])
            assert stored.shape == (meta["height"], meta["width"]) == expected.shape
            np.testing.assert_array_equal(stored // 255, expected)
            checked += 1
    assert checked == sum(s["samples"] for s in manifest["splits"].values()) > 0


def test_overlapping_polygons_are_a_union(refcoco):
    out, manifest = refcoco
    sample = next(s for s in read_split(out, manifest, "train") if json.loads(s["json"])["ann_id"] == 102)
    mask = np.asarray(Image.open(io.BytesIO(sample["mask.png"]))) > 0
    assert mask[20, 25] and mask[10, 10] and mask[35, 45]  # the overlap, and each polygon alone
    assert not mask[45, 5]


def test_image_bytes_are_the_original_files(fixture, refcoco):
    out, manifest = refcoco
    seen = set()
    for split in manifest["splits"]:
        for sample in read_split(out, manifest, split):
            meta = json.loads(sample["json"])
            ext = "png" if IMAGES[meta["image_id"]][2] == "png" else "jpg"
            assert sample[ext] == (fixture.images_dir / f"COCO_train2014_{meta['image_id']:012d}.{ext}").read_bytes()
            seen.add(ext)
    assert seen == {"jpg", "png"}


def test_json_fields_and_non_ascii_text(refcoco):
    out, manifest = refcoco
    metas = [json.loads(s["json"]) for split in manifest["splits"] for s in read_split(out, manifest, split)]
    fixture_texts = {ref_id: [raw_and_sent(s) for s in sents] for ref_id, _, _, sents in REFS[("refcoco", "unc")]}
    for meta in metas:
        assert set(meta) == {"ref_id", "ann_id", "image_id", "category_id", "bbox", "split", "dataset", "width", "height", "empty_mask", "sentences"}
        assert meta["dataset"] == "refcoco" and (meta["width"], meta["height"]) == IMAGES[meta["image_id"]][:2]
        assert all(set(s) == {"sent_id", "sent", "raw"} for s in meta["sentences"])
        # every sentence kept, its text as the refs file has it (an empty one included)
        assert [(s["raw"], s["sent"]) for s in meta["sentences"]] == fixture_texts[meta["ref_id"]]
        assert meta["empty_mask"] is (ANNS[meta["ann_id"]][2] == "empty")
    texts = {s["sent"] for m in metas for s in m["sentences"]} | {s["raw"] for m in metas for s in m["sentences"]}
    assert NON_ASCII_UTF8 in texts and NON_ASCII_UNICODE in texts
    keys = [s["__key__"] for split in manifest["splits"] for s in read_split(out, manifest, split)]
    assert len(keys) == len(set(keys)) and all("." not in k for k in keys)


def test_skips_are_counted_with_reasons(fixture, refcoco):
    _, manifest = refcoco
    # only refs that cannot be written are skipped; empty texts and empty masks are kept (flagged)
    reason = lambda ann: SKIP_REASONS.get(ANNS[ann][2]) or SKIP_REASONS[IMAGES[ANNS[ann][0]][2]]  # noqa: E731
    expected = Counter((ref_id, reason(ann)) for ref_id, ann, _, _ in REFS[("refcoco", "unc")] if not fixture.usable(ann))
    assert Counter((s["ref_id"], s["reason"].split(" (")[0]) for s in manifest["skipped"]) == expected
    assert manifest["skipped_counts"] == Counter(r for _, r in expected.elements())


def test_strict_turns_a_skip_into_a_failure(fixture, tmp_path):
    with pytest.raises(DataError, match="--strict"):
        prepare_refer("refcoco", fixture.refer_root, fixture.images_dir, tmp_path, strict=True, workers=1)


def test_workers_write_the_same_bytes(fixture, refcoco, tmp_path):
    out, manifest = refcoco
    parallel = prepare_refer("refcoco", fixture.refer_root, fixture.images_dir, tmp_path, shard_size=2, workers=2)
    assert parallel["splits"] == manifest["splits"]
    for name in (p.name for p in out.glob("*.tar")):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes()


def test_splits_subset_and_limit(fixture, tmp_path):
    manifest = prepare_refer("refcoco", fixture.refer_root, fixture.images_dir, tmp_path, splits="val,testA", limit=1, workers=1)
    assert list(manifest["splits"]) == ["val", "testA"]
    assert manifest["splits"]["val"]["samples"] == 1
    with pytest.raises(DataError, match="has splits train, val, testA, testB"):
        prepare_refer("refcoco", fixture.refer_root, fixture.images_dir, tmp_path / "x", splits="tesA")


# -- layout errors -------------------------------------------------------------------------------------


def test_missing_inputs_say_what_was_expected_where(fixture, tmp_path):
    cases = [
        (dict(refer_root=tmp_path / "nowhere"), "refer root not found"),
        (dict(split_by="umd"), r"refs\(umd\)\.p: refs file not found; found refs\(unc\)\.p"),
        (dict(images_dir=tmp_path / "no-images"), "images folder not found"),
    ]
    for overrides, pattern in cases:
        kwargs = {**dict(dataset="refcoco", refer_root=fixture.refer_root, images_dir=fixture.images_dir, out_dir=tmp_path / "out"), **overrides}
        with pytest.raises(DataError, match=pattern) as info:
            prepare_refer(**kwargs)
        assert "\n" not in str(info.value)
    empty = tmp_path / "refer"
    (empty / "refcoco").mkdir(parents=True)
    (empty / "refcoco" / "refs(unc).p").write_bytes((fixture.refer_root / "refcoco" / "refs(unc).p").read_bytes())
    with pytest.raises(DataError, match=r"instances\.json: not found"):
        prepare_refer("refcoco", empty, fixture.images_dir, tmp_path / "out")
    with pytest.raises(DataError, match="unknown dataset"):
        prepare_refer("refclef", fixture.refer_root, fixture.images_dir, tmp_path / "out")


def test_read_manifest_without_preparation(tmp_path):
    with pytest.raises(DataError, match="run `sris prepare`"):
        read_manifest(tmp_path)


# -- combined set -----------------------------------------------------------------------------------------


def test_combined_excludes_every_held_out_image(fixture, tmp_path):
    manifest = prepare_refer("refcoco-combined", fixture.refer_root, fixture.images_dir, tmp_path, shard_size=3, workers=1)
    held = fixture.held_out_images()
    train = [json.loads(s["json"]) for s in read_split(tmp_path, manifest, "train")]
    assert train and not {m["image_id"] for m in train} & held
    expected = {"samples": 0, "sentences": 0}
    images = set()
    for dataset, split_by in [("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd")]:
        e = fixture.expected(dataset, split_by, "train", exclude_images=held)
        expected["samples"] += e["samples"]
        expected["sentences"] += e["sentences"]
        images |= {ANNS[a][0] for _, a, _, _ in fixture.refs(dataset, split_by, "train") if ANNS[a][0] not in held and fixture.usable(a)}
    assert {k: manifest["splits"]["train"][k] for k in ("samples", "sentences")} == expected
    assert manifest["splits"]["train"]["images"] == len(images)
    all_train = [(ann, d) for d, sb in [("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd")] for _, ann, _, _ in fixture.refs(d, sb, "train")]
    assert manifest["excluded_refs"] == sum(ANNS[a][0] in held for a, _ in all_train) > 0
    assert manifest["excluded_images"] == len({ANNS[a][0] for a, _ in all_train} & held) > 0
    assert {m["dataset"] for m in train} == {"refcoco", "refcoco+", "refcocog"}
    assert list(manifest["splits"]) == ["train", "refcoco-val", "refcoco+-val", "refcocog-val"]
    assert manifest["splits"]["refcocog-val"]["samples"] == fixture.expected("refcocog", "umd", "val")["samples"]


# -- resume ---------------------------------------------------------------------------------------------


class Interrupt(Exception):
    pass


def test_resume_after_an_interrupted_run(fixture, refcoco, tmp_path):
    reference, _ = refcoco

    def stop_after(n):
        def progress(done, total):
            if done >= n:
                raise Interrupt

        return progress

    with pytest.raises(Interrupt):
        prepare_refer("refcoco", fixture.refer_root, fixture.images_dir, tmp_path, shard_size=2, workers=1, progress=stop_after(5))
    finished = {p.name for p in tmp_path.glob("*.tar")}
    assert finished and list(tmp_path.glob("*.tmp"))  # two shards done, the third half-written
    with pytest.raises(DataError, match="did not finish"):
        read_manifest(tmp_path)
    mtimes = {name: (tmp_path / name).stat().st_mtime_ns for name in finished}
    calls = []
    prepare_refer("refcoco", fixture.refer_root, fixture.images_dir, tmp_path, shard_size=2, workers=1, progress=lambda d, t: calls.append(t))
    assert calls[-1] == sum(len(fixture.refs("refcoco", "unc", s)) for s in SPLITS[("refcoco", "unc")]) - 2 * len(finished)
    assert {name: (tmp_path / name).stat().st_mtime_ns for name in finished} == mtimes  # kept, not rewritten
    assert not list(tmp_path.glob("*.tmp"))
    assert shard_contents(tmp_path) == shard_contents(reference)
    assert read_manifest(tmp_path)["splits"] == read_manifest(reference)["splits"]


def test_resume_after_sigkill(fixture, refcoco, tmp_path):
    reference, _ = refcoco
    script = (
        "import os, signal, sys\n"
        "from shared_ris.data import prepare_refer\n"
        "def progress(done, total):\n"
        "    if done >= 6: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"prepare_refer('refcoco', {str(fixture.refer_root)!r}, {str(fixture.images_dir)!r}, {str(tmp_path)!r}, shard_size=2, workers=1, progress=progress)\n"
    )
    killed = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parent)
    assert killed.returncode == -9
    assert list(tmp_path.glob("*.tar"))
    prepare_refer("refcoco", fixture.refer_root, fixture.images_dir, tmp_path, shard_size=2, workers=2)
    assert shard_contents(tmp_path) == shard_contents(reference)


def test_rerunning_a_finished_preparation_rewrites_nothing(fixture, refcoco):
    out, manifest = refcoco
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    calls = []
    again = prepare_refer("refcoco", fixture.refer_root, fixture.images_dir, out, shard_size=2, workers=1, progress=lambda d, t: calls.append(t))
    assert calls == [0] and again == manifest
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == mtimes


def test_changed_settings_need_overwrite(fixture, refcoco, tmp_path):
    prepare_refer("refcoco", fixture.refer_root, fixture.images_dir, tmp_path, shard_size=2, workers=1)
    with pytest.raises(DataError, match="other settings .*shard_size.*--overwrite"):
        prepare_refer("refcoco", fixture.refer_root, fixture.images_dir, tmp_path, shard_size=3, workers=1)
    elsewhere = shutil.copytree(fixture.images_dir, tmp_path / "images-copy")
    with pytest.raises(DataError, match="other settings .*sources"):
        prepare_refer("refcoco", fixture.refer_root, elsewhere, tmp_path, shard_size=2, workers=1)
    manifest = prepare_refer("refcoco", fixture.refer_root, fixture.images_dir, tmp_path, shard_size=3, workers=1, overwrite=True)
    listed = {n for s in manifest["splits"].values() for n in s["shards"]}
    on_disk = {p.name for p in tmp_path.glob("*.tar")}
    assert listed <= on_disk and all(n.endswith(tuple(f"-{i:06d}.tar" for i in range(3))) for n in on_disk)
    assert sum(s["samples"] for s in manifest["splits"].values()) == sum(s["samples"] for s in refcoco[1]["splits"].values())
