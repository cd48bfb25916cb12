"""``sris prepare grefcoco`` on a miniature gRefCOCO in the real format, checked against masks
computed with pycocotools as ReLA's ``G_REFER.getMaskByRef`` computes them."""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from grefcoco_fixture import IMAGES, REFS, expected_mask, write_grefcoco
from shard_reading import members_by_key
from shared_ris.data import DataError, UnsafePickleError, prepare_refer

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools on numpy 2


@pytest.fixture(scope="module")
def grefcoco(tmp_path_factory):
    fixture = write_grefcoco(tmp_path_factory.mktemp("grefcoco"))
    out = fixture.root.parent / "shards"
    return fixture, out, prepare_refer("grefcoco", fixture.root, fixture.images, out, workers=1)


def _samples(out, manifest) -> dict[int, dict]:
    """ref_id → (meta, mask) of every sample in every split, read with tarfile alone."""
    found = {}
    for split in manifest["splits"]:
        for members in members_by_key(out, manifest, split).values():
            meta = json.loads(members["json"])
            found[meta["ref_id"]] = {"meta": meta, "mask": (np.asarray(Image.open(io.BytesIO(members["mask.png"]))) > 127).astype(np.uint8)}
    return found


def test_masks_equal_the_union_computed_with_pycocotools(grefcoco):
    fixture, out, manifest = grefcoco
    samples = _samples(out, manifest)
    assert sorted(samples) == sorted(ref[0] for ref in REFS)
    for ref_id, ann_ids, *_ in REFS:
        width, height = IMAGES[fixture.image_of(ref_id)]
        expected = expected_mask(ann_ids, width, height)
        np.testing.assert_array_equal(samples[ref_id]["mask"], expected, err_msg=f"ref {ref_id}")
    # the fixture's unions are not trivial: two annotations overlap, a crowd one is left out
    assert (expected_mask([203], 64, 48) & expected_mask([201], 64, 48)).any()
    assert samples[6]["mask"].sum() == expected_mask([201], 64, 48).sum()


def test_target_counts_lists_and_no_target_flags(grefcoco):
    _, out, manifest = grefcoco
    samples = _samples(out, manifest)
    for ref_id, ann_ids, split, sentences, _ in REFS:
        meta = samples[ref_id]["meta"]
        no_target = ann_ids == [-1]
        assert meta["ann_id"] == ann_ids and meta["split"] == split
        assert meta["target_count"] == (0 if no_target else len(ann_ids))
        assert meta["no_target"] is no_target and meta["empty_mask"] is no_target
        assert [s["raw"] for s in meta["sentences"]] == sentences
    assert manifest["generalized"] is True


def test_counts_per_split_and_target_count(grefcoco):
    _, _, manifest = grefcoco
    for split in ("train", "val", "testA", "testB"):
        refs = [r for r in REFS if r[2] == split]
        group = lambda ann_ids: "0" if ann_ids == [-1] else "1" if len(ann_ids) == 1 else "2+"  # noqa: E731
        expected_refs = {g: sum(group(r[1]) == g for r in refs) for g in ("0", "1", "2+")}
        expected_sentences = {g: sum(len(r[3]) for r in refs if group(r[1]) == g) for g in ("0", "1", "2+")}
        info = manifest["splits"][split]
        assert info["target_samples"] == expected_refs and info["target_sentences"] == expected_sentences
        # no-target refs are learnable (their empty mask is the answer)
        assert info["trainable_samples"]["sent"] == len(refs)


def test_cli_prints_counts_by_target_count(tmp_path):
    fixture = write_grefcoco(tmp_path)
    args = ["prepare", "grefcoco", "--refer-root", str(fixture.root), "--images", str(fixture.images), "--out", str(tmp_path / "out"), "--workers", "1"]
    result = CliRunner().invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "by target count" in result.output
    table = result.output.split("by target count", 1)[1]
    train_row = next(line for line in table.splitlines() if line.strip("│┃ ").startswith("train"))
    assert [cell.strip() for cell in train_row.strip("│ ").split("│")][1:] == ["1 / 1", "1 / 1", "2 / 3"]


