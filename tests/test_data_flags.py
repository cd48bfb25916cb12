"""Issue #11: every ref and sentence stays in the shards, flagged; training skips what it cannot learn
from; the manifest's counts equal the refer API's; prepare compares them with the standard counts.

Expected numbers are computed here from ``refer_fixture``'s tables, not by the code under test.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from shard_reading import members_by_key
from refer_fixture import ANNS, REFS, build_refer_fixture, texts, fixture, refcoco  # noqa: F401
from shared_ris import Tokenizer, load_recipe
from shared_ris.data import DataError, build_train_loader, prepare_refer, read_manifest, train_steps_per_epoch
from shared_ris.data.loader import _trainable
from shared_ris.data.prepare import STANDARD_COUNTS, standard_counts
from shared_ris.data.sample import parse_sample
from shared_ris.data.synthetic import train_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools on numpy 2
UNC = ("refcoco", "unc")




def samples_of(out, manifest, split) -> dict[str, tuple[dict, np.ndarray]]:
    """key → (json, mask) of every sample of the split, read with tarfile alone."""
    return {k: (json.loads(v["json"]), np.asarray(Image.open(io.BytesIO(v["mask.png"])))) for k, v in members_by_key(out, manifest, split).items()}


def usable_refs(fixture, split):
    return [r for r in REFS[UNC] if r[2] == split and fixture.usable(r[1])]


# -- shards and manifest ---------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "val", "testA", "testB"])
def test_every_sentence_of_every_writable_ref_is_kept(fixture, refcoco, split):
    out, manifest = refcoco
    stored = {meta["ref_id"]: (meta, mask) for meta, mask in samples_of(out, manifest, split).values()}
    assert set(stored) == {r[0] for r in usable_refs(fixture, split)}
    for ref_id, ann_id, _, sentences in usable_refs(fixture, split):
        meta, mask = stored[ref_id]
        assert [(s["raw"], s["sent"]) for s in meta["sentences"]] == [texts(s) for s in sentences]
        assert [s["sent_id"] for s in meta["sentences"]] == [ref_id * 100 + k for k in range(len(sentences))]
        assert meta["empty_mask"] is (ANNS[ann_id][2] == "empty") is (not mask.any())
        assert mask.shape == (meta["height"], meta["width"])  # all-zero, but at the image's size


@pytest.mark.parametrize("split", ["val", "testA", "testB"])
def test_manifest_sentences_equal_the_refer_api_count(fixture, refcoco, split):
    """Every ref of these splits can be written, so the counts are the refer API's exactly."""
    _, manifest = refcoco
    stats = manifest["splits"][split]
    refs = [r for r in REFS[UNC] if r[2] == split]
    assert (stats["samples"], stats["sentences"]) == (len(refs), sum(len(r[3]) for r in refs)) == fixture.refer_api_counts(*UNC, split)


@pytest.mark.parametrize("split", ["train", "val", "testA", "testB"])
def test_manifest_flag_counts(fixture, refcoco, split):
    _, manifest = refcoco
    stats = manifest["splits"][split]
    kept = usable_refs(fixture, split)
    empty_masks = sum(ANNS[ann][2] == "empty" for _, ann, _, _ in kept)
    assert stats["empty_mask_samples"] == empty_masks
    for index, field in enumerate(("raw", "sent")):
        empty = sum(not texts(s)[index].strip() for *_, sentences in kept for s in sentences)
        trainable = sum(ANNS[ann][2] != "empty" and any(texts(s)[index].strip() for s in sentences) for _, ann, _, sentences in kept)
        assert stats["empty_text_sentences"][field] == empty
        assert stats["trainable_samples"][field] == trainable
    assert fixture.expected_flags(*UNC, split) == {k: stats[k] for k in ("empty_mask_samples", "empty_text_sentences", "trainable_samples")}


def test_testb_has_every_kind_of_flag(fixture):
    """The fixture exercises what the tests above claim to cover."""
    flags = fixture.expected_flags(*UNC, "testB")
    assert flags["empty_mask_samples"] == 1 and flags["empty_text_sentences"]["sent"] > flags["empty_text_sentences"]["raw"] > 0
    assert flags["trainable_samples"]["sent"] < flags["trainable_samples"]["raw"] < fixture.expected(*UNC, "testB")["samples"]


# -- training skips what it cannot learn from ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer(train_tokenizer(tmp_path_factory.mktemp("tok") / "spm.model"), 10)


def trainable_texts(fixture, split, field) -> dict[int, list[str]]:
    index = 0 if field == "raw" else 1
    out = {}
    for ref_id, ann, _, sentences in usable_refs(fixture, split):
        chosen = [texts(s)[index] for s in sentences if texts(s)[index].strip()]
        if chosen and ANNS[ann][2] != "empty":
            out[ref_id] = chosen
    return out


@pytest.mark.parametrize("field", ["sent", "raw"])
def test_training_draws_only_learnable_refs_and_sentences(fixture, refcoco, tokenizer, field):
    out, _ = refcoco
    recipe = load_recipe("tiny", ["data.train_split=testB", f"data.text_field={field}", "train.batch_size=1", "data.shuffle_buffer=4"])
    allowed = trainable_texts(fixture, "testB", field)
    loader = build_train_loader(out, recipe, tokenizer, num_workers=0)
    assert len(loader) == len(allowed) == train_steps_per_epoch(out, recipe)  # an epoch: each learnable ref once
    encodings = {ref: [tokenizer(t, pad_to=10)[0][0].tolist() for t in chosen] for ref, chosen in allowed.items()}
    seen = set()
    for epoch in range(4):
        loader.set_epoch(epoch)
        for batch in loader:
            ref_id = int(batch["keys"][0].split("-")[1])
            assert ref_id in allowed and batch["text_ids"][0].tolist() in encodings[ref_id]
            assert batch["masks"].sum() > 0
            seen.add(ref_id)
    assert seen == set(allowed)


