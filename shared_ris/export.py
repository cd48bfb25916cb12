"""``sris export --format onnx``: a trained run → one self-sufficient ``.onnx`` file, verified.

The whole :class:`~.model.SharedRIS` (images, text ids, padding mask → logits, dynamic batch axis)
goes through ``torch.onnx.export(dynamo=True)``; ``--quantize int8`` then runs ONNX Runtime's
dynamic quantization on it (int8 MatMul / Gemm weights, activations quantized on the fly). The
recipe, tokenizer, τ and image size go into the file's metadata (:mod:`.onnx_model`).

Nothing is trusted blindly: before the file gets its final name, the exact bytes to be shipped
are loaded back in ONNX Runtime and run beside torch on a few inputs; an export whose logits
(fp32) or masks (any) disagree beyond the tolerances is refused and nothing is written. All files
are written in a temporary folder beside ``--out`` and renamed into place at the end, so an
interrupted export never leaves a half file under the final name.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image

from .checkpoint import load_run
from .config import Recipe
from .errors import SharedRISError, first_line
from .fileio import check_output_file, confined
from .model import SharedRIS, upsample_probabilities
from .onnx_model import EXTERNAL_DATA_BYTES, INPUT_NAMES, OUTPUT_NAME, OnnxMetadata, OnnxModel, graph_tensors, require
from .predictor import open_image
from .tokenizer import Tokenizer

QUANTIZE_CHOICES = ("int8",)
DEFAULT_TOLERANCE = 1e-4  # max |Δlogit| between torch and ONNX Runtime for an fp32 export, × max(1, largest |logit|)
DEFAULT_MIN_IOU = 0.98  # mean mask IoU between the two, for any export
DEFAULT_VERIFY_SAMPLES = 16  # a mean mask IoU over 4 tiny scenes moved by 0.03 with one scene
VERIFY_BATCH = 8


class ExportRejected(SharedRISError):
    """The exported model disagrees with torch beyond the tolerances; nothing was written."""


@dataclass
class Agreement:
    """How an exported model's outputs compare with torch's on the same inputs."""

    max_abs_diff: float  # over every logit of every input
    ious: list[float] = field(default_factory=list)  # per input: masks σ > τ at the input size
    logit_scale: float = 1.0  # the largest |logit| of torch's, at least 1: what --tolerance is relative to

    @property
    def mean_iou(self) -> float:
        return sum(self.ious) / len(self.ious) if self.ious else float("nan")

    @property
    def min_iou(self) -> float:
        return min(self.ious) if self.ious else float("nan")

    def describe(self) -> str:
        return (f"{len(self.ious)} inputs: max |Δlogit| {self.max_abs_diff:.2e} (largest |logit| {self.logit_scale:.3g}), "
                f"mask IoU mean {self.mean_iou:.4f}, min {self.min_iou:.4f}")  # fmt: skip


@dataclass
class ExportReport:
    path: Path
    data_path: Path | None  # NAME.onnx.data when the weights are external
    quantize: str
    agreement: Agreement
    seconds: float

    @property
    def bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.path, self.data_path) if p is not None)


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """IoU of two boolean masks; two empty masks agree (1.0)."""
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 1.0


def compare_logits(reference: torch.Tensor, other: torch.Tensor, threshold: float, size: int | None = None) -> Agreement:
    """(B, 1, h, w) logits of torch and of an export → their :class:`Agreement`, the masks
    compared at ``size``² (the input size: logits resized bilinearly, as predict does), or h × w."""
    diff = (reference.float() - other.float()).abs().max().item() if reference.numel() else 0.0
    scale = max(1.0, reference.float().abs().max().item()) if reference.numel() else 1.0
    side = tuple(reference.shape[-2:]) if size is None else (size, size)
    masks = [[upsample_probabilities(logits, side) > threshold for logits in batch] for batch in (reference, other)]
    return Agreement(diff, [mask_iou(a, b) for a, b in zip(*masks)], scale)


def check_agreement(agreement: Agreement, quantize: str, tolerance: float, min_iou: float, out: Path) -> None:
    """Refuse (:class:`ExportRejected`) an export that disagrees with torch: logits beyond
    ``tolerance`` × the largest |logit| (at least 1; fp32 only: int8 changes logits by design) or
    masks below ``min_iou`` (any). Relative, because fp32 rounding grows with the logits: a base
    model trained for 30 steps differed by 1.1e-4 at logits up to 35, random weights by 6e-6."""
    problems = []
    if quantize == "none" and not agreement.max_abs_diff <= tolerance * agreement.logit_scale:  # NaN fails too
        problems.append(f"max |Δlogit| {agreement.max_abs_diff:.2e} > --tolerance {tolerance:g} × {agreement.logit_scale:.3g} (the largest |logit|)")
    if not agreement.mean_iou >= min_iou:
        problems.append(f"mean mask IoU {agreement.mean_iou:.4f} < --min-iou {min_iou:g}")
    if problems:
        hint = ("keep the fp32 export, or lower --min-iou if that agreement is enough for you" if quantize != "none"
                else "this torch / onnxscript pair exports the model wrongly; please report it with both versions")  # fmt: skip
        raise ExportRejected(f"{out}: not written: ONNX Runtime disagrees with torch on {len(agreement.ious)} inputs ({'; '.join(problems)}); {hint}")


# -- inputs to verify on ------------------------------------------------------------------------------


def verification_samples(recipe: Recipe, prompts: str | Path | None = None, count: int = DEFAULT_VERIFY_SAMPLES) -> tuple[list[Image.Image], list[str]]:
    """(images, texts) to compare the runtimes on: every entry of a prompts file (JSON lines or
    CSV, files relative to its folder and inside it, as ``sris predict --prompts``), else ``count``
    generated scenes of coloured shapes with a referring expression each (structured images with
    confident and unsure regions, unlike noise)."""
    if prompts is None:
        return _generated_samples(recipe.model.image_size, count)
    from .predict import read_prompt_entries  # predict → predictor: only needed here

    entries = read_prompt_entries(prompts)
    folder = Path(prompts).parent
    images = [open_image(confined(folder, entry.file, entry.where)) for entry in entries]
    return images, [entry.text for entry in entries]


def _generated_samples(size: int, count: int) -> tuple[list[Image.Image], list[str]]:
    from .data.synthetic import EXAMPLES, make_synthetic_sample

    images, texts = [], []
    for index in range(count):  # seed 1: not the scenes `sris prepare synthetic --examples` writes
        item = {"split": EXAMPLES, "index": index, "ref_id": index, "image_id": index, "seed": 1, "size": max(size, 64)}
        sample, _ = make_synthetic_sample(item)
        images.append(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
        texts.append(json.loads(sample["json"])["sentences"][0]["sent"])
    return images, texts


def encode_samples(images: Sequence[Image.Image], texts: Sequence[str], recipe: Recipe, tokenizer: Tokenizer) -> tuple[torch.Tensor, ...]:
    from .data.transforms import image_to_tensor

    pixels = torch.stack([image_to_tensor(image, recipe.model.image_size, recipe.data.resize) for image in images])
    ids, padding = tokenizer(list(texts))
    return pixels, ids, padding


@torch.no_grad()
def run_batched(model: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], batch: int = VERIFY_BATCH) -> torch.Tensor:
    """``model(*inputs)`` in chunks of ``batch`` rows, concatenated (float32, CPU)."""
    chunks = [model(*(x[start : start + batch] for x in inputs)).float().cpu() for start in range(0, len(inputs[0]), batch)]
    return torch.cat(chunks)


def verify(model: SharedRIS, exported: OnnxModel, inputs: tuple[torch.Tensor, ...]) -> Agreement:
    """Run torch and ONNX Runtime on ``inputs``; the first input also alone (another batch size
    than the export's example, so the dynamic batch axis is exercised)."""
    reference = run_batched(model, inputs)
    agreement = compare_logits(reference, run_batched(exported, inputs), exported.threshold, exported.image_size)
    alone = exported(*(x[:1] for x in inputs)).float()
    agreement.max_abs_diff = max(agreement.max_abs_diff, (alone - reference[:1]).abs().max().item())
    return agreement


# -- export -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter and quantizer narrate (torchvision missing, pre-processing advice) through
    warnings and logging; a user of ``sris export`` needs the result, not that."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript", "")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


