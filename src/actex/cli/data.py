"""`actex` subcommands of the data area. Errors as everywhere: one line, exit 2 (cli/errors.py)."""

from typing import Optional

import typer
from pydantic import ValidationError

from actex.cli.errors import UserError, user_errors
from actex.data.config import DataConfig
from actex.data.streams import write_streams
from actex.store.records import reason


def streams(
    dataset: str = typer.Argument(..., help="path / fsspec URL (.jsonl, .json, .parquet, folder, glob) or HF dataset id"),
    out_dir: str = typer.Argument(..., help="where the streams and report.json go (local path or gs:// / s3://)"),
    num_streams: int = typer.Option(..., "--num-streams", "-n", min=1, help="number of JSONL streams"),
    format: str = typer.Option("arc", "--format", help="arc | text"),
    split: str = typer.Option("train", help="HF dataset split"),
    examples_column: str = typer.Option("examples", help="barc-style column of \\[input, output] pairs"),
    text_column: str = typer.Option("text", help="text column (format text)"),
    on_bad_row: str = typer.Option("error", help="error | skip (skipped rows are listed in report.json)"),
    limit: Optional[int] = typer.Option(None, help="read only the first N rows"),
    id_prefix: str = typer.Option("", help="prefix for task ids, to keep them unique across datasets"),
) -> None:
    """Split a dataset (ARC or text) into N JSONL streams; barc rows become ARC tasks."""
    with user_errors():
        try:
            cfg = DataConfig(
                dataset=dataset, format=format, split=split, examples_column=examples_column,
                text_column=text_column, on_bad_row=on_bad_row, limit=limit,
            )
        except ValidationError as e:
            first = e.errors()[0]
            raise UserError(f"--{'.'.join(map(str, first['loc'])).replace('_', '-')}: {reason(first)}") from None
        report = write_streams(cfg, out_dir, num_streams, id_prefix=id_prefix)
    typer.echo(f"actex: wrote {sum(report['rows'])} rows into {num_streams} streams under {out_dir}; "
               f"skipped {len(report['skipped_rows'])} bad rows")


def register(app: typer.Typer) -> None:
    """Add this area's subcommands to the `actex` app."""
    app.command("streams")(streams)