def test_resume_is_exact_with_flagged_refs_in_the_stream(refcoco, tokenizer):
    out, _ = refcoco
    recipe = load_recipe("tiny", ["data.train_split=testB", "data.text_field=raw", "train.batch_size=1", "data.shuffle_buffer=4"])
    fingerprint = lambda loader: [(b["keys"], b["text_ids"].tolist()) for b in loader]  # noqa: E731
    full = fingerprint(build_train_loader(out, recipe, tokenizer, epoch=3, num_workers=0))
    assert fingerprint(build_train_loader(out, recipe, tokenizer, epoch=3, start_step=1, num_workers=0)) == full[1:]


def test_a_split_with_nothing_to_learn_is_one_line(refcoco, tokenizer):
    out, _ = refcoco
    recipe = load_recipe("tiny", ["data.train_split=testB", "data.text_field=sent", "train.batch_size=2"])
    with pytest.raises(DataError, match=r"1 samples to train on \(3 of 4 flagged: empty mask or no 'sent' text\), fewer than one batch") as info:
        build_train_loader(out, recipe, tokenizer)
    assert "\n" not in str(info.value)


def test_a_stream_of_flagged_samples_fails_instead_of_hanging():
    raw = {"__key__": "x-1", "jpg": b"", "mask.png": b"", "json": json.dumps({"empty_mask": True, "sentences": [{"sent_id": 1, "sent": "a", "raw": "a"}]}).encode()}
    endless = (parse_sample(raw, "s.tar", "sent") for _ in iter(int, 1))
    with pytest.raises(DataError, match="nothing to train on"):
        next(_trainable(endless, "sent", patience=50))


def test_a_wrongly_typed_flag_is_refused():
    raw = {"__key__": "x-1", "jpg": b"", "mask.png": b"", "json": json.dumps({"empty_mask": "yes", "sentences": [{"sent_id": 1, "sent": "", "raw": ""}]}).encode()}
    with pytest.raises(DataError, match="'empty_mask' must be true or false"):
        parse_sample(raw, "s.tar", "sent")


def test_a_lying_trainable_count_is_refused(refcoco, tokenizer, tmp_path):
    out, manifest = refcoco
    import shutil

    copy = shutil.copytree(out, tmp_path / "copy")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["splits"]["testB"]["trainable_samples"]["sent"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    recipe = load_recipe("tiny", ["data.train_split=testB"])
    with pytest.raises(DataError, match="'trainable_samples' must give a count of at most the split's 4 samples"):
        build_train_loader(copy, recipe, tokenizer)


# -- standard counts ----------------------------------------------------------------------------------------


def test_standard_counts_say_standard_or_name_the_difference():
    def manifest(**splits):
        return {"dataset": "refcoco", "config": {"split_by": "unc", "limit": None},
                "splits": {name: {"samples": r, "sentences": s} for name, (r, s) in splits.items()}}  # fmt: skip

    rows = standard_counts(manifest(val=(3811, 10834), testA=(1974, 5654), extra=(5, 9)))
    assert rows[0].matches and rows[0].describe() == "val 3,811 refs / 10,834 sentences (standard)"
    assert not rows[1].matches
    assert rows[1].describe() == (
        "testA 1,974 refs / 5,654 sentences, not the standard 1,975 / 5,657: 1 ref fewer and 3 sentences fewer "
        "(an incomplete download, or refs skipped: see manifest.json)"
    )
    assert standard_counts(manifest(testB=(1810, 5096)))[0].describe().startswith("testB 1,810 refs / 5,096 sentences, not the standard 1,810 / 5,095: 1 sentence more")
    assert rows[2].standard is None and rows[2].describe() == "extra 5 refs / 9 sentences"
    limited = manifest(val=(3, 9))
    limited["config"]["limit"] = 3
    assert standard_counts(limited)[0].standard is None
    combined = {"dataset": "refcoco-combined", "config": {"limit": None}, "splits": {"train": {"samples": 1, "sentences": 1}, "refcoco+-val": {"samples": 3805, "sentences": 10758}}}
    assert [r.matches for r in standard_counts(combined)] == [False, True] and standard_counts(combined)[0].standard is None


def test_standard_table_adds_up_to_the_datasets_published_totals():
    """RefCOCO: 50,000 refs (142,210 expressions in the refer API's unc files); RefCOCO+: 49,856 / 141,564;
    RefCOCOg umd: 49,822 / 95,010."""
    totals = {}
    for (dataset, _, _), (refs, sentences) in STANDARD_COUNTS.items():
        r, s = totals.get(dataset, (0, 0))
        totals[dataset] = (r + refs, s + sentences)
    assert totals == {"refcoco": (50_000, 142_210), "refcoco+": (49_856, 141_564), "refcocog": (49_822, 95_010)}


def test_cli_prepare_prints_counts_against_the_standard(fixture, tmp_path):
    result = CliRunner().invoke(app, ["prepare", "refcoco", "--refer-root", str(fixture.refer_root), "--images", str(fixture.images_dir),
                                      "--out", str(tmp_path / "out"), "--workers", "1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    refs, sentences = fixture.refer_api_counts(*UNC, "val")
    assert f"warning: val {refs} ref{'s' * (refs != 1)} / {sentences} sentence{'s' * (sentences != 1)}, not the standard 3,811 / 10,834" in " ".join(result.output.split())
    assert "training skips them" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["prepare", "refcoco", "--images", str(fixture.images_dir), "--out", str(tmp_path / "o2")])
    assert result.exit_code == 2 and "--refer-root" in result.output and "--parquet" in result.output and "Traceback" not in result.output
