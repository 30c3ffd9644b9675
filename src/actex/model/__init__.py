"""actex.model: decoder families in JAX with TransformerLens hook capture, and HF checkpoint loading.

config.py (what a config.json means) -> params.py (the parameter tree) -> ops.py,
rope.py, attention.py, moe.py (the math) -> blocks.py (one block per family) ->
decoder.py (the layer scan) -> capture.py (hooks out) / generate.py (tokens out);
weights.py loads checkpoints, mesh.py and axes.py place them on devices.
"""

from actex.model.capture import forward, make_capture_fn
from actex.model.config import ModelConfig
from actex.model.hooks import hook_width, hooks_for_layers, layers_needed, parse_hooks
from actex.model.mesh import make_mesh, param_specs, shard_batch, shard_params
from actex.model.random_checkpoint import write_random_checkpoint
from actex.model.weights import LoadedModel, load_model, load_tokenizer

__all__ = [
    "LoadedModel",
    "ModelConfig",
    "forward",
    "hook_width",
    "hooks_for_layers",
    "layers_needed",
    "load_model",
    "load_tokenizer",
    "make_capture_fn",
    "make_mesh",
    "param_specs",
    "parse_hooks",
    "shard_batch",
    "shard_params",
    "write_random_checkpoint",
]
