"""The ``sparsemerge`` command line: a thin layer over the Python API."""

from __future__ import annotations

import typer

from sparsemerge.cli import data
from sparsemerge.cli.export import apply, export
from sparsemerge.cli.hub import pull, push
from sparsemerge.cli.inspect import inspect
from sparsemerge.cli.merge import MergeCommand, merge, overlap
from sparsemerge.cli.train import (
    TrainCommand,
    evaluate,
    generate,
    predict,
    quickstart,
    train,
)

app = typer.Typer(
    name="sparsemerge",
    help="Train, store, inspect, merge and share sparse adapters for transformers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command()(inspect)
app.command()(push)
app.command()(pull)
app.add_typer(data.app, name="data")
app.command(cls=MergeCommand)(merge)
app.command()(overlap)
app.command(cls=TrainCommand)(train)
app.command()(evaluate)
app.command()(predict)
app.command()(generate)
app.command()(quickstart)
app.command()(export)
app.command()(apply)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
