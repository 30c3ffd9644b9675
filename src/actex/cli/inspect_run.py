"""`actex inspect`: what a run holds, from its run.json, commit records and statistics."""

from __future__ import annotations

import json

import typer

from actex.cli.errors import run_store, user_errors
from actex.data.plan import reason_kind
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
        summary["token_selection"] = token_selection(run.config, run.commits.values(), metas)
        summary["long_samples"] = long_samples(metas)
        summary["generation"] = generation_totals(metas) if run.manifest.kind == "generate" else None
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
        return
    from rich.console import Console

    console = Console()
    console.print(f"[bold]{summary['url']}[/bold]")
    # Two lines, each a phrase that fits 80 columns at any size (one line wrapped mid-phrase).
    console.print(f"{summary['kind']} run, dtype {summary['dtype']}, chunks {summary['chunks_committed']:,}/"
                  f"{summary['chunks_total']:,} committed")
    console.print(f"{summary['samples']:,} samples, {summary['tokens']:,} tokens, {summary['bytes'] / 1e6:,.1f} MB")
    _print_token_use(console, summary)
    _print_skipped(console, summary)
    if summary["stats_chunks"] < summary["chunks_committed"]:
        console.print(f"statistics below: over {summary['stats_chunks']:,} of the {summary['chunks_committed']:,} "
                      "committed chunks,\n  spread evenly (--stats-chunks 0 for all)")
    for hook, count in summary["overflow"].items():
        console.print(f"overflow: {hook}: {count:,} value(s) not finite as stored {summary['dtype']} "
                      "(`actex verify` fails; store float32 or int8)", markup=False)
    for table in stats_tables(summary):
        console.print(table)
    if summary.get("generation"):
        totals = summary["generation"]
        console.print(f"generated {totals['generated_tokens']:,} tokens over {totals['samples']:,} samples "
                      f"(mean {totals['mean_tokens']:.1f}); answers ended by a stop token: {totals['stop_token']:,}, "
                      f"by the --max-new-tokens budget: {totals['max_new_tokens']:,}; prompts skipped (prompt too long): "
                      f"{totals['skipped']:,}")
    if summary.get("answers"):
        _print_answers(console, summary["answers"])
    console.print_json(json.dumps(summary["config"]))


def stats_tables(summary: dict) -> list:
    """The hooks' statistics as rich tables: widths and activation figures, then (int8 runs)
    the stored values' worst and mean per-token error vs float32 in a table of its own, so
    that each fits 80 columns with hook names and numbers whole (rich folds a cell that
    does not fit, splitting a number across lines: only a terminal too narrow for the
    name and three numbers still does)."""
    from rich.table import Column, Table

    tables = [("width", "mean |mean|", "mean var", "mean L2 norm"), ("int8 error max", "int8 error mean")]
    keys = {"mean |mean|": "mean_abs_mean", "mean var": "mean_variance", "mean L2 norm": "mean_l2_norm",
            "int8 error max": "quant_error_max", "int8 error mean": "quant_error_mean"}
    longest = max(map(len, summary["hooks"]), default=4)
    out = []
    for figures in tables[:2 if summary["dtype"] == "int8" else 1]:
        table = Table(Column("hook", no_wrap=True, min_width=longest), *(Column(f, overflow="fold", justify="right") for f in figures))
        for hook, entry in summary["hooks"].items():
            stats = entry.get("stats")
            cells = [str(entry["width"]) if f == "width" else f"{stats[keys[f]]:.4g}" if stats else "-" for f in figures]
            table.add_row(hook, *cells)
        out.append(table)
    return out


def committed_sample_metas(run) -> list[dict]:
    """Every committed sample's samples.jsonl record, the chunks' files fetched together."""
    from actex.store.shards import decode_samples_jsonl

    paths = [record.samples_path for record in run.records().values()]
    return [meta for path, data in run.store.read_many(paths).items()
            for meta in decode_samples_jsonl(data, run.store.url_of(path))]


def _print_skipped(console, summary: dict, shown: int = 10) -> None:
    """Rows skipped as bad, and samples cut or dropped for length: counts, then where."""
    if summary["skipped_rows"]:
        console.print(f"skipped rows (--on-bad-row skip): {sum(summary['skipped_rows'].values()):,}", markup=False)
        for line in skipped_row_lines(summary["skipped_rows"], summary["skipped_row_list"]):
            console.print(f"  {line}", markup=False)
    for kind, entry in summary["long_samples"].items():
        what = "truncated to --max-seq-len" if kind == "truncated" else "skipped for length (no tokens stored)"
        console.print(f"samples {what}: {entry['count']:,} of the committed ones", markup=False)
        for meta in entry["samples"][:shown]:
            console.print(f"  sample {meta['sample_id']} ({meta['source']}:row {meta['row']}): "
                          f"{meta['n_source_tokens']:,} tokens, {meta['n_tokens']:,} stored", markup=False)


