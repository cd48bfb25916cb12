"""``sris demo``: a local web page to segment images by text (Gradio, the ``[demo]`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from shared_ris.demo import DEFAULT_HOST, DEFAULT_MAX_PIXELS, DEFAULT_MAX_UPLOAD_MB, DEFAULT_PORT, serve

from .common import console, user_errors


@user_errors
def demo(
    checkpoint: Path = typer.Option(
        ..., "--checkpoint", "-c", help="A trained run's best.pt or last.pt, a bundle folder, or an .onnx file (sris export).",
    ),
    host: str = typer.Option(DEFAULT_HOST, "--host", help="Address to listen on; 0.0.0.0 opens the page to your network."),
    port: int = typer.Option(DEFAULT_PORT, "--port", help="Port to listen on."),
    share: bool = typer.Option(
        False, "--share", help="Also open a public *.gradio.live link through Gradio's tunnel (anyone with the link can use the model).",
    ),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", help="Refuse an upload whose header declares more pixels than this."),
    max_upload_mb: float = typer.Option(DEFAULT_MAX_UPLOAD_MB, "--max-upload-mb", help="Refuse an upload larger than this many MB."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Sentencepiece model (default: the one recorded in or beside the checkpoint)."),
) -> None:
    """Serve a web page to segment images by text: upload or webcam, one expression per line, the
    overlay, masks, scores and attention maps. Ctrl-C stops it; nothing it wrote is left behind."""
    serve(
        checkpoint, host=host, port=port, share=share, max_pixels=max_pixels, max_upload_mb=max_upload_mb, device=device,
        tokenizer=tokenizer, on_ready=lambda url: console.print(f"serving {escape(url)} (Ctrl-C stops)", highlight=False),
    )  # fmt: skip
