"""The jitted capture forward the engine calls once per packed batch."""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from actex.model.hooks import parse_hooks
from actex.model.qwen2 import ModelConfig, forward


def make_capture_fn(config: ModelConfig, hooks, out_dtype="bfloat16") -> Callable:
    """fn(params, token_ids, positions, segment_ids) -> {hook: [rows, seq, width]}.

    Hooks are validated and fixed at build time, so each (rows, seq) bucket compiles
    once. Only the requested hooks leave the device, already in `out_dtype`; blocks past
    the deepest hook are not run and the LM head never is.
    """
    hooks = parse_hooks(hooks, config.n_layers)
    capture = functools.partial(
        forward, config=config, hooks=hooks, out_dtype=jnp.dtype(out_dtype)
    )

    @jax.jit
    def capture_fn(params, token_ids, positions, segment_ids):
        return capture(params, token_ids=token_ids, positions=positions,
                       segment_ids=segment_ids)

    return capture_fn
