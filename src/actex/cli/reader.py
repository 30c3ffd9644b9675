"""`actex export`, `actex verify` and `actex gc`: flags in, library calls out.

User errors end as one line on stderr with exit code 2 (shared with the extract area);
`verify` exits 1 when a hook's error is above tolerance or a part fails its checksums.
"""

from __future__ import annotations

from enum import Enum
from typing import Optional

import typer

from actex.cli.errors import UserError, run_store, user_errors

EXIT_VERIFY_FAILED = 1


class ExportFormat(str, Enum):
    saelens = "saelens"
    legacy_pickle = "legacy-pickle"


def export(
    url: str = typer.Argument(..., help="Run URL: local dir, file://, gs://, s3:// or memory://."),
    out: str = typer.Argument(..., help="Local output directory (created; must be empty)."),
    to: ExportFormat = typer.Option(..., "--to", help="saelens: a Hugging Face dataset SAELens loads as "
                                    "cached activations. legacy-pickle: shard_NNNN.pkl.gz + metadata.json of the "
                                    "old worker; pickle runs code when loaded, so for TRUSTED USE ONLY."),
    hook: Optional[list[str]] = typer.Option(None, "--hook", help="Hook to export (saelens: exactly one; "
                                             "legacy-pickle: repeat it, default all hooks)."),
    context_size: Optional[int] = typer.Option(None, "--context-size", min=1, help="saelens: tokens per row "
                                               "(default: the common sample length; other windows are cut to it)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Activation dtype in the export: float32 or float16 "
                                        "(saelens default: float16 for a 16-bit run, exact for its bfloat16 values; "
                                        "legacy-pickle default: float32)."),
    contexts: str = typer.Option("all", "--contexts", help="saelens: all = every C-token slice of every forward "
                                 "window (column position > 0 marks a slice that saw earlier tokens); first = only "
                                 "each window's first context, whole contexts SAELens's evals recompute exactly."),
    align: str = typer.Option("start", "--align", help="saelens: cut each window from its start (its shorter tail "
                              "is dropped) or from its end (its head is dropped: a prompt's end is always kept)."),
    shuffle: bool = typer.Option(True, "--shuffle/--no-shuffle", help="saelens: shuffle rows globally (seeded)."),
    seed: int = typer.Option(0, "--seed", help="saelens: seed of the row shuffle."),
    model: Optional[str] = typer.Option(None, "--model", help="saelens: local copy of the checkpoint for SAELens to "
                                        "load (default: run.json's model)."),
    model_class: str = typer.Option("AutoModelForCausalLM", "--model-class", help="saelens: how SAELens loads the "
                                    "model: AutoModelForCausalLM (any transformers checkpoint; the column takes the "
                                    "module's name) or HookedTransformer (TransformerLens's official models)."),
    samples_per_shard: int = typer.Option(64, "--samples-per-shard", min=1, help="legacy-pickle: samples per shard."),
) -> None:
    """Export a run for other tools: SAELens cached activations or the legacy pickle layout."""
    from actex.reader.run import Run

    with user_errors():
        run = Run(run_store(url))
        if to is ExportFormat.saelens:
            from actex.reader.exports.saelens import export_saelens

            if not hook or len(hook) != 1:
                raise UserError(f"--to saelens needs exactly one --hook; stored hooks: {', '.join(run.hooks)}")
            result = _export_saelens(run, out, hook[0], context_size=context_size, dtype=dtype, contexts=contexts,
                                     align=align, seed=seed if shuffle else None, model=model, model_class=model_class)
            _report_saelens(result)
        else:
            from actex.reader.exports.legacy import export_legacy

            result = export_legacy(run, out, hooks=hook or None, samples_per_shard=samples_per_shard,
                                   dtype=dtype or "float32", decode=_preview_decoder(run))
            typer.echo(f"actex: wrote {result.samples:,} samples in {result.shards} legacy shard(s) to {result.path} "
                       "(pickle: trusted use only)")


def _export_saelens(run, out: str, hook: str, *, model: Optional[str], model_class: str, **options):
    """Options checked, then the model SAELens will load found, before anything is written."""
    import datasets

    from actex.reader.exports.saelens import check_options, export_saelens
    from actex.reader.exports.saelens_target import saelens_target

    datasets.disable_progress_bars()  # the command prints its own summary line
    check_options(run, hook, context_size=options["context_size"], dtype=options["dtype"],
                  contexts=options["contexts"], align=options["align"])
    target = saelens_target(run.config, hook, model=model, model_class_name=model_class)
    return export_saelens(run, out, hook, target=target, **options)


def _report_saelens(result) -> None:
    where = "heads" if result.align == "end" else "tails"
    dropped = "tokens outside each window's first context" if result.contexts == "first" else f"window {where}"
    typer.echo(f"actex: wrote {result.rows:,} rows of {result.context_size} tokens of {result.hook} (SAELens hook "
               f"{result.column}, {result.dtype}) to {result.path}; {result.tokens_dropped:,} tokens dropped "
               f"({dropped}); rows {'in store order' if result.seed is None else f'shuffled, seed {result.seed}'}; "
               f"SAELens config fields in {result.path}/saelens.json")
    if result.retokenized_differently:
        typer.echo(f"actex: warning: {result.retokenized_differently:,} row(s) re-tokenize from their text to other "
                   "ids: SAELens's evals will see those ids (training uses the stored activations)", err=True)


def _preview_decoder(run):
    """Text previews come from the run's tokenizer; without it (no local copy) they stay empty."""
    from actex.model.weights import load_tokenizer, resolve_model_dir

    try:
        tokenizer = load_tokenizer(resolve_model_dir(run.config["model"], run.config.get("revision"))[0])
    except Exception as error:  # noqa: BLE001 - any failure to find the tokenizer means "no previews"
        typer.echo(f"actex: warning: no tokenizer for text previews ({type(error).__name__}); leaving them empty",
                   err=True)
        return None
    return tokenizer.decode


