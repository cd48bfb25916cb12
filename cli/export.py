"""``sris export``: a trained run as a verified ONNX model, or as a shareable bundle folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from shared_ris.errors import SharedRISError
from shared_ris.export import DEFAULT_MIN_IOU, DEFAULT_TOLERANCE, DEFAULT_VERIFY_SAMPLES

from .common import console, user_errors

FORMATS = ("onnx", "bundle")


@user_errors
def export(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="A trained run's best.pt or last.pt (or a bundle folder)."),
    format: str = typer.Option("onnx", "--format", "-f", help="onnx: one verified .onnx file; bundle: a folder (safetensors + recipe + tokenizer + model card)."),
    out: Path = typer.Option(..., "--out", "-o", help="onnx: the .onnx file (weights over 100 MB go to OUT.data beside it); bundle: the folder."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="onnx: int8 (ONNX Runtime dynamic quantization of the MatMul / Gemm weights)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Sentencepiece model (default: the one recorded in or beside the checkpoint)."),
    tolerance: float = typer.Option(DEFAULT_TOLERANCE, "--tolerance", help="onnx, fp32: refuse the export if a logit differs from torch's by more than this × the largest |logit| (at least 1)."),
    min_iou: float = typer.Option(DEFAULT_MIN_IOU, "--min-iou", help="onnx: refuse the export if its masks agree with torch's at a lower mean IoU."),
    verify_prompts: Optional[Path] = typer.Option(
        None, "--verify-prompts", help="onnx: verify on these images and texts (a prompts file as sris predict reads; files relative to its folder) "
        f"instead of {DEFAULT_VERIFY_SAMPLES} generated scenes.",
    ),
    eval_json: Optional[Path] = typer.Option(None, "--eval-json", help="bundle: the model card's figures (sris eval --json); default: the run's last validation."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="bundle: the prepared data folder it was trained on, named in the model card."),
) -> None:
    """Export a trained run: --format onnx (verified against torch before it is written) or --format bundle."""
    _check_format_options(format, quantize, verify_prompts, eval_json, data)
    if format == "bundle":
        from shared_ris.bundle import write_bundle

        files = write_bundle(checkpoint, out, tokenizer=tokenizer, eval_json=eval_json, data_dir=data)
        console.print(f"wrote {escape(str(out))}: {', '.join(f.name for f in files)}")
        return
    from shared_ris.export import export_onnx

    report = export_onnx(
        checkpoint, out, tokenizer=tokenizer, quantize=quantize, tolerance=tolerance, min_iou=min_iou, verify_prompts=verify_prompts,
        progress=lambda message: console.print(f"{message}…", style="dim"),
    )  # fmt: skip
    console.print(f"verified on {report.agreement.describe()} (tolerances: {tolerance:g} fp32, IoU ≥ {min_iou:g})")
    data_note = f" + {escape(report.data_path.name)}" if report.data_path is not None else ""
    console.print(f"wrote {escape(str(report.path))}{data_note} ({report.quantize}, {report.bytes / 2**20:.1f} MB) in {report.seconds:.0f} s")


def _check_format_options(format: str, quantize, verify_prompts, eval_json, data) -> None:
    if format not in FORMATS:
        raise SharedRISError(f"--format {format}: choose one of {', '.join(FORMATS)}")
    only = {"onnx": {"--quantize": quantize, "--verify-prompts": verify_prompts}, "bundle": {"--eval-json": eval_json, "--data": data}}
    for fmt, options in only.items():
        for option, value in options.items():
            if value is not None and format != fmt:
                raise SharedRISError(f"{option} applies to --format {fmt} only")
