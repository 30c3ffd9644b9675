"""`actex` subcommands of the data area."""

import typer


def register(app: typer.Typer) -> None:
    """Add this area's subcommands to the `actex` app."""
