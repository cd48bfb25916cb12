"""Deployment paths on a model trained for a short run: ONNX export (fp32 and int8) checked against
torch, bf16 autocast, bundles, and ``sris predict`` with each runtime.

Every comparison is between independent computations: torch's forward against ONNX Runtime's own
``InferenceSession`` on fresh inputs, masks against masks by IoU. The model comes from
``train_short_run`` (about a minute): agreement on random weights would say nothing, their masks
being noise around τ.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from fixtures_predict import short_run  # noqa: F401
from shared_ris import predictor as predictor_module
from shared_ris.checkpoint import load_run, read_trained
from shared_ris.evaluate import evaluate_run
from shared_ris.export import ExportRejected, export_onnx, mask_iou
from shared_ris.predict import read_prompts
from shared_ris.predictor import Predictor, open_image

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.slow  # one short training run and two exports for the whole module
runner = CliRunner()


@pytest.fixture(scope="module")
def examples(short_run):
    """8 held-out scenes and their prompts: (images, texts)."""
    folder = short_run.parent.parent / "examples"
    pairs = read_prompts(folder / "prompts.jsonl")
    return [open_image(folder / file) for file, _ in pairs], [text for _, text in pairs]


@pytest.fixture(scope="module")
def fp32_export(short_run, tmp_path_factory):
    return export_onnx(short_run, tmp_path_factory.mktemp("onnx") / "model.onnx")


@pytest.fixture(scope="module")
def int8_export(short_run, tmp_path_factory):
    # This 600-scene model at 64 px is weak and its masks small: int8 agreed with fp32 at mean IoU 0.956
    # over 16 generated scenes (0.984 over 64); BENCHMARKS.md has the figures of better-trained ones.
    return export_onnx(short_run, tmp_path_factory.mktemp("onnx8") / "model.int8.onnx", quantize="int8", min_iou=0.9)


@pytest.fixture(scope="module")
def torch_predictor(short_run):
    return Predictor.from_checkpoint(short_run)


def mean_iou(predictions, reference) -> float:
    return float(np.mean([mask_iou(torch.from_numpy(a.mask), torch.from_numpy(b.mask)) for a, b in zip(predictions, reference)]))


def test_the_short_run_learned_masks(short_run, torch_predictor, examples):
    """The premise of every agreement test here: masks that follow objects, neither empty nor everything."""
    val = [json.loads(line) for line in (short_run.parent / "metrics.jsonl").read_text().splitlines() if '"split"' in line][-1]
    assert val["mIoU"] > 0.1, val
    areas = [p.area / p.mask.size for p in torch_predictor.predict(*examples)]
    assert sum(0.005 < a < 0.6 for a in areas) >= 6, areas


def test_onnx_runtime_logits_equal_torch(fp32_export, short_run):
    """ONNX Runtime's own session on fresh inputs of another batch size than the export's example."""
    model, recipe, tokenizer = load_run(short_run)
    side = recipe.model.image_size
    images = torch.randn(3, 3, side, side, generator=torch.Generator().manual_seed(7))
    ids, padding = tokenizer(["the red circle", "the large blue one on the left", "a small green square"])
    session = ort.InferenceSession(str(fp32_export.path), providers=["CPUExecutionProvider"])
    [logits] = session.run(None, {"images": images.numpy(), "text_ids": ids.numpy(), "text_padding_mask": padding.numpy()})
    with torch.no_grad():
        expected = model(images, ids, padding).numpy()
    assert logits.shape == expected.shape == (3, 1, side // 4, side // 4)
    assert np.abs(logits - expected).max() <= 1e-4
    assert fp32_export.agreement.max_abs_diff <= 1e-4 and fp32_export.agreement.mean_iou >= 0.98


def test_onnx_file_alone_is_enough_to_predict(fp32_export, torch_predictor, examples, tmp_path):
    """Recipe, tokenizer, τ and image size travel in the metadata: the file alone, copied where
    nothing else is, predicts what torch predicts."""
    assert fp32_export.data_path is None  # a tiny model's weights stay inside the file
    lone = tmp_path / "elsewhere" / "renamed.onnx"
    lone.parent.mkdir()
    shutil.copy(fp32_export.path, lone)
    predictor = Predictor.from_checkpoint(lone)
    assert predictor.runtime == "onnx" and predictor.image_size == torch_predictor.image_size
    assert predictor.threshold == torch_predictor.threshold
    assert predictor.tokenizer(["the red circle"])[0].tolist() == torch_predictor.tokenizer(["the red circle"])[0].tolist()
    assert mean_iou(predictor.predict(*examples), torch_predictor.predict(*examples)) >= 0.999


def test_onnx_metadata_records_the_run(fp32_export, short_run):
    props = {p.key: p.value for p in onnx.load(str(fp32_export.path), load_external_data=False).metadata_props}
    recipe = read_trained(short_run).recipe
    assert props["shared_ris.image_size"] == str(recipe.model.image_size) == "64"
    assert props["shared_ris.quantize"] == "none" and float(props["shared_ris.threshold"]) == recipe.model.threshold
    assert yaml.safe_load(props["shared_ris.recipe"]) == recipe.to_dict()
    tokenizer_copy = short_run.parent / "tokenizer.model"  # the run's own copy, byte for byte
    assert base64.b64decode(props["shared_ris.tokenizer"]) == tokenizer_copy.read_bytes()


def test_int8_export_is_quantized_and_agrees(int8_export, fp32_export, torch_predictor, examples):
    graph = onnx.load(str(int8_export.path), load_external_data=False).graph
    integer_ops = [n.op_type for n in graph.node if n.op_type in ("DynamicQuantizeMatMul", "MatMulInteger", "MatMulIntegerToFloat")]
    weights = {t.name for t in graph.initializer}
    float_ops = [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and weights & set(n.input)]
    assert len(integer_ops) >= 10 and float_ops  # the encoder's linear layers; the FPN's and decoder's stay fp32
    assert int8_export.bytes < 0.5 * fp32_export.bytes
    predictor = Predictor.from_checkpoint(int8_export.path)
    assert mean_iou(predictor.predict(*examples), torch_predictor.predict(*examples)) >= 0.95


def test_bf16_autocast_runs_and_agrees(short_run, torch_predictor, examples, monkeypatch):
    """bf16 is refused on CPUs without bf16 arithmetic (it would be slower there); its numerics are
    the same everywhere, so the check is forced here to test the path on any CPU."""
    monkeypatch.setattr(predictor_module, "cpu_computes_bf16", lambda: True)
    predictor = Predictor.from_checkpoint(short_run, precision="bf16")
    predictions = predictor.predict(*examples)
    reference = torch_predictor.predict(*examples)
    assert any(not np.array_equal(p.low_res_probs, r.low_res_probs) for p, r in zip(predictions, reference))  # bf16 really ran
    assert mean_iou(predictions, reference) >= 0.95


def test_bundle_of_the_trained_run_predicts_and_scores_the_same(short_run, torch_predictor, examples, tmp_path):
    result = runner.invoke(app, ["export", "-c", str(short_run), "--format", "bundle", "--out", str(tmp_path / "bundle"),
                                 "--data", str(short_run.parent.parent / "data")])  # fmt: skip
    assert result.exit_code == 0, result.output
    bundle = Predictor.from_pretrained(tmp_path / "bundle")
    for ours, theirs in zip(bundle.predict(*examples), torch_predictor.predict(*examples)):
        assert np.array_equal(ours.mask, theirs.mask) and np.array_equal(ours.low_res_probs, theirs.low_res_probs)
    data = short_run.parent.parent / "data"
    assert evaluate_run(tmp_path / "bundle", data, "val")["splits"] == evaluate_run(short_run, data, "val")["splits"]
    card = (tmp_path / "bundle" / "README.md").read_text()
    val = [json.loads(line) for line in (short_run.parent / "metrics.jsonl").read_text().splitlines() if '"split"' in line][-1]
    assert f"| val | {100 * val['oIoU']:.2f} | {100 * val['mIoU']:.2f} |" in card
    assert "`synthetic`" in card and "- train: 600 objects" in card and "protocol: masks at original size" in card


def run_predict(checkpoint, examples_dir: Path, out: Path, *extra: str):
    result = runner.invoke(app, ["predict", str(examples_dir), "--prompts", str(examples_dir / "prompts.jsonl"),
                                 "-c", str(checkpoint), "-o", str(out), *extra])  # fmt: skip
    assert result.exit_code == 0, result.output
    return sorted(p.name for p in out.iterdir()), [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_predict_writes_the_same_files_with_every_runtime(short_run, fp32_export, int8_export, tmp_path, monkeypatch):
    monkeypatch.setattr(predictor_module, "cpu_computes_bf16", lambda: True)
    examples_dir = short_run.parent.parent / "examples"
    assert runner.invoke(app, ["export", "-c", str(short_run), "--format", "bundle", "-o", str(tmp_path / "model")]).exit_code == 0
    variants = {
        "torch": (short_run,), "bf16": (short_run, "--precision", "bf16"), "bundle": (tmp_path / "model",),
        "onnx": (fp32_export.path, "--runtime", "onnx"), "int8": (int8_export.path,),
    }  # fmt: skip
    runs = {name: run_predict(args[0], examples_dir, tmp_path / name, *args[1:]) for name, args in variants.items()}
    names, records = runs.pop("torch")
    assert len(records) == 8 and len(names) == 17  # mask + overlay per prompt, predictions.jsonl
    for name, (other_names, other_records) in runs.items():
        assert other_names == names, name
        assert [(r["file"], r["text"], r["mask"], r["overlay"]) for r in other_records] == [(r["file"], r["text"], r["mask"], r["overlay"]) for r in records]
        ious = [mask_iou(*(torch.from_numpy(np.asarray(Image.open(tmp_path / run / r["mask"])) > 127) for run in ("torch", name))) for r in records]
        assert np.mean(ious) >= (0.999 if name in ("onnx", "bundle") else 0.95), (name, ious)


def test_export_that_disagrees_is_refused_and_writes_nothing(short_run, fp32_export, tmp_path, monkeypatch):
    """A broken export (here: ONNX Runtime's logits shifted) is refused with one line; no .onnx,
    no weights file, no scratch folder is left."""
    import shared_ris.export as export_module
    from shared_ris.onnx_model import OnnxModel

    monkeypatch.setattr(export_module, "trace_to_onnx", lambda model, recipe, path: shutil.copy(fp32_export.path, path))
    original = OnnxModel.__call__
    monkeypatch.setattr(OnnxModel, "__call__", lambda self, *inputs: original(self, *inputs) + 0.5)
    out = tmp_path / "out" / "model.onnx"
    with pytest.raises(ExportRejected, match=r"not written: .*max \|Δlogit\| 5\.00e-01 > --tolerance 0\.0001"):
        export_onnx(short_run, out)
    assert list((tmp_path / "out").iterdir()) == []
    result = runner.invoke(app, ["export", "-c", str(short_run), "-o", str(out)])
    assert result.exit_code == 2 and result.output.strip().splitlines()[-1].startswith("error:")
    assert list((tmp_path / "out").iterdir()) == []


def test_export_cli_reports_the_verification(short_run, fp32_export, tmp_path, monkeypatch):
    import shared_ris.export as export_module

    monkeypatch.setattr(export_module, "trace_to_onnx", lambda model, recipe, path: shutil.copy(fp32_export.path, path))
    prompts = short_run.parent.parent / "examples" / "prompts.jsonl"
    result = runner.invoke(app, ["export", "-c", str(short_run), "-o", str(tmp_path / "m.onnx"), "--verify-prompts", str(prompts)])
    assert result.exit_code == 0, result.output
    assert "verified on 8 inputs: max |Δlogit|" in result.output and "wrote" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
