"""``sris predict``: masks, overlays and (optionally) attention maps for your own images."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from shared_ris.predict import DEFAULT_BATCH_PIXELS, predict_folder
from shared_ris.predictor import DEFAULT_MAX_PIXELS

from .common import console, err_console, user_errors


@user_errors
def predict(
    path: Path = typer.Argument(..., help="An image, or a folder of images."),
    text: Optional[str] = typer.Argument(None, help="What to segment, e.g. 'the red cup' (optional with --prompts)."),
    checkpoint: Path = typer.Option(
        ..., "--checkpoint", "-c", help="A trained run's best.pt or last.pt, a bundle folder, or an .onnx file (sris export).",
    ),
    out: Path = typer.Option(Path("predictions"), "--out", "-o", help="Output folder (created; files of a re-run are overwritten)."),
    prompts: Optional[Path] = typer.Option(
        None, "--prompts", help="Per-image texts: JSON lines {\"file\": ..., \"text\": ...} or a CSV with a file,text header; "
        "file names are relative to PATH's folder and must lie inside it. Images it does not name get TEXT, if given.",
    ),
    batch_size: int = typer.Option(8, "--batch-size", "-b", help="(image, text) pairs per forward pass."),
    max_pixels: int = typer.Option(
        DEFAULT_MAX_PIXELS, "--max-pixels", help="Skip (and report) an image whose header declares more pixels than this "
        "(default 8192×8192; Pillow refuses more than about 179 MP whatever this says).",
    ),
    batch_pixels: int = typer.Option(
        DEFAULT_BATCH_PIXELS, "--batch-pixels", help="Run a batch early once its (image, text) pairs hold this many decoded pixels.",
    ),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    attention: bool = typer.Option(False, "--attention", help="Also write the text-cls attention of the encoder, FPN and decoder (Fig. 7)."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Also look in sub-folders (kept as sub-folders of --out)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Sentencepiece model (default: the one recorded in or beside the checkpoint)."),
    runtime: Optional[str] = typer.Option(
        None, "--runtime", help="torch (a run's checkpoint or a bundle) or onnx (an .onnx file from sris export, ONNX Runtime on the CPU; "
        "no --attention). Default: what --checkpoint is.",
    ),
    precision: str = typer.Option(
        "fp32", "--precision", help="torch runtime: fp32, or bf16 (autocast; on GPUs and on CPUs with bf16 instructions).",
    ),
) -> None:
    """Segment what TEXT refers to in each image: NAME.mask.png, NAME.overlay.jpg and predictions.jsonl.

    Files without an image suffix are ignored; an image that cannot be read, or is over
    --max-pixels, is reported and skipped, and the command then exits with status 1. Nothing is
    written outside --out.
    """
    with Progress(
        TextColumn("predicting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True
    ) as bar:
        task = bar.add_task("predict", total=None)
        summary = predict_folder(
            path, text, checkpoint, out_dir=out, prompts=prompts, batch_size=batch_size, device=device,
            attention=attention, recursive=recursive, tokenizer=tokenizer, max_pixels=max_pixels, batch_pixels=batch_pixels,
            runtime=runtime, precision=precision,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
            warn=lambda message: err_console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False),
        )  # fmt: skip
    # names and texts are data: escaped, so that "[/x]" in one is printed, not taken for console markup
    console.print(f"{summary.predictions} prediction(s) written to {escape(str(summary.out_dir))} (index: {escape(str(summary.jsonl))})")
    if summary.no_target:
        console.print(f"{summary.no_target} of them decided 'no target' (empty mask; no_target: true in the index)")
    if summary.ignored:
        console.print(f"ignored {len(summary.ignored)} file(s) without an image suffix", style="dim")
    if summary.skipped:
        for file, reason in summary.skipped:
            err_console.print(f"[red]skipped[/] {escape(file)}: {escape(reason)}", highlight=False, soft_wrap=True)
        err_console.print(f"[bold red]{len(summary.skipped)} file(s) skipped[/]")
        raise typer.Exit(1)
