"""Shared bits of the thin CLI: recipe options and one-line error reporting."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from shared_ris.errors import SharedRISError
from shared_ris.fileio import write_text_atomic

console = Console()
err_console = Console(stderr=True)

DataOption = typer.Option(
    ..., "--data", "-d",
    help="A folder written by sris prepare, or an http(s):// prefix or template ({} = file name) where its files are.",
)
AllowPipeOption = typer.Option(
    False, "--allow-pipe",
    help="Accept a 'pipe:COMMAND {}' --data location: the shell runs COMMAND with {} replaced by each file name.",
)
RecipeOption = typer.Option("base", "--recipe", "-r", help="Recipe name (base, large, tiny) or a YAML path.")
SetOption = typer.Option(None, "--set", help="Override a recipe key, e.g. --set model.fpn.stages=[6,12]. Repeatable.")


def fail(message: str, code: int = 2, exit_with: type = typer.Exit) -> NoReturn:
    """Print ``error: MESSAGE`` as one line on stderr and exit with ``code``."""
    # messages quote data (file names, prompts): escaped, so "[/x]" in one is text, not console markup
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise exit_with(code)


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
        except OSError as exc:  # a folder where a file was expected, no permission, disk full, ...
            fail(f"{exc.filename or 'output'}: {exc.strerror or exc}")
        except KeyboardInterrupt:
            fail("interrupted", code=130)

    return wrapper


def write_json(path: Path, document: dict) -> None:
    """Write a report (creating its folder) and say where it went. A NaN (a figure with nothing to
    count, e.g. N-acc of a split without no-target expressions) is written as null: strict JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(_nan_to_null(document), indent=2, allow_nan=False) + "\n")
    console.print(f"wrote {path}")


def _nan_to_null(value):
    if isinstance(value, dict):
        return {k: _nan_to_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_null(v) for v in value]
    return None if isinstance(value, float) and value != value else value
