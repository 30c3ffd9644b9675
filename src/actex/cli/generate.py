"""`actex generate`: `actex extract`'s options and machinery, plus greedy generation settings.

The command takes every option of `actex extract` (same config, run, store, commit and
worker machinery: static workers, --claim, fleets; flags, ACTEX_* variables, --config)
and the GenerationConfig fields (--max-new-tokens, --stop-tokens), then runs extract's
body with a `generation` section in the run's config: the run becomes `kind: generate`.
"""

from __future__ import annotations

import functools

import typer

from actex.cli.extract import EXTRACT_OPTIONS, extract_body
from actex.cli.options import model_options, with_extract_options
from actex.config import GenerationConfig

GENERATE_OPTIONS = EXTRACT_OPTIONS + model_options(
    GenerationConfig, target="config", panel="Generation", path=("generation",),
    taken={option.name for option in EXTRACT_OPTIONS})

generate_command = with_extract_options(
    functools.partial(extract_body, options=GENERATE_OPTIONS, generating=True), options=GENERATE_OPTIONS, doc=(
        "Generate answers of MODEL to DATASET's prompts (greedy, or sampled with --temperature) and extract the activations of "
        "prompt + answer into OUTPUT/RUN, exactly once; ARC answers are parsed, voted and scored "
        "(predictions.json, accuracy.json; `actex inspect` shows the accuracy).\n\n"
        "Every option can also come from its ACTEX_* environment variable or the --config file "
        "(flag > variable > file > default). Rerun the same command to resume."
    ))


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_command)
