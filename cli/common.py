"""Shared bits of the thin CLI: recipe options and one-line error reporting."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable

import typer
from rich.console import Console

from shared_ris.errors import SharedRISError
from shared_ris.fileio import write_text_atomic

console = Console()
err_console = Console(stderr=True)

RecipeOption = typer.Option("base", "--recipe", "-r", help="Recipe name (base, large, tiny) or a YAML path.")
SetOption = typer.Option(None, "--set", help="Override a recipe key, e.g. --set model.fpn.stages=[6,12]. Repeatable.")


def fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def user_errors(fn: Callable) -> Callable:
    """Turn errors a user can fix into one red line and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SharedRISError as exc:
            fail(str(exc))
        except FileNotFoundError as exc:
            fail(f"{exc.filename or exc}: file not found")
        except KeyboardInterrupt:
            fail("interrupted", code=130)

    return wrapper


def write_json(path: Path, document: dict) -> None:
    """Write a report (creating its folder) and say where it went."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(document, indent=2) + "\n")
    console.print(f"wrote {path}")
