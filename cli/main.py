"""The ``sris`` command: a thin layer that parses options, calls one library function, renders."""

import typer

import shared_ris

from .evaluate import evaluate
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


# In the order of a project: data, training, scores, use, cost.
app.add_typer(prepare_app, name="prepare")
app.command()(train)
app.command("eval")(evaluate)
app.command()(predict)
app.command()(flops)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
