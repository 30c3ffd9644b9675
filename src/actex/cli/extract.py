"""`actex extract`: flags, ACTEX_* variables and --config in; a worker run; exit codes out.

The worker itself (which chunks, the slice, leases, liveness, pre-emption) is the
engine's (engine/worker.py); this module parses, builds the config, calls it and maps
what happened to the exit codes of cli/errors.py.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import typer

from actex.cli.errors import (EXIT_DONE, EXIT_INFRASTRUCTURE, UserError, error_line, infrastructure_errors,
                              user_errors)
from actex.cli.logs import setup_logging
from actex.cli.options import collect, extract_options, unknown_variables, with_defaults, with_extract_options
from actex.cli.progress import ProgressView
from actex.config import WorkerOptions, check_field_names, load_config_file, merge_fields

log = logging.getLogger("actex")


def run_extract(fields: dict, options: WorkerOptions, *, storage_options: dict | None = None) -> None:
    """The body of `actex extract` (and of `actex demo`): open the worker, run it, report;
    exits with the codes in cli/errors.py."""
    from actex.engine.worker import open_worker

    log_json = options.log_json
    # Opening: a store that refuses the output is the user's to fix (exit 2, as on one host);
    # a slice's barrier timing out is not (exit 1).
    with infrastructure_errors(log_json), user_errors(log_json):
        worker = open_worker(fields, options, storage_options=storage_options)
    show_bar = sys.stderr.isatty() and not log_json if options.progress is None else options.progress
    with ProgressView(worker.todo, show_bar=show_bar, every_s=0 if log_json else options.progress_every) as view:
        with infrastructure_errors(log_json):
            summary = worker.run(on_commit=view.committed)
    _report(worker, summary, log_json)


def _report(worker, summary, log_json: bool) -> None:
    """The worker's last line on stdout, and its exit code (typer.Exit unless 0)."""
    run = worker.prepared
    if worker.answers is not None:
        _print_answers(run.config.run_url, worker.answers)
    if summary.failed:
        error_line(f"{summary.failed} chunk(s) not committed after write failures (see log); rerun to redo them",
                   EXIT_INFRASTRUCTURE, log_json)
        raise typer.Exit(EXIT_INFRASTRUCTURE)
    if worker.stop_reason is not None:
        with infrastructure_errors():
            left = worker.chunks_left()
        if left:
            typer.echo(worker.guard.exit_line(summary.committed) + f" ({left} chunk(s) left to do; rerun to resume)")
            raise typer.Exit(worker.guard.exit_code)
        typer.echo(worker.guard.exit_line(summary.committed, EXIT_DONE) + " (this worker's share is complete)")
        return
    if worker.role.index != 0:
        from actex.engine.extract import row_share

        wrote = "wrote its rows of every chunk" if row_share(run).writes else \
            "computed its model shard of every chunk; its model group's first process wrote the rows"
        typer.echo(f"actex: process {worker.role.index} of {worker.role.count}: {wrote}; "
                   "process 0 committed them (see its line)")
        return
    snap = summary.progress
    typer.echo(
        f"actex: {run.config.run_url}: committed {summary.committed} chunk(s) "
        f"({snap['samples']:,} samples, {snap['tokens']:,} tokens, {snap['bytes'] / 1e6:.1f} MB, "
        f"{snap['tokens_per_s']:,.0f} tokens/s); "
        f"{summary.skipped} already committed"
    )


def _print_answers(run_url: str, accuracy: dict) -> None:
    """A complete generation run's predictions.json line: answers parsed, pass@2."""
    known = accuracy["test_inputs_known"]
    scored = f"pass@2 {accuracy['pass_at_2']}/{known} test inputs" if known else "no known test outputs"
    # Prompts skipped for room generated nothing: counted on their own, not as unparsed answers.
    skipped = accuracy["stop_reasons"].get("skipped", 0)
    typer.echo(f"actex: {run_url}/predictions.json: {accuracy['test_inputs']} test inputs, "
               f"{accuracy['parsed']}/{accuracy['samples'] - skipped} answers parsed, "
               + (f"{skipped} skipped (prompt too long), " if skipped else "") + scored)


def extract_body(values: dict, options: list | None = None, generating: bool = False) -> None:
    """Merge flags and ACTEX_* variables over the --config file, check, and extract.

    `actex generate` (cli/generate.py) passes its options (extract's + GenerationConfig's)
    and `generating`: the run then has a `generation` section, defaults if none was given.
    """
    options = EXTRACT_OPTIONS if options is None else options
    with user_errors():
        inputs = collect(values, options)
    worker = inputs.worker
    setup_logging(worker.log_json)
    for message in unknown_variables(os.environ, options):
        log.warning(message)
    with user_errors(worker.log_json):
        file_fields = load_config_file(inputs.config_file) if inputs.config_file else {}
        fields = merge_fields(file_fields, inputs.fields)
        if generating:
            fields["generation"] = fields.get("generation") or {}
        elif fields.get("generation") is not None:
            raise UserError("the config has generation fields: run it with `actex generate`")
        check_field_names(fields)  # every misspelt field at once, before anything else is judged
        if inputs.show_config:
            typer.echo(json.dumps({"config": with_defaults(fields, options), "worker": worker.model_dump()}, indent=2))
            return
        check_required(fields)
        if fields.get("layers") is not None and fields.get("hooks"):
            raise UserError("give either --hooks or --layers/--activation, not both")
    run_extract(fields, worker)


def check_required(fields: dict) -> None:
    """A required field given nowhere: one line naming its flag, variable and config key."""
    for option in EXTRACT_OPTIONS:
        # hooks may come from --layers; compute_dtype defaults to the checkpoint's.
        if not option.required or option.target != "config" or option.path in (("hooks",), ("compute_dtype",)):
            continue
        place = fields
        for part in option.path[:-1]:
            place = place.get(part) or {}
        if not place.get(option.path[-1]):
            key = ".".join(option.path)
            raise UserError(f"missing {option.flag} (or {option.envvar}, or `{key}:` in --config)")


EXTRACT_OPTIONS = extract_options()
extract_command = with_extract_options(extract_body, options=EXTRACT_OPTIONS, doc=(
    "Extract activations of MODEL over DATASET into OUTPUT/RUN, exactly once.\n\n"
    "Every option can also come from its ACTEX_* environment variable or the --config file "
    "(flag > variable > file > default). Rerun the same command to resume: committed chunks "
    "are skipped, unfinished ones redone.\n\n"
    "Exit codes: 0 done (this worker's share committed); 2 bad input or config (nothing written); "
    "1 infrastructure failure after retries, or no progress for --stall-timeout (restartable); "
    "75 stopped by a signal or pre-emption before finishing (Ctrl-C included; rerun to resume); "
    "130 second Ctrl-C; 134 on a pod slice, a peer process was lost (restart the whole slice)."
))


def register(app: typer.Typer) -> None:
    """Add `actex extract` to the `actex` app."""
    app.command("extract")(extract_command)
