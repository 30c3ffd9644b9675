"""Logical axis names of parameters and batches, and the rule table mapping them to mesh axes.

A leaf module: parameters (params.py) name their axes with these strings, attention and
the mesh (mesh.py) read the rules, and nothing here imports the rest of the model, so no
import cycle can run through it. The mapping is Megatron's: heads, MLP width and
vocabulary split over "model"; rows of a batch over "data".
"""

from __future__ import annotations

DATA, MODEL = "data", "model"

# logical axis -> mesh axis (None: replicated)
AXIS_RULES: dict[str, str | None] = {
    "layers": None,
    "embed": None,
    "vocab": MODEL,
    "heads": MODEL,
    "kv_heads": MODEL,
    "mlp": MODEL,
    "head_dim": None,
    # Experts are split by width, not by expert: each device holds a 1/M slice of every
    # expert, so the routed grouped matmul needs no token all-to-all (which XLA's
    # partitioner does not derive for a ragged dot) and every token's experts are local.
    "experts": None,
    "expert_mlp": MODEL,
}
