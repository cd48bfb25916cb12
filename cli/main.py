"""The ``sris`` command: a thin layer that parses options, calls one library function, renders."""

import sys

import typer

import shared_ris

from .common import fail
from .demo import demo
from .evaluate import evaluate
from .export import export
from .flops import flops
from .predict import predict
from .prepare import prepare_app
from .train import train

app = typer.Typer(
    name="sris",
    help="Shared-RIS: referring image segmentation with a single BEiT-3 encoder.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    invoke_without_command=True,
)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True),
) -> None:
    """Shared-RIS: referring image segmentation with a single BEiT-3 encoder."""
    if version:
        typer.echo(f"shared-ris {shared_ris.__version__}")
        raise typer.Exit()


# In the order of a project: data, training, scores, use, deployment, cost.
app.add_typer(prepare_app, name="prepare")
app.command()(train)
app.command("eval")(evaluate)
app.command()(predict)
app.command()(demo)
app.command()(export)
app.command()(flops)


def main(argv: list[str] | None = None) -> None:
    """The console entry: like ``app()``, but a usage error (unknown option, bad value) is one line
    and exit code 2, like every other error, instead of click's boxed usage text."""
    try:
        code = app(args=argv, prog_name="sris", standalone_mode=False)
    except typer.TyperException as exc:  # click's UsageError / BadParameter
        ctx = getattr(exc, "ctx", None)
        hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        fail(f"{exc.format_message()}{hint}", code=getattr(exc, "exit_code", 2), exit_with=SystemExit)
    except typer.Abort:
        fail("aborted", code=1, exit_with=SystemExit)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
