"""`actex` subcommands of the data area."""

from typing import Optional

import typer
from pydantic import ValidationError

from actex.data.config import DataConfig
from actex.data.streams import write_streams


def streams(
    dataset: str = typer.Argument(..., help="path / fsspec URL (.jsonl, .json, .parquet, folder, glob) or HF dataset id"),
    out_dir: str = typer.Argument(..., help="where the streams and report.json go (local path or gs:// / s3://)"),
    num_streams: int = typer.Option(..., "--num-streams", "-n", min=1, help="number of JSONL streams"),
    format: str = typer.Option("arc", "--format", help="arc | text"),
    split: str = typer.Option("train", help="HF dataset split"),
    examples_column: str = typer.Option("examples", help="barc-style column of [input, output] pairs"),
    text_column: str = typer.Option("text", help="text column (format text)"),
    on_bad_row: str = typer.Option("error", help="error | skip (skipped rows are listed in report.json)"),
    limit: Optional[int] = typer.Option(None, help="read only the first N rows"),
    id_prefix: str = typer.Option("", help="prefix for task ids, to keep them unique across datasets"),
) -> None:
    """Split a dataset (ARC or text) into N JSONL streams; barc rows become ARC tasks."""
    try:
        cfg = DataConfig(
            dataset=dataset, format=format, split=split, examples_column=examples_column,
            text_column=text_column, on_bad_row=on_bad_row, limit=limit,
        )
        report = write_streams(cfg, out_dir, num_streams, id_prefix=id_prefix)
    except ValidationError as e:
        first = e.errors()[0]
        _fail(f"--{'.'.join(map(str, first['loc'])).replace('_', '-')}: {first['msg']}")
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    typer.echo(f"wrote {sum(report['rows'])} rows into {num_streams} streams under {out_dir}; skipped {len(report['skipped_rows'])} bad rows")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add this area's subcommands to the `actex` app."""
    app.command("streams")(streams)
