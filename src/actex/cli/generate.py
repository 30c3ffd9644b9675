"""`actex generate`: `actex extract`'s flags and machinery, plus greedy generation settings.

The command takes every flag of `actex extract` (same config, run, store, commit and
worker machinery: static workers, --claim, fleets) and the GenerationConfig fields, so a
flag added to extract is a flag of generate too. It runs extract's body with the
generation fields set: the run becomes `kind: generate` in run.json.
"""

from __future__ import annotations

import inspect
from typing import Optional, get_type_hints

import typer

from actex.cli.extract import GENERATION, extract_command
from actex.config import GenerationConfig

_FIELDS = GenerationConfig.model_fields

_OPTIONS = {
    "max_new_tokens": (Optional[int], typer.Option(
        None, "--max-new-tokens", min=1, rich_help_panel="Generation",
        help=f"{_FIELDS['max_new_tokens'].description} (default: {_FIELDS['max_new_tokens'].default}).")),
    "stop_tokens": (Optional[str], typer.Option(
        None, "--stop-tokens", rich_help_panel="Generation",
        help=f"Comma-separated. {_FIELDS['stop_tokens'].description} "
             f"(default: {','.join(_FIELDS['stop_tokens'].default)}).")),
}


def generate_command(**flags) -> None:
    """Generate greedy answers of MODEL to DATASET's prompts and extract the activations of
    prompt + answer into OUTPUT/RUN, exactly once; ARC answers are parsed, voted and scored
    (predictions.json, accuracy.json; `actex inspect` shows the accuracy).

    Rerun the same command to resume: committed chunks are skipped, unfinished ones redone.
    """
    stop_tokens = flags.pop("stop_tokens")
    generation = {
        "max_new_tokens": flags.pop("max_new_tokens"),
        "stop_tokens": [t.strip() for t in stop_tokens.split(",") if t.strip()] if stop_tokens else None,
    }
    token = GENERATION.set(generation)
    try:
        extract_command(**flags)
    finally:
        GENERATION.reset(token)


def _signature() -> tuple[inspect.Signature, dict]:
    """extract_command's parameters followed by the generation options (typer reads these)."""
    hints = get_type_hints(extract_command)
    params = [p.replace(annotation=hints[p.name]) for p in inspect.signature(extract_command).parameters.values()]
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
               for name, (kind, option) in _OPTIONS.items()]
    return inspect.Signature(params, return_annotation=None), {p.name: p.annotation for p in params}


generate_command.__signature__, generate_command.__annotations__ = _signature()


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_command)
