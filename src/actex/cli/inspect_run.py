"""`actex inspect`: what a run holds, from its run.json, commit records and statistics."""

from __future__ import annotations

import json

import typer

from actex.cli.errors import run_store, user_errors
from actex.data.tokenize import long_samples

def inspect_command(
    url: str = typer.Argument(..., help="A run's URL (OUTPUT/RUN_NAME), local or gs:// / s3:// / memory://."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    stats_chunks: int = typer.Option(64, "--stats-chunks", min=0, help="Merge the hooks' statistics over this many committed chunks, spread evenly over the run (0: all; each chunk's stats object is read)."),
) -> None:
    """Hooks, widths, dtype, chunks committed/total, samples, tokens, bytes and config of a run."""
    from actex.store.commits import useful_token_fraction
    from actex.engine.generate import answers_summary, generation_totals
    from actex.store.manifest import read_manifest
    from actex.reader.run import Run

    with user_errors():
        run = Run(run_store(url))
        summary = run.summary(stats_chunks or None)
        # Real tokens / computed slots over the committed chunks: what packing wasted.
        summary["useful_token_fraction"] = useful_token_fraction(run.commits.values())
        summary["answers"] = answers_summary(run)
        manifest = read_manifest(run.store)
        summary["skipped_rows"] = manifest.skipped_rows
        summary["skipped_row_list"] = list(manifest.skipped_row_list)
        metas = committed_sample_metas(run)
        summary["long_samples"] = long_samples(metas)
        summary["generation"] = generation_totals(metas) if run.manifest.kind == "generate" else None
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Column, Table

    console = Console()
    console.print(f"[bold]{summary['url']}[/bold]")
    console.print(
        f"{summary['kind']} run, chunks {summary['chunks_committed']}/{summary['chunks_total']} committed, "
        f"{summary['samples']:,} samples, {summary['tokens']:,} tokens, {summary['bytes'] / 1e6:,.1f} MB, dtype {summary['dtype']}"
    )
    if summary["useful_token_fraction"] is not None:
        console.print(f"useful tokens {summary['useful_token_fraction']:.1%} of the slots computed (the rest: padding)")
    _print_skipped(console, summary)
    if summary["stats_chunks"] < summary["chunks_committed"]:
        console.print(f"statistics below: over {summary['stats_chunks']} of the {summary['chunks_committed']} committed chunks, "
                      "spread evenly (--stats-chunks 0 for all)")
    for hook, count in summary["overflow"].items():
        console.print(f"overflow: {hook}: {count:,} value(s) not finite as stored {summary['dtype']} "
                      "(`actex verify` fails; store float32 or int8)", markup=False)
    # int8 runs: the stats' worst and mean per-token error of the stored values vs float32.
    fields = ("mean_abs_mean", "mean_variance", "mean_l2_norm") + (
        ("quant_error_max", "quant_error_mean") if summary["dtype"] == "int8" else ())
    # Nothing is cut at 80 columns: hook names stay whole (blocks.23.ln1.hook_normalized) and
    # a figure that does not fit folds onto a second line (rich's default clips both with "…").
    longest = max(map(len, summary["hooks"]), default=4)
    figures = ("width", "mean |mean|", "mean var", "mean L2 norm", *(
        ("int8 error max", "int8 error mean") if summary["dtype"] == "int8" else ()))
    table = Table(Column("hook", no_wrap=True, min_width=longest), *(Column(f, overflow="fold") for f in figures))
    for hook, entry in summary["hooks"].items():
        stats = entry.get("stats")
        cells = [f"{stats[k]:.4g}" for k in fields] if stats else ["-"] * len(fields)
        table.add_row(hook, str(entry["width"]), *cells)
    console.print(table)
    if summary.get("generation"):
        totals = summary["generation"]
        console.print(f"generated {totals['generated_tokens']:,} tokens over {totals['samples']:,} samples "
                      f"(mean {totals['mean_tokens']:.1f}); answers ended by a stop token: {totals['stop_token']:,}, "
                      f"by the --max-new-tokens budget: {totals['max_new_tokens']:,}; prompts skipped for room: "
                      f"{totals['skipped']:,}")
    if summary.get("answers"):
        _print_answers(console, summary["answers"])
    console.print_json(json.dumps(summary["config"]))


def committed_sample_metas(run) -> list[dict]:
    """Every committed sample's samples.jsonl record, the chunks' files fetched together."""
    from actex.store.shards import decode_samples_jsonl

    paths = [record.samples_path for record in run.records().values()]
    return [meta for path, data in run.store.read_many(paths).items()
            for meta in decode_samples_jsonl(data, run.store.url_of(path))]


def _print_skipped(console, summary: dict, shown: int = 10) -> None:
    """Rows skipped as bad, and samples cut or dropped for length: counts, then where."""
    if summary["skipped_rows"]:
        reasons = ", ".join(f"{count} x {reason}" for reason, count in summary["skipped_rows"].items())
        console.print(f"skipped rows (--on-bad-row skip): {sum(summary['skipped_rows'].values()):,}: {reasons}", markup=False)
        for row in summary["skipped_row_list"][:shown]:
            console.print(f"  {row['source']}:row {row['row']}: {row['reason']}", markup=False)
    for kind, entry in summary["long_samples"].items():
        what = "truncated to --max-seq-len" if kind == "truncated" else "skipped for length (no tokens stored)"
        console.print(f"samples {what}: {entry['count']:,} of the committed ones", markup=False)
        for meta in entry["samples"][:shown]:
            console.print(f"  sample {meta['sample_id']} ({meta['source']}:row {meta['row']}): "
                          f"{meta['n_source_tokens']:,} tokens, {meta['n_tokens']:,} stored", markup=False)


def _print_answers(console, answers: dict) -> None:
    """The accuracy summary of a generation run (engine.generate.answers_summary)."""
    known = answers["test_inputs_known"]
    console.print(
        f"answers: {answers['parsed']}/{answers['samples']} parsed, "
        f"{answers['samples_correct']}/{answers['samples_known']} correct before voting; "
        f"{answers['test_inputs']} test inputs, {known} with known outputs: "
        f"pass@1 {answers['pass_at_1']}/{known}, pass@2 {answers['pass_at_2']}/{known}; "
        f"tasks solved {answers['tasks_solved']}/{answers['tasks_known']}"
    )
    console.print(f"stop reasons {answers['stop_reasons']}; parse failures {answers['parse_failures'] or 'none'}")



def register(app: typer.Typer) -> None:
    """Add `actex inspect` to the `actex` app."""
    app.command("inspect")(inspect_command)