def skipped_row_lines(by_kind: dict[str, int], listed: list[dict]) -> list[str]:
    """One line per kind of reason (run.json counts them with numbers blanked: "cell (N,N)
    = N is outside N-N"), shown by its first listed row, whose reason has its numbers:
    'arc.json:row 3: cell (2,3) = 11 is outside 0-9 (and 4 more like it)'."""
    lines = []
    for kind, count in by_kind.items():
        example = next((row for row in listed if reason_kind(row["reason"]) == kind), None)
        if example is None:  # past the rows run.json lists
            lines.append(f"{count:,} x {kind}")
            continue
        more = f" (and {count - 1:,} more like it)" if count > 1 else ""
        lines.append(f"{example['source']}:row {example['row']}: {example['reason']}{more}")
    return lines


def _print_answers(console, answers: dict) -> None:
    """The accuracy summary of a generation run (engine.generate.answers_summary)."""
    known = answers["test_inputs_known"]
    skipped = answers["stop_reasons"].get("skipped", 0)
    console.print(
        f"answers: {answers['parsed']}/{answers['samples'] - skipped} parsed"
        + (f" ({skipped} skipped: prompt too long)" if skipped else "") + ", "
        f"{answers['samples_correct']}/{answers['samples_known']} correct before voting; "
        f"{answers['test_inputs']} test inputs, {known} with known outputs: "
        f"pass@1 {answers['pass_at_1']}/{known}, pass@2 {answers['pass_at_2']}/{known}; "
        f"tasks solved {answers['tasks_solved']}/{answers['tasks_known']}"
    )
    console.print(f"stop reasons {counts(answers['stop_reasons'])}; parse failures "
                  f"{counts(answers['parse_failures']) or 'none'}", markup=False)


def counts(by_name: dict[str, int]) -> str:
    """{"stop_token": 3, "skipped": 4} -> "stop_token 3, skipped 4" (what a reader reads)."""
    return ", ".join(f"{name} {count:,}" for name, count in by_name.items())


def computed_tokens(meta: dict, max_seq_len: int) -> int | None:
    """Tokens a sample put through the forward, from its samples.jsonl record (whose
    n_tokens counts the stored ones only); None when the record cannot say."""
    if meta.get("skipped"):
        return 0
    if "n_prompt_tokens" in meta:  # a generated sample: prompt + generation, one window
        generated = meta.get("n_generated_tokens")
        return None if generated is None else meta["n_prompt_tokens"] + generated
    if "n_source_tokens" not in meta:
        return None
    return min(meta["n_source_tokens"], max_seq_len) if meta.get("truncated") else meta["n_source_tokens"]


def token_selection(config: dict, records, metas: list[dict]) -> dict | None:
    """With --positions other than all: {"positions", "selected_fraction" (stored / computed
    tokens), "padding_fraction" (of the slots computed)} over the committed chunks; None
    with all positions (the useful token fraction then says both) or where the records
    cannot tell."""
    positions = config.get("positions", "all")
    records = list(records)
    computed = [computed_tokens(meta, config["data"]["max_seq_len"]) for meta in metas]
    slots, real = sum(r.token_slots for r in records), sum(computed)
    # Slots and samples must cover the same chunks: every record that stored tokens counted
    # its slots (0 slots otherwise: a record written before they were kept).
    if positions == "all" or not slots or not all(r.token_slots or not r.tokens for r in records) or None in computed:
        return None
    return {"positions": positions, "selected_fraction": sum(r.tokens for r in records) / real if real else 0.0,
            "padding_fraction": 1 - real / slots}


def _print_token_use(console, summary: dict) -> None:
    """Stored tokens / slots computed; with --positions, what selection and padding each left out."""
    useful, selection = summary["useful_token_fraction"], summary["token_selection"]
    if useful is None:
        return
    if selection is None:
        if summary["config"].get("positions", "all") == "all":
            console.print(f"useful tokens {useful:.1%} of the slots computed (the rest: padding)")
        else:
            console.print(f"tokens stored {useful:.1%} of the slots computed (the rest: padding, and tokens "
                          f"--positions {summary['config']['positions']} did not select)", markup=False)
        return
    console.print(f"tokens stored {useful:.1%} of the slots computed: --positions {selection['positions']} selected "
                  f"{selection['selected_fraction']:.1%} of the tokens computed; padding "
                  f"{selection['padding_fraction']:.1%} of the slots", markup=False)



def register(app: typer.Typer) -> None:
    """Add `actex inspect` to the `actex` app."""
    app.command("inspect")(inspect_command)