OPSET = 18  # every runtime of the last years reads it; nothing the model needs came later


def attention_translation() -> dict:
    """``aten.scaled_dot_product_attention`` as plain ONNX (opset 18): softmax(q kᵀ·s + bias) v.

    torch.onnx's own translation of a boolean mask ends with ``Where(IsNaN(w), 0, w)`` over the
    whole (B, heads, N, N) weights, for rows whose every key is masked. No row of ours is (only
    text padding is masked, never the image tokens), and that guard cost ≈ 10 % of base's time in
    ONNX Runtime. Masked keys get a bias of −1e9: exp underflows to exactly 0, as torch's mask."""
    op = require("onnxscript").opset18

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        head_dim = query.shape[-1]
        if is_causal or dropout_p or enable_gqa or not isinstance(head_dim, int):
            raise SharedRISError("attention with a causal mask, dropout, grouped heads or a dynamic head size is not exported")
        factor = op.CastLike(scale if scale is not None else head_dim**-0.5, query)
        scores = op.Mul(op.MatMul(query, op.Transpose(key, perm=[0, 1, 3, 2])), factor)
        if attn_mask is not None:  # (B, 1, 1, N) bool, True = may attend
            scores = op.Add(scores, op.Where(attn_mask, op.CastLike(0.0, query), op.CastLike(-1e9, query)))
        return op.MatMul(op.Softmax(scores, axis=-1), value)

    return {torch.ops.aten.scaled_dot_product_attention.default: sdpa}


