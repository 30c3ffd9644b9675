"""The `actex` command. Each area registers its subcommands from its own module; no logic lives here."""

import typer

from actex.cli import data, extract, fleet, generate, k8s, reader, tpu

app = typer.Typer(
    name="actex",
    help="Extract decoder-LLM activations exactly once into local disk, GCS or S3, and read them back.\n\n"
    + extract.EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for area in (extract, generate, data, reader, fleet, k8s, tpu):
    area.register(app)
