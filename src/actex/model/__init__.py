"""actex.model: the Qwen2-family forward with hook capture, and HF checkpoint loading."""

from actex.model.capture import make_capture_fn
from actex.model.hooks import hook_width, hooks_for_layers, layers_needed, parse_hooks
from actex.model.mesh import make_mesh, param_specs, shard_batch, shard_params
from actex.model.qwen2 import ModelConfig, forward
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