def trace_to_onnx(model: SharedRIS, recipe: Recipe, path: Path) -> None:
    """``torch.onnx.export(dynamo=True)`` of ``model`` to ``path`` (+ ``path.data``), batch axis dynamic."""
    table = attention_translation()  # needs onnxscript, what torch.onnx's dynamo exporter translates with
    side, length = recipe.model.image_size, recipe.model.max_text_len
    example = (torch.zeros(2, 3, side, side), torch.full((2, length), 1, dtype=torch.long), torch.zeros(2, length, dtype=torch.bool))
    example[1][:, :3] = torch.tensor([0, 5, 2])  # <s> piece </s>, then padding: a real sentence's pattern
    example[2][:, 3:] = True
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        with _quiet():
            program = torch.onnx.export(
                model, example, dynamo=True, input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME], opset_version=OPSET,
                dynamic_shapes={name: {0: batch} for name in INPUT_NAMES}, custom_translation_table=table, optimize=True, verbose=False,
            )  # fmt: skip
            program.save(str(path), external_data=True)
    except SharedRISError:
        raise
    except Exception as exc:  # an operator the exporter does not know, a torch / onnxscript mismatch
        raise SharedRISError(f"torch.onnx could not export the model ({first_line(exc)}); torch {torch.__version__}") from None


def quantize_int8(source: Path, target: Path) -> None:
    """ONNX Runtime dynamic quantization: int8 weights for the encoder's MatMul / Gemm, per output
    channel; activations are quantized per call (no calibration data).

    The FPN and decoder stay fp32: they are a small part of the time (≈ 10 % of base's FLOPs) but
    their errors land straight on the mask's edge: on a short-run tiny model, quantizing them too
    gave masks at mean IoU 0.957 (min 0.85) with fp32's, the encoder alone 0.992 (min 0.96), at
    the same speed. Weights are signed with 7 significant bits (``reduce_range``): on x86 CPUs
    without VNNI, ONNX Runtime's u8×s8 kernel adds pairs of products in 16 bits and saturates with
    full 8-bit weights, and an exported file may run on any CPU. Convolutions stay fp32:
    quantized, they were no faster."""
    quantization = require("onnxruntime.quantization")
    with _quiet():
        quantization.quantize_dynamic(
            source, target, weight_type=quantization.QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
            per_channel=True, reduce_range=True, use_external_data_format=True, nodes_to_exclude=outside_encoder(source),
        )  # fmt: skip


def outside_encoder(path: Path) -> list[str]:
    """Names of the MatMul / Gemm nodes that torch.onnx's name scopes place outside ``beit3``."""
    onnx = require("onnx")
    names = []
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        scopes = next((prop.value for prop in node.metadata_props if prop.key == "pkg.torch.onnx.name_scopes"), "")
        if node.op_type in ("MatMul", "Gemm") and "'beit3'" not in scopes:
            names.append(node.name)
    return names


def _weights_bytes(proto) -> int:
    return sum(len(t.raw_data) + 4 * len(t.float_data) + 8 * len(t.int64_data) + 4 * len(t.int32_data) for t in graph_tensors(proto.graph))


def write_final(source: Path, target: Path, metadata: OnnxMetadata) -> Path | None:
    """``source`` (and its weights) → ``target`` with the metadata; weights over
    :data:`EXTERNAL_DATA_BYTES` go to ``TARGET.data`` (returned), else into the file itself."""
    onnx = require("onnx")
    proto = onnx.load(str(source))  # weights included
    del proto.metadata_props[:]
    for key, value in metadata.to_props().items():
        proto.metadata_props.add(key=key, value=value)
    external = _weights_bytes(proto) > EXTERNAL_DATA_BYTES
    data = target.with_name(target.name + ".data")
    onnx.save_model(proto, str(target), save_as_external_data=external, all_tensors_to_one_file=True, location=data.name, size_threshold=1024)
    for written in (target, data) if external else (target,):
        with open(written, "rb+") as handle:
            os.fsync(handle.fileno())  # on disk before the rename makes it visible
    return data if external else None


