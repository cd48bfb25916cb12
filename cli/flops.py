"""``sris flops``: parameters and fvcore GFLOPs per component."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from shared_ris import load_recipe
from shared_ris.fileio import check_output_file
from shared_ris.flops import count_flops

from .common import RecipeOption, SetOption, console, user_errors, write_json


@user_errors
def flops(
    recipe: str = RecipeOption,
    set_: Optional[list[str]] = SetOption,
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the figures to this JSON file."),
) -> None:
    """Count parameters and FLOPs (fvcore multiply-adds) of the encoder, FPN and decoder."""
    resolved = load_recipe(recipe, set_ or [])
    if json_path is not None:
        check_output_file(json_path, "--json")
    with console.status(f"tracing {resolved.name} at {resolved.model.image_size} px…"):
        report = count_flops(resolved)
    table = Table(title=f"Shared-RIS '{report['recipe']}': {report['image_size']} px, {report['text_len']} text tokens")
    table.add_column("component")
    table.add_column("params (M)", justify="right")
    table.add_column("GFLOPs (fvcore = G multiply-adds)", justify="right")
    for name, row in report["components"].items():
        style = "bold" if name == "total" else None
        table.add_row(name, f"{row['params'] / 1e6:.2f}", f"{row['gflops']:.2f}", style=style)
    console.print(table)
    skipped = report.pop("skipped_ops")
    if skipped:
        ops = ", ".join(f"{op} ×{n}" for op, n in sorted(skipped.items()))
        console.print(f"not counted by fvcore (element-wise, cheap): {ops}", style="dim")
    if json_path is not None:
        write_json(json_path, report)
