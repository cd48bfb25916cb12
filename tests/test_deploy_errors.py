"""Deployment inputs that must fail cleanly, fast (no export, no training): hostile ``.onnx`` files
and bundles, wrong runtime / precision / option combinations, a missing ``[onnx]`` extra; and the
bundle round trip on a random-weight run.

Every failure goes through the real ``sris`` entry and must be exit code 2, exactly one
``error:`` line naming the file, no traceback, nothing run from a file and nothing changed outside
``--out``. The ``.onnx`` files are built by hand with ``onnx.helper``: a tiny valid graph with an
export's signature and metadata, then one thing damaged.
"""

from __future__ import annotations

import pickle
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from cli.main import main
from fixtures_predict import gradient, trained_run  # noqa: F401
from hostile_fixtures import snapshot
from shared_ris.bundle import write_bundle
from shared_ris.checkpoint import load_run, read_trained
from shared_ris.export import Agreement, ExportRejected, check_agreement, compare_logits
from shared_ris.onnx_model import META, OnnxMetadata
from shared_ris.predictor import Predictor

onnx = pytest.importorskip("onnx")
SENTINEL = "PWNED"


# -- hand-made .onnx files ---------------------------------------------------------------------------


def fake_export(path: Path, run: Path, props: dict | None = None, drop: tuple = (), location: str | None = None, image_input: str = "images") -> Path:
    """A valid ONNX graph with an export's inputs, output and metadata (logits = a 4×4 strided
    conv of the image), for the run's recipe and tokenizer; ``props`` / ``drop`` alter the metadata,
    ``location`` moves the conv weight to external data at that location."""
    from onnx import TensorProto, helper, numpy_helper

    trained = read_trained(run)
    recipe, side, length = trained.recipe, trained.recipe.model.image_size, trained.recipe.model.max_text_len
    value = helper.make_tensor_value_info
    inputs = [value(image_input, TensorProto.FLOAT, ["batch", 3, side, side]), value("text_ids", TensorProto.INT64, ["batch", length]),
              value("text_padding_mask", TensorProto.BOOL, ["batch", length])]  # fmt: skip
    weight = numpy_helper.from_array(np.full((1, 3, 4, 4), 1 / 48, np.float32), "weight")
    if location is not None:
        weight.ClearField("raw_data")
        weight.data_location = TensorProto.EXTERNAL
        for key, entry in (("location", location), ("offset", "0"), ("length", "192")):
            weight.external_data.add(key=key, value=entry)
    node = helper.make_node("Conv", [image_input, "weight"], ["logits"], strides=[4, 4])
    output = value("logits", TensorProto.FLOAT, ["batch", 1, side // 4, side // 4])
    model = helper.make_model(helper.make_graph([node], "fake", inputs, [output], [weight]), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = OnnxMetadata(recipe, (run.parent / "spm.model").read_bytes(), recipe.model.threshold, "none").to_props()
    meta.update(props or {})
    for key, entry in meta.items():
        if key not in drop:
            model.metadata_props.add(key=key, value=entry)
    path.write_bytes(model.SerializeToString())
    return path


def test_a_hand_made_export_loads_and_predicts(trained_run, tmp_path):
    """The baseline of the damaged copies below: undamaged, it loads and predicts."""
    predictor = Predictor.from_checkpoint(fake_export(tmp_path / "ok.onnx", trained_run))
    [prediction] = predictor.predict([gradient(40, 30)], "the red circle")
    assert prediction.mask.shape == (30, 40) and predictor.runtime == "onnx"


# -- the table of bad inputs ------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    setup: Callable[[Path, Path], Path]  # (root, random-weight run) → the --checkpoint to pass
    names: str  # a fragment the error line must contain
    extra: tuple[str, ...] = ()
    command: str = "predict"


def onnx_case(**kwargs) -> Callable[[Path, Path], Path]:
    return lambda root, run: fake_export(root / "model.onnx", run, **kwargs)


def write_file(name: str, content: bytes) -> Callable[[Path, Path], Path]:
    def setup(root: Path, run: Path) -> Path:
        (root / name).write_bytes(content)
        return root / name

    return setup


def evil_pickle() -> bytes:
    class Evil:
        def __reduce__(self):
            import os

            return os.system, (f"touch {SENTINEL}",)

    return pickle.dumps({"weight": Evil()})


def bundle_case(damage: Callable[[Path], None]) -> Callable[[Path, Path], Path]:
    def setup(root: Path, run: Path) -> Path:
        write_bundle(run, root / "bundle")
        damage(root / "bundle")
        return root / "bundle"

    return setup


def edit_weights(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        tensors = load_file(folder / "model.safetensors")
        change(tensors)
        save_file(tensors, folder / "model.safetensors")

    return damage


def shrink_a_matrix(tensors: dict) -> None:
    key = next(k for k, v in tensors.items() if v.dim() == 2 and v.shape[0] > 1)
    tensors[key] = tensors[key][:1].clone()


RECIPE_PROP = "shared_ris.recipe"
CASES = [
    Case("onnx: not protobuf", write_file("model.onnx", b"not an onnx model at all"), "model.onnx"),
    Case("onnx: a pickle named .onnx", write_file("model.onnx", evil_pickle()), "model.onnx"),
    Case("onnx: no shared-ris metadata", onnx_case(drop=tuple(META.values())), "without shared-ris metadata"),
    Case("onnx: a newer format", onnx_case(props={"shared_ris.format": "7"}), "format '7'"),
    Case("onnx: recipe key missing", onnx_case(drop=(RECIPE_PROP,)), RECIPE_PROP),
    Case("onnx: recipe is a python object tag", onnx_case(props={RECIPE_PROP: f"!!python/object/apply:os.system ['touch {SENTINEL}']"}), "its recipe metadata"),
    Case("onnx: recipe out of range", onnx_case(props={RECIPE_PROP: "model: {image_size: -3}"}), "its recipe metadata"),
    Case("onnx: threshold NaN", onnx_case(props={"shared_ris.threshold": "nan"}), "threshold"),
    Case("onnx: threshold 2", onnx_case(props={"shared_ris.threshold": "2"}), "threshold 2.0"),
    Case("onnx: image size disagrees", onnx_case(props={"shared_ris.image_size": "999"}), "image_size"),
    Case("onnx: unknown quantization", onnx_case(props={"shared_ris.quantize": "int3"}), "int3"),
    Case("onnx: tokenizer not base64", onnx_case(props={"shared_ris.tokenizer": "%%%"}), "base64"),
    Case("onnx: tokenizer not sentencepiece", onnx_case(props={"shared_ris.tokenizer": "aGVsbG8="}), "embedded tokenizer"),
    Case("onnx: weights at ../victim.bin", onnx_case(location="../victim.bin"), "../victim.bin"),
    Case("onnx: weights at an absolute path", lambda root, run: onnx_case(location=str(root / "victim.bin"))(root, run), "victim.bin"),
    Case("onnx: weight file missing", onnx_case(location="model.onnx.data"), "is missing"),
    Case("onnx: inputs renamed", onnx_case(image_input="pixels"), "expected inputs"),
    Case("onnx: --attention", onnx_case(), "--attention", ("--attention",)),
    Case("onnx: --precision bf16", onnx_case(), "--precision bf16", ("--precision", "bf16")),
    Case("onnx: --runtime torch", onnx_case(), "model.onnx", ("--runtime", "torch")),
    Case("onnx: --device cuda", onnx_case(), "--device", ("--device", "cuda")),
    Case("checkpoint: --runtime onnx", lambda root, run: run, "sris export", ("--runtime", "onnx")),
    Case("checkpoint: --runtime tflite", lambda root, run: run, "--runtime tflite", ("--runtime", "tflite")),
    Case("checkpoint: --precision fp8", lambda root, run: run, "--precision fp8", ("--precision", "fp8")),
    Case("bundle: not a bundle folder", lambda root, run: root / "images", "not a model bundle"),
    Case("bundle: weights are a pickle", bundle_case(lambda f: (f / "model.safetensors").write_bytes(evil_pickle())), "model.safetensors"),
    Case("bundle: weights truncated", bundle_case(lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:5000])), "model.safetensors"),
    Case("bundle: recipe missing", bundle_case(lambda f: (f / "recipe.yaml").unlink()), "recipe.yaml"),
    Case("bundle: recipe is a python object tag", bundle_case(lambda f: (f / "recipe.yaml").write_text(f"!!python/object/apply:os.system ['touch {SENTINEL}']\n")), "recipe.yaml"),
    Case("bundle: recipe.yaml of 2 MB", bundle_case(lambda f: (f / "recipe.yaml").write_text("#" * (2 << 20))), "too large"),
    Case("bundle: recipe value out of range", bundle_case(lambda f: (f / "recipe.yaml").write_text((f / "recipe.yaml").read_text().replace("image_size: 128", "image_size: -1"))), "recipe.yaml"),
    Case("bundle: no-target threshold out of range", bundle_case(lambda f: (f / "recipe.yaml").write_text((f / "recipe.yaml").read_text().replace("no_target_threshold: 0.5", "no_target_threshold: 1.5"))), "no_target_threshold"),
    Case("bundle: no-target threshold not a number", bundle_case(lambda f: (f / "recipe.yaml").write_text((f / "recipe.yaml").read_text().replace("no_target_threshold: 0.5", "no_target_threshold: [0.5]"))), "no_target_threshold"),
    Case("bundle: a weight missing", bundle_case(edit_weights(lambda t: t.pop(next(iter(t))))), "missing"),
    Case("bundle: a weight of the wrong shape", bundle_case(edit_weights(shrink_a_matrix)), "shape mismatch"),
    Case("bundle: fp16 weights", bundle_case(edit_weights(lambda t: t.update({k: v.half() for k, v in t.items() if v.is_floating_point()}))), "torch.float16"),
    Case("bundle: tokenizer missing", bundle_case(lambda f: (f / "tokenizer.model").unlink()), "no tokenizer found"),
    Case("bundle: tokenizer is not sentencepiece", bundle_case(lambda f: (f / "tokenizer.model").write_text("hello")), "tokenizer.model"),
    Case("export: --quantize int4", lambda root, run: run, "--quantize int4", ("--quantize", "int4", "--out", "{root}/out/m.onnx"), "export"),
    Case("export: --format tflite", lambda root, run: run, "--format tflite", ("--format", "tflite", "--out", "{root}/out/m"), "export"),
    Case("export: --out not .onnx", lambda root, run: run, "ending in .onnx", ("--out", "{root}/out/m.bin"), "export"),
    Case("export: --eval-json with onnx", lambda root, run: run, "--eval-json", ("--out", "{root}/out/m.onnx", "--eval-json", "x.json"), "export"),
    Case("export: --quantize with a bundle", lambda root, run: run, "--quantize", ("--format", "bundle", "--out", "{root}/out", "--quantize", "int8"), "export"),
    Case("export: --min-iou 2", lambda root, run: run, "--min-iou", ("--out", "{root}/out/m.onnx", "--min-iou", "2"), "export"),
    Case("export: verify prompts climb out", write_file("prompts.jsonl", b'{"file": "../victim.jpg", "text": "the cup"}\n'), "prompts.jsonl",
         ("--out", "{root}/out/m.onnx", "--verify-prompts", "{checkpoint}"), "export"),
    Case("export: bundle --out is a file", lambda root, run: run, "outfile", ("--format", "bundle", "--out", "{root}/outfile"), "export"),
    Case("export: eval JSON is not JSON", lambda root, run: run, "eval.json", ("--format", "bundle", "--out", "{root}/out", "--eval-json", "{root}/eval.json"), "export"),
    Case("export: eval JSON split name is markup", lambda root, run: run, "not a plain name", ("--format", "bundle", "--out", "{root}/out", "--eval-json", "{root}/markup.json"), "export"),
    Case("export: eval JSON of 17 MB", lambda root, run: (root / "huge.json").write_bytes(b" " * (17 << 20)) and run, "too large", ("--format", "bundle", "--out", "{root}/out", "--eval-json", "{root}/huge.json"), "export"),
    Case("export: --data has no manifest", lambda root, run: run, "manifest", ("--format", "bundle", "--out", "{root}/out", "--data", "{root}/images"), "export"),
]  # fmt: skip


def argv_of(case: Case, root: Path, checkpoint: Path) -> list[str]:
    extra = [part.format(root=root, checkpoint=checkpoint) for part in case.extra]
    if case.command == "export":
        return ["export", "-c", str(root / "run" / "best.pt"), *extra]
    return ["predict", str(root / "images"), "the red circle", "-c", str(checkpoint), "-o", str(root / "out"), *extra]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_deployment_input_is_one_line_and_touches_nothing(case: Case, trained_run: Path, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a command a file smuggles in would create ./PWNED here
    shutil.copytree(trained_run.parent, tmp_path / "run")
    (tmp_path / "images").mkdir()
    gradient(20, 16).save(tmp_path / "images" / "a.png")
    (tmp_path / "victim.bin").write_bytes(bytes(192))
    (tmp_path / "victim.jpg").write_bytes(b"")
    (tmp_path / "outfile").write_text("x")
    (tmp_path / "eval.json").write_text("{not json")
    (tmp_path / "markup.json").write_text('{"splits": {"val | <b>x</b>": {"oIoU": 0.5, "mIoU": 0.5, "P@0.5": 0.5, "P@0.7": 0.5, "P@0.9": 0.5, "n": 3}}}')
    checkpoint = case.setup(tmp_path, tmp_path / "run" / "best.pt")
    before = snapshot(tmp_path, exclude=tmp_path / "out")
    with pytest.raises(SystemExit) as exit_info:
        main(argv_of(case, tmp_path, checkpoint))
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert exit_info.value.code == 2, (captured.out, captured.err)
    assert len(lines) == 1 and lines[0].startswith("error:"), captured.err
    assert case.names in lines[0], lines[0]
    assert "Traceback" not in captured.out + captured.err
    assert not (tmp_path / SENTINEL).exists()
    assert snapshot(tmp_path, exclude=tmp_path / "out") == before
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("command", ["export", "predict"])
def test_missing_onnx_extra_is_one_line_naming_it(command, trained_run, tmp_path, capsys, monkeypatch):
    for module in ("onnx", "onnxruntime", "onnxscript"):
        monkeypatch.setitem(sys.modules, module, None)  # `import onnx` now raises ImportError
    (tmp_path / "model.onnx").write_bytes(b"x")
    gradient(10, 10).save(tmp_path / "a.png")
    argv = (["export", "-c", str(trained_run), "-o", str(tmp_path / "m.onnx")] if command == "export"
            else ["predict", str(tmp_path / "a.png"), "the cup", "-c", str(tmp_path / "model.onnx"), "-o", str(tmp_path / "out")])  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1
    assert "pip install 'shared-ris[onnx]'" in lines[0]


def test_bf16_is_refused_on_a_cpu_without_bf16(trained_run, monkeypatch):
    from shared_ris import predictor as predictor_module

    monkeypatch.setattr(predictor_module, "cpu_computes_bf16", lambda: False)
    with pytest.raises(Exception, match="no bf16 instructions") as info:
        Predictor.from_checkpoint(trained_run, precision="bf16")
    assert "\n" not in str(info.value)


# -- bundles: round trip, no unpickling, the model card ------------------------------------------------


def test_bundle_round_trip_gives_identical_predictions(trained_run, tmp_path):
    files = write_bundle(trained_run, tmp_path / "bundle")
    assert sorted(f.name for f in files) == ["README.md", "model.safetensors", "recipe.yaml", "tokenizer.model"]
    original = read_trained(trained_run).state_dict
    saved = load_file(tmp_path / "bundle" / "model.safetensors")
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)
    image = gradient(50, 30)
    ours = Predictor.from_pretrained(tmp_path / "bundle").predict([image], "the big blue square")[0]
    theirs = Predictor.from_checkpoint(trained_run).predict([image], "the big blue square")[0]
    assert np.array_equal(ours.mask, theirs.mask) and np.array_equal(ours.low_res_probs, theirs.low_res_probs)
    assert yaml.safe_load((tmp_path / "bundle" / "recipe.yaml").read_text()) == read_trained(trained_run).recipe.to_dict()


def test_loading_a_bundle_never_unpickles(trained_run, tmp_path, monkeypatch):
    write_bundle(trained_run, tmp_path / "bundle")
    (tmp_path / "bundle" / "pytorch_model.bin").write_bytes(evil_pickle())  # a stray pickle is never opened

    def refuse(*args, **kwargs):
        raise AssertionError("a bundle was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    model, recipe, tokenizer = load_run(tmp_path / "bundle")
    assert tokenizer.path == tmp_path / "bundle" / "tokenizer.model"


def test_model_card_from_an_eval_json_escapes_data(trained_run, tmp_path):
    (tmp_path / "eval.json").write_text(
        '{"protocol": {"description": "protocol: <img src=x onerror=alert(1)> | [link](http://x)"},'
        ' "splits": {"testA": {"oIoU": 0.7483, "mIoU": 0.75, "P@0.5": 0.8, "P@0.7": 0.7, "P@0.9": 0.3, "n": 5657}}}'
    )
    write_bundle(trained_run, tmp_path / "bundle", eval_json=tmp_path / "eval.json")
    card = (tmp_path / "bundle" / "README.md").read_text()
    assert "| testA | 74.83 | 75.00 | 80.00 | 70.00 | 30.00 | 5,657 |" in card
    [protocol] = [line for line in card.splitlines() if line.startswith("protocol:")]
    assert re.search(r"(?<!\\)[<>\[\]|]", protocol) is None, protocol  # every < > [ ] | escaped
    assert "\\<img" in protocol and "\\[link\\]" in protocol  # shown as text, not HTML, links or cells
    assert f"sris export --checkpoint {trained_run} --format bundle --out {tmp_path / 'bundle'} --eval-json {tmp_path / 'eval.json'}" in card
    assert "No evaluation recorded" not in card


# -- the agreement rule --------------------------------------------------------------------------------------


def test_agreement_rule():
    ok = Agreement(2e-5, [1.0, 0.99])
    check_agreement(ok, "none", 1e-4, 0.98, Path("m.onnx"))
    for agreement, quantize, message in [
        (Agreement(3e-4, [1.0]), "none", "max |Δlogit| 3.00e-04"),
        (Agreement(float("nan"), [1.0]), "none", "max |Δlogit| nan"),
        (Agreement(0.0, [0.9, 1.0]), "int8", "mean mask IoU 0.9500"),
    ]:
        with pytest.raises(ExportRejected, match="not written") as info:
            check_agreement(agreement, quantize, 1e-4, 0.98, Path("m.onnx"))
        assert message in str(info.value)
    check_agreement(Agreement(0.7, [0.99]), "int8", 1e-4, 0.98, Path("m.onnx"))  # int8 logits may move
    check_agreement(Agreement(3e-4, [1.0], logit_scale=10.0), "none", 1e-4, 0.98, Path("m.onnx"))  # relative to the logits' size


def test_compare_logits_counts_mask_agreement():
    reference = torch.full((2, 1, 4, 4), -5.0)
    reference[0, 0, :2] = 5.0  # 8 pixels on
    other = reference.clone()
    other[0, 0, 0, :2] = -5.0  # 2 of them off
    agreement = compare_logits(reference, other, threshold=0.35)
    assert agreement.ious == [6 / 8, 1.0] and agreement.max_abs_diff == 10.0
