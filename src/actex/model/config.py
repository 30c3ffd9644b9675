"""ModelConfig: one decoder family's shape and numerics, read from a Hugging Face config.json.

Families, and the transformers implementation each is checked against (transformers 5.x,
`modeling_<type>.py`):

    qwen2, qwen3, llama, mistral   Llama-style block: pre-norms, GQA, gated SiLU MLP
                                   (q/k/v biases for Qwen2, q/k RMSNorm for Qwen3)
    qwen3_moe, mixtral             the same block with a top-k routed mixture of experts
    gemma2, gemma3_text (gemma3)   Gemma block: (1 + w) RMSNorm, pre- and post-norms around
                                   attention and MLP, GELU-tanh gate, scaled embeddings

Every field of config.json that the family's transformers code reads is either turned
into a ModelConfig field here or refused with a one-line ValueError naming the field: a
model actex would compute differently from its reference never gets past this file.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, PositiveFloat, PositiveInt, ValidationError

from actex.model.rope import Rope, hf_ropes, rope_from_hf

FULL, SLIDING = "full_attention", "sliding_attention"

LLAMA_TYPES = ("qwen2", "qwen3", "llama", "mistral")
MOE_TYPES = ("qwen3_moe", "mixtral")
GEMMA_TYPES = ("gemma2", "gemma3_text", "gemma3")
SUPPORTED_TYPES = LLAMA_TYPES + MOE_TYPES + GEMMA_TYPES

# config.json's activation names -> actex's (transformers' ACT2FN keys).
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


class _HfFields(BaseModel):
    """Types of the config.json fields the families read (strict: "four" is not 4)."""

    model_config = ConfigDict(extra="allow", strict=True)

    model_type: str = "qwen2"
    vocab_size: PositiveInt
    hidden_size: PositiveInt
    num_hidden_layers: PositiveInt
    num_attention_heads: PositiveInt
    num_key_value_heads: PositiveInt | None = None
    head_dim: PositiveInt | None = None
    intermediate_size: PositiveInt
    hidden_act: str | None = None
    hidden_activation: str | None = None
    rms_norm_eps: PositiveFloat = 1e-6
    rope_theta: PositiveFloat = 10000.0
    rope_parameters: dict | None = None
    rope_scaling: dict | None = None
    max_position_embeddings: PositiveInt | None = None
    tie_word_embeddings: bool | None = None
    attention_bias: bool | None = None
    mlp_bias: bool | None = None
    use_sliding_window: bool | None = None
    sliding_window: PositiveInt | None = None
    max_window_layers: int | None = None
    layer_types: list[str] | None = None
    query_pre_attn_scalar: PositiveFloat | None = None
    attn_logit_softcapping: PositiveFloat | None = None
    final_logit_softcapping: PositiveFloat | None = None
    use_bidirectional_attention: bool | None = None
    num_experts: PositiveInt | None = None
    num_local_experts: PositiveInt | None = None
    num_experts_per_tok: PositiveInt | None = None
    moe_intermediate_size: PositiveInt | None = None
    norm_topk_prob: bool | None = None
    decoder_sparse_step: PositiveInt | None = None
    mlp_only_layers: list[int] | None = None
    torch_dtype: str | None = None
    dtype: str | None = None


def _check_field_types(hf: dict) -> None:
    """One-line ValueError naming the first wrong-typed or missing field."""
    try:
        _HfFields.model_validate(hf)
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if isinstance(rope.get("rope_theta"), (int, float, str)):
            _HfFields.model_validate({**hf, "rope_theta": rope["rope_theta"]})
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        got = "" if first["type"] == "missing" else f", got {first['input']!r}"
        raise ValueError(f"field {field}: {first['msg']}{got}") from None


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """A routed mixture of experts (Qwen3-MoE, Mixtral): every layer sparse."""

    n_experts: int
    top_k: int
    d_expert: int  # each expert's gated-MLP width (moe_intermediate_size)
    norm_topk_prob: bool  # renormalise the top-k routing weights to sum to 1


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder's shape and numerics. Build with `from_hf_config`; derived values are properties."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_mlp: int
    rms_norm_eps: float
    rope_theta: float  # base of the default RoPE table (used when `ropes` is empty)
    tie_word_embeddings: bool
    qkv_bias: bool = True
    qk_norm: bool = False
    model_type: str = "qwen2"
    dtype: str = "float32"  # the checkpoint's dtype (config.json torch_dtype / dtype)
    o_bias: bool = False  # Llama-style attention_bias=true also biases the output projection
    # Gemma: RMSNorm gains are (1 + w), post-norms after attention and MLP, embeddings x sqrt(d).
    gemma: bool = False
    activation: str = "silu"  # the MLP gate's: "silu" or "gelu_tanh"
    attn_scale: float | None = None  # multiplies q.k; None: head_dim ** -0.5
    attn_softcap: float | None = None  # Gemma 2: scores -> c * tanh(scores / c)
    final_softcap: float | None = None  # Gemma 2: logits -> c * tanh(logits / c)
    sliding_window: int | None = None  # keys a sliding layer's query sees, itself included
    layer_types: tuple[str, ...] = ()  # per layer FULL or SLIDING; () = all FULL
    ropes: tuple[tuple[str, Rope], ...] = ()  # layer type -> its RoPE table; () = default
    moe: MoeConfig | None = None

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    @property
    def embed_scale(self) -> float | None:
        """Gemma multiplies embeddings by sqrt(d_model), rounded to the parameter dtype."""
        return math.sqrt(self.d_model) if self.gemma else None

    def layer_type(self, layer: int) -> str:
        return self.layer_types[layer] if self.layer_types else FULL

    def rope_tables(self) -> tuple[Rope, ...]:
        """The distinct RoPE tables, in a fixed order (`layer_rope_index` points into it)."""
        if not self.ropes:
            return (rope_from_hf(None, theta=self.rope_theta, head_dim=self.head_dim, max_position_embeddings=None),)
        return tuple(dict.fromkeys(rope for _, rope in self.ropes))

    def layer_rope_index(self) -> np.ndarray:
        """int32 [n_layers]: which of `rope_tables()` each layer rotates with."""
        tables, by_type = self.rope_tables(), dict(self.ropes)
        return np.asarray([tables.index(by_type[self.layer_type(l)]) if by_type else 0
                           for l in range(self.n_layers)], np.int32)

    def layer_windows(self) -> np.ndarray:
        """int32 [n_layers]: each layer's sliding window, 0 for full (global) attention."""
        return np.asarray([self.sliding_window if self.layer_type(l) == SLIDING else 0
                           for l in range(self.n_layers)], np.int32)

    def windows(self) -> tuple[int, ...]:
        """The distinct window values of the layers (static: kernels with fixed masks need it)."""
        return tuple(sorted({int(w) for w in self.layer_windows()}))

    def max_exact_positions(self) -> int | None:
        """Positions from which a RoPE table stops matching transformers ('dynamic' scaling
        recomputes its table past the original length); None: exact at any length."""
        limits = [r.max_exact_positions for r in self.rope_tables() if r.max_exact_positions]
        return min(limits) if limits else None

    @classmethod
    def from_hf_config(cls, hf: dict) -> ModelConfig:
        """Build from a config.json dict; refuse what this model would compute wrongly.

        Errors are one-line ValueErrors naming the field ("field num_hidden_layers: ...");
        callers that know the file prefix its path (weights.read_model_config).
        """
        model_type = hf.get("model_type", "qwen2")
        if model_type not in SUPPORTED_TYPES:
            raise ValueError(f"model_type {model_type!r} not supported; expected one of {sorted(SUPPORTED_TYPES)}")
        if model_type == "gemma3":  # the multimodal wrapper: its text model is what we run
            text = hf.get("text_config")
            if not isinstance(text, dict):
                raise ValueError("field text_config: a gemma3 config needs its text_config object")
            hf = {"model_type": "gemma3_text", **text}
            model_type = "gemma3_text"
        _check_field_types(hf)
        n_heads = hf["num_attention_heads"]
        n_kv_heads = hf.get("num_key_value_heads") or n_heads
        if n_heads % n_kv_heads:
            raise ValueError(f"num_attention_heads {n_heads} not a multiple of num_key_value_heads {n_kv_heads}")
        head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
        gemma = model_type in GEMMA_TYPES
        if hf.get("mlp_bias"):
            raise ValueError("field mlp_bias: true is not supported")
        attention_bias = bool(hf.get("attention_bias", False))
        fields: dict[str, Any] = dict(
            vocab_size=hf["vocab_size"],
            d_model=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            d_mlp=hf["intermediate_size"],
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(_rope_theta(hf)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
            # Qwen2 always has q/k/v biases and never an output bias; elsewhere attention_bias
            # switches all four (transformers' LlamaAttention / Gemma2Attention).
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=attention_bias and model_type != "qwen2",
            qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text"),
            model_type=model_type,
            dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "float32"),
            gemma=gemma,
            activation=_activation(hf, gemma),
        )
        fields |= _attention_fields(hf, model_type, head_dim)
        fields["ropes"] = tuple(sorted(hf_ropes(hf, head_dim).items()))
        if model_type in MOE_TYPES:
            fields["moe"] = _moe(hf, model_type)
        return cls(**fields)


