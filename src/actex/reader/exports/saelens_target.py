"""What SAELens needs beside the activations to train from an export by config alone.

SAELens's training runner always loads the model by name (`load_model(model_class_name,
model_name)`) and a dataset from `dataset_path`, even when it trains from cached
activations, and looks the cached column up under its `hook_name`. So an export names:

* the model: the run's checkpoint (a local directory as an absolute path, a hub id with its
  revision, a gs:// or s3:// checkpoint as the verified local copy actex made of it), loaded
  by SAELens as `AutoModelForCausalLM` (any checkpoint transformers loads, offline too) or
  `HookedTransformer` (TransformerLens's models, by their official names only);
* the hook: under `AutoModelForCausalLM` SAELens hooks transformers' modules by their names,
  so the column is named after the module whose output is the stored hook
  (`blocks.3.hook_resid_post` -> `model.layers.3`); under `HookedTransformer` the names are
  TransformerLens's, which are actex's;
* how contexts began: `prepend_bos` is the run's `add_bos`, and the model computes in the
  run's compute dtype when SAELens recomputes activations (its evals).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actex.model.hooks import HOOK_EMBED, HOOK_LN_FINAL_OUT, parse_hook
from actex.model.weights import load_tokenizer, resolve_model_dir

MODEL_CLASSES = ("AutoModelForCausalLM", "HookedTransformer")
# Families whose blocks add a post-norm's output to the residual stream (Gemma 2 and 3):
# there hook_attn_out / hook_mlp_out are those norms' outputs, not self_attn's / mlp's.
POST_NORM_FAMILIES = ("gemma2", "gemma3", "gemma3_text")


@dataclass(frozen=True)
class SaeLensTarget:
    """The model SAELens will load and the names it will look activations up by."""

    model_name: str
    model_class_name: str
    hook_name: str  # the column name: SAELens's name of the exported hook
    prepend_bos: bool
    model_from_pretrained_kwargs: dict[str, Any]
    tokenizer: Any  # decodes each row for the text dataset SAELens's evals tokenize


def hf_module_name(hook: str, model_type: str) -> str | None:
    """The transformers module (AutoModelForCausalLM naming) whose output is `hook`, or None
    where no module outputs it (then only HookedTransformer can serve it)."""
    point = parse_hook(hook, n_layers=sys.maxsize)  # stored hooks were checked at extraction
    post_norms = model_type in POST_NORM_FAMILIES
    if point.layer is None:
        # Gemma scales the embedding outside (2) or inside (3) the module: not one output.
        return {HOOK_EMBED: None if post_norms else "model.embed_tokens", HOOK_LN_FINAL_OUT: "model.norm"}.get(hook)
    block = f"model.layers.{point.layer}"
    names = {
        "hook_resid_post": block,
        "hook_resid_pre": f"model.layers.{point.layer - 1}" if point.layer > 0 else None,
        "hook_attn_out": f"{block}.post_attention_layernorm" if post_norms else f"{block}.self_attn",
        "hook_mlp_out": f"{block}.post_feedforward_layernorm" if post_norms else f"{block}.mlp",
        "mlp.hook_pre": f"{block}.mlp.gate_proj",
        "attn.hook_v": f"{block}.self_attn.v_proj",
    }
    return names.get(point.kind)


def saelens_target(config: dict, hook: str, *, model: str | None = None,
                   model_class_name: str = "AutoModelForCausalLM") -> SaeLensTarget:
    """The SAELens target of a run's `hook` (config: the run's config from run.json).

    model: a local copy of the checkpoint to name instead of run.json's. Raises ValueError
    (one line) for a model it cannot find or a hook the model class cannot hook.
    """
    if model_class_name not in MODEL_CLASSES:
        raise ValueError(f"--model-class must be one of {', '.join(MODEL_CLASSES)}, got {model_class_name!r}")
    name = model or config["model"]
    revision = None if model else config.get("revision")
    try:
        directory, _ = resolve_model_dir(name, revision)
        tokenizer = load_tokenizer(directory)
    except Exception as error:  # noqa: BLE001 - any failure here is "no usable local checkpoint"
        raise ValueError(f"the SAELens export needs the run's model and tokenizer ({name}): {error}; "
                         "pass --model DIR with a local copy of the checkpoint") from None
    if model_class_name == "HookedTransformer":
        column = hook
    else:
        model_type = json.loads((Path(directory) / "config.json").read_text()).get("model_type", "")
        column = hf_module_name(hook, model_type)
        if column is None:
            raise ValueError(f"{hook}: no transformers module outputs this hook, so SAELens's AutoModelForCausalLM "
                             "cannot hook it; export blocks.N.hook_resid_post / hook_attn_out / hook_mlp_out, or use "
                             "--model-class HookedTransformer with a TransformerLens model name")
    # A hub id stays an id (SAELens downloads it); a local or fetched copy is named by path.
    hub_id = not Path(name).is_dir() and "://" not in name
    kwargs: dict[str, Any] = {"dtype": config.get("compute_dtype", "float32")}
    if hub_id and revision:
        kwargs["revision"] = revision
    return SaeLensTarget(
        model_name=name if hub_id else str(Path(directory).resolve()),
        model_class_name=model_class_name,
        hook_name=column,
        prepend_bos=bool((config.get("data") or {}).get("add_bos", False)),
        model_from_pretrained_kwargs=kwargs,
        tokenizer=tokenizer,
    )