def test_a_pickled_copy_reads_the_same_through_the_restricted_unpickler(tmp_path):
    fixture = write_grefcoco(tmp_path)
    folder = fixture.root / "grefcoco"
    refs = json.loads((folder / "grefs(unc).json").read_text())
    (folder / "grefs(unc).json").unlink()
    (folder / "grefs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    manifest = prepare_refer("grefcoco", fixture.root, fixture.images, tmp_path / "out", workers=1)
    assert manifest["splits"]["train"]["target_samples"] == {"0": 1, "1": 1, "2+": 2}
    (folder / "grefs(unc).p").write_bytes(b"cos\nsystem\n(S'echo owned'\ntR.")
    with pytest.raises(UnsafePickleError):
        prepare_refer("grefcoco", fixture.root, fixture.images, tmp_path / "out2", workers=1)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda ref: ref.update(ann_id=201), "'ann_id' must be a non-empty list of annotation ids, or [-1]"),
        (lambda ref: ref.update(ann_id=[]), "'ann_id' must be a non-empty list"),
        (lambda ref: ref.update(ann_id=[-1, 201]), "'ann_id' must be a non-empty list"),
        (lambda ref: ref.update(no_target=True), "'no_target' is True but 'ann_id' is [201, 202]"),
        (lambda ref: ref.update(split="../x"), "'split' must be a split name"),
        (lambda ref: ref.pop("sentences"), "lacks sentences"),
    ],
)
def test_malformed_refs_are_one_line_naming_the_ref(tmp_path, change, message):
    fixture = write_grefcoco(tmp_path)
    path = fixture.root / "grefcoco" / "grefs(unc).json"
    refs = json.loads(path.read_text())
    change(refs[0])
    path.write_text(json.dumps(refs))
    with pytest.raises(DataError) as error:
        prepare_refer("grefcoco", fixture.root, fixture.images, tmp_path / "out", workers=1)
    assert message in str(error.value) and "ref 1" in str(error.value) and "\n" not in str(error.value)


def test_missing_and_unparsable_refs_files(tmp_path):
    fixture = write_grefcoco(tmp_path)
    path = fixture.root / "grefcoco" / "grefs(unc).json"
    path.write_text("{not json")
    with pytest.raises(DataError, match=r"not a JSON refs file"):
        prepare_refer("grefcoco", fixture.root, fixture.images, tmp_path / "out", workers=1)
    path.unlink()
    with pytest.raises(DataError, match=r"grefs\(unc\)\.json: gRefCOCO refs not found"):
        prepare_refer("grefcoco", fixture.root, fixture.images, tmp_path / "out", workers=1)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda folder: (folder / "grefs(unc).json").write_bytes(b"\xff\xfe\x00garbage"), "not a JSON refs file"),
        (lambda folder: (folder / "grefs(unc).json").write_text(json.dumps({"refs": []})), "expected a list of gRefCOCO ref dicts, got a dict"),
        (lambda folder: (folder / "grefs(unc).json").write_text(json.dumps([{"ref_id": "1"}])), "lacks ann_id"),
        (lambda folder: (folder / "instances.json").write_text(json.dumps(_instances_with_name(folder, "../../outside.jpg"))), "'file_name' must be a name inside the --images folder"),
        (lambda folder: (folder / "instances.json").write_text(json.dumps(_instances_with_name(folder, "/etc/passwd"))), "'file_name' must be a name inside the --images folder"),
    ],
)
def test_hostile_inputs_are_one_line_exit_2_and_write_nothing_outside(tmp_path, damage, message):
    fixture = write_grefcoco(tmp_path / "in")
    damage(fixture.root / "grefcoco")
    out = tmp_path / "work" / "out"
    before = sorted(p for p in tmp_path.rglob("*") if out not in p.parents and p != out)
    args = ["prepare", "grefcoco", "--refer-root", str(fixture.root), "--images", str(fixture.images), "--out", str(out), "--workers", "1"]
    result = CliRunner().invoke(app, args, terminal_width=400)
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert sorted(p for p in tmp_path.rglob("*") if out not in p.parents and p != out) == before
    assert not out.exists() or not list(out.glob("*.tar"))


def _instances_with_name(folder, name: str) -> dict:
    instances = json.loads((folder / "instances.json").read_text())
    instances["images"][0]["file_name"] = name
    return instances