def _rope_theta(hf: dict) -> float:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if isinstance(rope.get(FULL), dict):  # Gemma 3's per-layer-type form
        rope = rope[FULL]
    default = 1e6 if hf.get("model_type") == "mixtral" else 10000.0  # the families' own defaults
    return rope.get("rope_theta", hf.get("rope_theta", default))


def _activation(hf: dict, gemma: bool) -> str:
    # Gemma's MLP reads `hidden_activation`; the others `hidden_act`.
    field = "hidden_activation" if gemma else "hidden_act"
    name = hf.get(field) or ("gelu_pytorch_tanh" if gemma else "silu")
    if name not in _ACTIVATIONS or (gemma and _ACTIVATIONS[name] != "gelu_tanh"):
        expected = "gelu_pytorch_tanh" if gemma else "silu"
        raise ValueError(f"field {field}: {name!r} not supported ({expected})")
    return _ACTIVATIONS[name]


def _layer_types(hf: dict, model_type: str, window: int | None) -> tuple[str, ...]:
    """Which layers slide, as the family's transformers config computes it."""
    n = hf["num_hidden_layers"]
    if window is None:
        return ()
    if model_type in ("mistral", "mixtral", "qwen3_moe"):
        return (SLIDING,) * n  # one window for every layer
    given = hf.get("layer_types")
    if given is not None:
        if len(given) != n or not set(given) <= {FULL, SLIDING}:
            raise ValueError(f"field layer_types: expected {n} entries, each {FULL!r} or {SLIDING!r}")
        return tuple(given)
    if model_type in ("qwen2", "qwen3"):
        first = hf.get("max_window_layers", 28)
        return tuple(SLIDING if i >= first else FULL for i in range(n))
    period = 2 if model_type == "gemma2" else hf.get("sliding_window_pattern", 6)
    return tuple(SLIDING if (i + 1) % period else FULL for i in range(n))