def export_onnx(
    checkpoint: str | Path,
    out: str | Path,
    *,
    tokenizer: str | Path | None = None,
    quantize: str | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    min_iou: float = DEFAULT_MIN_IOU,
    verify_prompts: str | Path | None = None,
    verify_samples: int = DEFAULT_VERIFY_SAMPLES,
    progress: Callable[[str], None] | None = None,
) -> ExportReport:
    """Export a trained run (``best.pt``, ``last.pt`` or a bundle folder) to ``out`` (``.onnx``).

    Verifies the written model against torch on ``verify_prompts``' images (or ``verify_samples``
    generated scenes) and refuses it (:class:`ExportRejected`, nothing written) when the fp32
    logits differ by more than ``tolerance`` or the mean mask IoU is below ``min_iou``.
    ``progress(message)`` hears each stage. Returns what was written and how well it agreed.
    """
    started, out = time.perf_counter(), Path(out)
    say = progress or (lambda message: None)
    quantize = _check_export_options(out, quantize, tolerance, min_iou, verify_samples)
    for module in ("onnx", "onnxruntime", "onnxscript"):
        require(module)  # before the model loads: a missing extra is the first thing said
    model, recipe, text_tokenizer = load_run(checkpoint, tokenizer)
    if model.no_target_head is not None:
        raise SharedRISError(
            f"{checkpoint}: its model has a no-target head (generalized RIS), which the ONNX export does not carry yet; "
            "use --format bundle, or a model trained without the head (its recipe's area rule, model.no_target_min_area, does export)"
        )
    samples = encode_samples(*verification_samples(recipe, verify_prompts, verify_samples), recipe, text_tokenizer)
    metadata = OnnxMetadata(recipe, Path(text_tokenizer.path).read_bytes(), model.threshold, quantize, source=Path(checkpoint).name)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent) as scratch:
        scratch = Path(scratch)
        say("exporting the model with torch.onnx (dynamo)")
        trace_to_onnx(model, recipe, scratch / "traced.onnx")
        source = scratch / "traced.onnx"
        if quantize == "int8":
            say("quantizing the weights to int8 (ONNX Runtime dynamic quantization)")
            quantize_int8(source, scratch / "int8.onnx")
            source = scratch / "int8.onnx"
        (scratch / "final").mkdir()
        data = write_final(source, scratch / "final" / out.name, metadata)
        say(f"verifying against torch on {len(samples[0])} inputs")
        agreement = verify(model, OnnxModel.load(scratch / "final" / out.name), samples)
        check_agreement(agreement, quantize, tolerance, min_iou, out)
        data_path = _install(scratch / "final", out, data is not None)
    return ExportReport(out, data_path, quantize, agreement, time.perf_counter() - started)


def _check_export_options(out: Path, quantize: str | None, tolerance: float, min_iou: float, samples: int) -> str:
    if out.suffix.lower() != ".onnx":
        raise SharedRISError(f"--out {out}: an ONNX export needs a file name ending in .onnx")
    check_output_file(out, "--out")
    if quantize not in (None, "none", *QUANTIZE_CHOICES):
        raise SharedRISError(f"--quantize {quantize}: choose one of {', '.join(QUANTIZE_CHOICES)} (or leave it out for fp32)")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise SharedRISError(f"--tolerance must be a finite number >= 0, got {tolerance}")
    if not (math.isfinite(min_iou) and 0.0 <= min_iou <= 1.0):
        raise SharedRISError(f"--min-iou must be in [0, 1], got {min_iou}")
    if samples < 1:
        raise SharedRISError(f"at least one verification input is needed, got {samples}")
    return quantize or "none"


def _install(folder: Path, out: Path, external: bool) -> Path | None:
    """Rename the verified files into place: the weights first, then the ``.onnx`` that names
    them; a stale ``NAME.onnx.data`` of an earlier, external export is removed."""
    data = out.with_name(out.name + ".data")
    if external:
        os.replace(folder / data.name, data)
    os.replace(folder / out.name, out)
    if not external and data.is_file():
        data.unlink()
    shutil.rmtree(folder, ignore_errors=True)
    return data if external else None