def verify(
    url: str = typer.Argument(..., help="Run URL."),
    samples: int = typer.Option(8, "--samples", min=1, help="Random committed samples to recompute."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sample choice."),
    tolerance: Optional[float] = typer.Option(None, "--tolerance", min=0.0, help="Max per-token relative L2 error "
                                              "||stored - reference|| / ||reference|| (default by dtype: f32 1e-3, "
                                              "f16 5e-3, bf16 and int8 2e-2)."),
    model: Optional[str] = typer.Option(None, "--model", help="Checkpoint to use instead of run.json's "
                                        "(e.g. a local copy of it)."),
    device: str = typer.Option("cpu", "--device", help="torch device of the reference model."),
    integrity_only: bool = typer.Option(False, "--integrity-only", help="Only check every committed part's "
                                        "bytes against the checksums recorded at write time (no model, no torch)."),
    repair: bool = typer.Option(False, "--repair", help="Check every committed part as --integrity-only does, "
                                "and uncommit each chunk with a corrupt part (its commit record is moved to "
                                "repaired/), so that rerunning `actex extract` recomputes exactly those chunks."),
) -> None:
    """Check the parts it reads against their checksums, then recompute random stored samples with
    Hugging Face transformers and compare (needs the torch extra). A corrupt chunk is repaired by
    --repair, then rerunning the run's `actex extract` command."""
    from actex.store.integrity import CorruptPartError
    from actex.reader.run import Run
    from actex.reader.verify import verify as run_verify

    with user_errors():
        run = Run(run_store(url))
        try:
            if integrity_only or repair:
                _check_every_part(run, repair)
                return
            report = run_verify(run, samples, seed=seed, tolerance=tolerance, model=model, device=device)
        except CorruptPartError as error:  # a part's index, read while choosing samples
            typer.echo(f"  FAIL  {error}")
            raise typer.Exit(EXIT_VERIFY_FAILED) from None
    typer.echo(f"actex: verified {len(report.sample_ids)} sample(s), {report.tokens:,} tokens of {report.url}")
    for line in report.corrupt + report.overflow:
        typer.echo(f"  FAIL  {line}")
    for check in report.checks:
        verdict = "ok" if check.ok else "FAIL"
        # int8: the rounding error the run's stats recorded (stored vs the float32 computed) over
        # every token of the chunks read, beside the error of the sampled tokens vs transformers:
        # two separate worst cases, so the first may exceed the second (it is no share of it).
        quant = "" if check.quant_error is None else f" (int8 rounding alone {check.quant_error:.1e})"
        typer.echo(f"  {verdict:4}  {check.hook:32}  error vs reference {check.error:.1e}{quant}  cosine {check.cosine:.6f}  "
                   f"(tolerance {check.tolerance:.0e}; worst token: sample {check.worst_sample} "
                   f"token {check.worst_index} position {check.worst_position})")
    if not report.ok:
        raise typer.Exit(EXIT_VERIFY_FAILED)


def _check_every_part(run, repair: bool) -> None:
    """--integrity-only / --repair: every committed part against its checksums; exit 1 if any
    is corrupt, unless --repair set their chunks aside (then exit 0: rerun extract)."""
    from actex.reader.verify import check_integrity, set_aside

    parts = run.parts()
    corrupt = check_integrity(run, parts)
    for line in corrupt.values():
        typer.echo(f"  FAIL  {line}")
    typer.echo(f"actex: checked {len(parts)} part(s) of {run.url}: {len(corrupt)} corrupt")
    if not corrupt:
        return
    if not repair:
        typer.echo("actex: `actex verify --repair` uncommits their chunks; rerunning `actex extract` then recomputes them")
        raise typer.Exit(EXIT_VERIFY_FAILED)
    chunks = {part.chunk for part in parts if part.path in corrupt or run.record(part.chunk).samples_path in corrupt}
    for chunk, aside in set_aside(run, chunks).items():
        typer.echo(f"actex: chunk {chunk} uncommitted: its commit record moved to {run.store.url_of(aside)}")
    typer.echo(f"actex: rerun the run's `actex extract` command to recompute the {len(chunks)} chunk(s); "
               "nothing else is recomputed")


def gc(
    url: str = typer.Argument(..., help="Run URL."),
    grace_hours: float = typer.Option(24.0, "--grace-hours", min=0.0, help="Keep uncommitted attempts younger "
                                      "than this (must exceed the longest chunk write of a live worker)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be deleted; delete nothing."),
) -> None:
    """Delete uncommitted attempts older than the grace period; never anything a commit record names."""
    from actex.store.gc import collect_garbage

    with user_errors():
        report = collect_garbage(run_store(url), grace_s=grace_hours * 3600, dry_run=dry_run)
    action = "would delete" if dry_run else "deleted"
    for attempt in report.deleted:
        typer.echo(f"  {action} {attempt.dir} ({len(attempt.files)} files)")
    for temp in report.temp_files:
        typer.echo(f"  {action} {temp} (stale temp file)")
    typer.echo(f"actex: {action} {len(report.deleted)} orphaned attempt(s) and {len(report.temp_files)} stale temp "
               f"file(s); kept {report.committed} committed and {len(report.kept_recent)} recent uncommitted")


def register(app: typer.Typer) -> None:
    """Add this area's subcommands to the `actex` app."""
    app.command("export")(export)
    app.command("verify")(verify)
    app.command("gc")(gc)