def _window(hf: dict, model_type: str) -> int | None:
    if model_type in ("qwen2", "qwen3", "qwen3_moe"):  # only with use_sliding_window
        return hf.get("sliding_window", 4096) if hf.get("use_sliding_window") else None
    if model_type == "llama":
        return None
    if model_type in ("gemma2", "gemma3_text"):
        return hf.get("sliding_window", 4096)
    return hf.get("sliding_window", 4096 if model_type == "mistral" else None)


def _attention_fields(hf: dict, model_type: str, head_dim: int) -> dict[str, Any]:
    """Scale, soft-caps and sliding windows, with the family's transformers defaults."""
    if hf.get("use_bidirectional_attention"):
        raise ValueError("field use_bidirectional_attention: true is not supported (causal attention only)")
    window = _window(hf, model_type)
    layer_types = _layer_types(hf, model_type, window)
    fields: dict[str, Any] = {"sliding_window": window if SLIDING in layer_types else None,
                              "layer_types": layer_types if SLIDING in layer_types else ()}
    if model_type in GEMMA_TYPES:
        scalar = hf.get("query_pre_attn_scalar", 256)
        fields["attn_scale"] = float(scalar) ** -0.5 if scalar != head_dim else None
        defaults = (50.0, 30.0) if model_type == "gemma2" else (None, None)
        attn_cap = hf.get("attn_logit_softcapping", defaults[0])
        final_cap = hf.get("final_logit_softcapping", defaults[1])
        fields["attn_softcap"] = float(attn_cap) if attn_cap else None
        fields["final_softcap"] = float(final_cap) if final_cap else None
    else:
        for field in ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar"):
            if hf.get(field) is not None:
                raise ValueError(f"field {field}: not read by transformers' {model_type}, so not by actex; remove it")
    return fields


def _moe(hf: dict, model_type: str) -> MoeConfig:
    """Routing of Qwen3-MoE (norm_topk_prob) or Mixtral (always renormalised top-k)."""
    # Hub Qwen3-MoE configs say num_experts; transformers 5 writes num_local_experts.
    field = "num_experts" if hf.get("num_experts") else "num_local_experts"
    experts = hf.get(field)
    if not experts:
        raise ValueError(f"field {field}: a {model_type} model needs its expert count")
    top_k = hf.get("num_experts_per_tok", 8 if model_type == "qwen3_moe" else 2)
    if top_k > experts:
        raise ValueError(f"field num_experts_per_tok: {top_k} exceeds {field} {experts}")
    if model_type == "mixtral":
        return MoeConfig(experts, top_k, hf["intermediate_size"], norm_topk_prob=True)
    # Mixed dense and sparse layers would need two MLP kinds in one layer scan; every
    # released Qwen3-MoE is sparse throughout, so a mixed one is refused, not mis-computed.
    if hf.get("mlp_only_layers"):
        raise ValueError("field mlp_only_layers: dense layers among sparse ones are not supported")
    if hf.get("decoder_sparse_step", 1) != 1:
        raise ValueError("field decoder_sparse_step: only 1 (every layer sparse) is supported")
    if not hf.get("moe_intermediate_size"):
        raise ValueError("field moe_intermediate_size: a qwen3_moe model needs its expert width")
    return MoeConfig(experts, top_k, hf["moe_intermediate_size"], bool(hf.get("norm_topk_prob", False)))
