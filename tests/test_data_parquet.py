"""Issue #11: RefCOCO/+/g from the Hugging Face parquet copies (jxu124/refcoco, refcocoplus, refcocog).

The parquet files are written here with pyarrow, in those copies' schema, from the same tables as
``refer_fixture``'s refer files (multi-polygon, uncompressed and compressed RLE, crowd annotations,
an empty mask, empty texts; the annotations and image entries as JSON strings). The two routes
must give byte-identical shards, and manifests that differ only in ``sources`` (the files read).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cli.main import app
from parquet_fixture import SCHEMA, hub_rows, write_hub_copy
from refer_fixture import REFS, build_refer_fixture, fixture  # noqa: F401
from shared_ris.data import DataError, prepare_refer, read_manifest
from shared_ris.data.prepare import prepare_parquet

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools on numpy 2



def tar_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def without_sources(out: Path) -> str:
    """manifest.json as written, minus its ``sources`` entry (the input files' paths, which name the route)."""
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    manifest.pop("sources")
    return json.dumps(manifest, indent=1, ensure_ascii=False)


@pytest.mark.parametrize("dataset,split_by", [("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd")])
def test_parquet_and_refer_files_give_byte_identical_shards(fixture, tmp_path, dataset, split_by):
    hub = write_hub_copy(tmp_path / "hub", dataset, split_by)
    from_refer = prepare_refer(dataset, fixture.refer_root, fixture.images_dir, tmp_path / "refer", shard_size=2, workers=1)
    from_parquet = prepare_parquet(dataset, hub, fixture.images_dir, tmp_path / "parquet", shard_size=2, workers=2)
    shards = tar_bytes(tmp_path / "refer")
    assert shards and tar_bytes(tmp_path / "parquet") == shards
    assert without_sources(tmp_path / "parquet") == without_sources(tmp_path / "refer")
    assert from_parquet["sources"]["parquet"] == [str(p.resolve()) for p in sorted((hub / "data").glob("*.parquet"))]
    assert from_refer["sources"]["refs"].endswith(f"refs({split_by}).p") and from_parquet["sources"]["duplicate_rows"] == 0
    assert read_manifest(tmp_path / "parquet")["splits"] == from_refer["splits"]


def test_split_names_are_the_refer_apis(fixture, tmp_path):
    manifest = prepare_parquet("refcoco", write_hub_copy(tmp_path / "hub", "refcoco", "unc"), fixture.images_dir, tmp_path / "out", workers=1)
    assert list(manifest["splits"]) == ["train", "val", "testA", "testB"]
    assert manifest["config"]["split_by"] == "unc"
    counts = {s: len([r for r in REFS[("refcoco", "unc")] if r[2] == s]) for s in ("val", "testA", "testB")}
    assert {s: manifest["splits"][s]["samples"] for s in counts} == counts  # every one of these refs can be written
    manifest = prepare_parquet("refcocog", write_hub_copy(tmp_path / "g", "refcocog", "umd"), fixture.images_dir, tmp_path / "g-out", workers=1)
    assert list(manifest["splits"]) == ["train", "val", "test"]


def test_a_stale_copy_with_the_same_refs_is_read_once(fixture, tmp_path):
    hub = write_hub_copy(tmp_path / "hub", "refcoco", "unc")
    stale = [r for r in hub_rows("refcoco", "unc") if r["split"] == "test"]
    pq.write_table(pa.Table.from_pylist(stale, schema=SCHEMA), hub / "data" / "test-00000-of-00001-0ld.parquet")
    manifest = prepare_parquet("refcoco", hub, fixture.images_dir, tmp_path / "out", workers=1)
    assert manifest["sources"]["duplicate_rows"] == len(stale)
    reference = prepare_parquet("refcoco", write_hub_copy(tmp_path / "clean", "refcoco", "unc"), fixture.images_dir, tmp_path / "ref", workers=1)
    assert manifest["splits"] == reference["splits"]


# -- bad files: one line naming the file and the row -------------------------------------------------------


def altered(change) -> list[dict]:
    rows = hub_rows("refcoco", "unc")
    change(rows)
    return rows


BAD_ROWS = {
    "unknown split": (lambda rows: rows[0].update(split="testC"), "'split' must be one of train, validation, test, testB, got 'testC'"),
    "raw_anns not JSON": (lambda rows: rows[0].update(raw_anns="{not json"), "'raw_anns' is not valid JSON"),
    "raw_anns of another annotation": (lambda rows: rows[0].update(raw_anns=json.dumps({**json.loads(rows[0]["raw_anns"]), "id": 999})), "'raw_anns' is entry 999, not the row's ann_id"),
    "raw_anns a list of numbers": (lambda rows: rows[0].update(raw_anns="[1, 2]"), "'raw_anns' must hold a JSON object"),
    "raw_anns nested too deep": (lambda rows: rows[0].update(raw_anns="[" * 100_000 + "]" * 100_000), "'raw_anns' is not valid JSON (RecursionError)"),
    "image entry without width": (lambda rows: rows[0].update(raw_image_info=json.dumps({"id": rows[0]["image_id"], "height": 48})), "raw_image_info: 'width' must be a positive integer"),
    "image file_name climbs out": (lambda rows: rows[0].update(raw_image_info=json.dumps({**json.loads(rows[0]["raw_image_info"]), "file_name": "../x.jpg"})), "'file_name' must be a name inside the --images folder"),
    "bbox a string": (lambda rows: rows[0].update(raw_anns=json.dumps({**json.loads(rows[0]["raw_anns"]), "bbox": "1 2 3 4"})), "raw_anns: 'bbox' must be 4 numbers"),
    "sentence without sent_id": (lambda rows: rows[0]["sentences"][0].update(sent_id=None), "sentence 0: 'sent_id' must be a non-negative integer, got nothing"),
    "negative ref_id": (lambda rows: rows[0].update(ref_id=-4), "'ref_id' must be a non-negative integer, got -4"),
    "a ref twice, different": (lambda rows: rows.append({**rows[0], "sentences": rows[1]["sentences"]}), "ref 1 differs from the one in"),
    "an image described twice, differently": (lambda rows: rows[1].update(raw_image_info=json.dumps({"id": rows[1]["image_id"], "width": 10, "height": 10})), "image 1 differs from the one in"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_rows_are_one_line_errors(fixture, tmp_path, case):
    change, fragment = BAD_ROWS[case]
    rows = altered(change)
    (tmp_path / "hub").mkdir()
    path = tmp_path / "hub" / "all.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)
    with pytest.raises(DataError) as info:
        prepare_parquet("refcoco", tmp_path / "hub", fixture.images_dir, tmp_path / "out", workers=1)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and fragment in message, message
    assert "row " in message or "twice" in message or "differs" in message
    assert not (tmp_path / "out").exists()


def test_wrong_column_types_and_files(fixture, tmp_path):
    hub = tmp_path / "hub"
    hub.mkdir()
    table = pa.Table.from_pylist(hub_rows("refcoco", "unc"), schema=SCHEMA)
    cases = [
        (table.set_column(table.schema.get_field_index("ref_id"), "ref_id", pa.array([str(v) for v in table["ref_id"].to_pylist()])), "'ref_id' must be a non-negative integer, got '1'"),
        (table.drop_columns(["raw_anns", "split"]), "lacks the column(s) split, raw_anns"),
        (table.set_column(table.schema.get_field_index("sentences"), "sentences", pa.array(["x"] * len(table))), "'sentences' must be a list of sentence dicts"),
        (b"PAR1 this is not a parquet file", "not a readable parquet file"),
    ]
    for content, fragment in cases:
        path = hub / "one.parquet"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            pq.write_table(content, path)
        with pytest.raises(DataError) as info:
            prepare_parquet("refcoco", hub, fixture.images_dir, tmp_path / "out", workers=1)
        assert "\n" not in str(info.value) and str(path) in str(info.value) and fragment in str(info.value), str(info.value)


def test_folder_and_option_errors(fixture, tmp_path):
    (tmp_path / "empty").mkdir()
    for folder, fragment in ((tmp_path / "empty", r"no \*\.parquet files"), (tmp_path / "nowhere", "parquet folder not found")):
        with pytest.raises(DataError, match=fragment):
            prepare_parquet("refcoco", folder, fixture.images_dir, tmp_path / "out")
    hub = write_hub_copy(tmp_path / "hub", "refcocog", "umd")
    with pytest.raises(DataError, match="hold the umd splits only; drop --split-by google"):
        prepare_parquet("refcocog", hub, fixture.images_dir, tmp_path / "out", split_by="google")
    with pytest.raises(DataError, match="--parquet reads refcoco, refcoco\\+, refcocog"):
        prepare_parquet("refcoco-combined", hub, fixture.images_dir, tmp_path / "out")


def test_missing_pyarrow_names_the_extra(fixture, tmp_path, monkeypatch):
    hub = write_hub_copy(tmp_path / "hub", "refcoco", "unc")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError) as info:
        prepare_parquet("refcoco", hub, fixture.images_dir, tmp_path / "out")
    assert str(info.value) == "reading parquet files needs pyarrow: pip install 'shared-ris[parquet]'"


def test_cli_parquet_route(fixture, tmp_path):
    hub = write_hub_copy(tmp_path / "hub", "refcoco+", "unc")
    args = ["prepare", "refcoco+", "--parquet", str(hub), "--images", str(fixture.images_dir), "--out", str(tmp_path / "out"), "--workers", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    refs, sentences = len([r for r in REFS[("refcoco+", "unc")] if r[2] == "val"]), sum(len(r[3]) for r in REFS[("refcoco+", "unc")] if r[2] == "val")
    assert f"warning: val {refs} ref{'s' * (refs != 1)} / {sentences} sentence{'s' * (sentences != 1)}, not the standard 3,805 / 10,758" in " ".join(result.output.split())
    both = CliRunner().invoke(app, args[:2] + ["--refer-root", str(fixture.refer_root)] + args[2:])
    assert both.exit_code == 2 and "one of the two" in both.output and len(both.output.strip().splitlines()) == 1
    bad = CliRunner().invoke(app, ["prepare", "refcoco", "--parquet", str(tmp_path / "nowhere"), "--images", str(fixture.images_dir), "--out", str(tmp_path / "o")])
    assert bad.exit_code == 2 and "parquet folder not found" in bad.output and "Traceback" not in bad.output
