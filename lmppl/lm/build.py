"""From (config, named tensors) to a network, and from a Hugging Face ``config.json`` to a config.

Every checkpoint reader produces a :class:`~lmppl.lm.config.ModelConfig` and a mapping of
tensors named as in the Hugging Face PyTorch state dict of the architecture;
:func:`build_network` turns that pair into the NNX network. All checks (a missing tensor, a
shape that disagrees with the config, an unsupported architecture) happen here, eagerly, so
the user sees a one-line ``ValueError`` rather than a traceback from inside a traced function.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmppl.lm.config import (
    SUPPORTED_ARCHITECTURES,
    SUPPORTED_ROPE_SCALING,
    ModelConfig,
    RopeScaling,
)
from lmppl.lm.gemma import GemmaNetwork
from lmppl.lm.gpt2 import GPT2Network
from lmppl.lm.gpt_neo import GPTNeoNetwork
from lmppl.lm.layers import ACTIVATIONS
from lmppl.lm.llama import LlamaNetwork

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "TensorTable",
    "build_network",
    "config_from_hf",
    "language_model_tensors",
]

NETWORKS = {
    "llama": LlamaNetwork,
    "gemma": GemmaNetwork,
    "gpt2": GPT2Network,
    "gpt_neo": GPTNeoNetwork,
}

# Hugging Face ``model_type`` -> lmppl architecture.
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "phi3": "llama",
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3_text": "gemma",
    "gemma3": "gemma",  # the multimodal checkpoint's language model (text in, text out)
    "gpt2": "gpt2",
    "gpt_neo": "gpt_neo",
}
# ``architectures[0]`` of a config.json without ``model_type`` -> its model type.
CAUSAL_LM_CLASSES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
    "Gemma3ForConditionalGeneration": "gemma3",
    "GPT2LMHeadModel": "gpt2",
    "GPTNeoForCausalLM": "gpt_neo",
}
# Checkpoints whose head is not a next-token distribution (their tied embeddings would
# silently stand in for the missing LM head).
_NOT_LANGUAGE_MODEL_HEADS = (
    "ForSequenceClassification",
    "ForTokenClassification",
    "ForQuestionAnswering",
)
# Neighbours people reach for that lmppl does not read: say what to use instead.
_UNSUPPORTED_HINTS = {
    "gemma3n": "Gemma 3n is not supported; Gemma 3 (gemma3, gemma3_text) is",
    "phi": "Phi-1/Phi-2 (model_type phi) are not supported; Phi-3, Phi-3.5 and Phi-4 "
    "(model_type phi3) are",
    "qwen3_moe": "mixture-of-experts Qwen3 is not supported; dense Qwen3 (model_type qwen3) is",
}

# Base-model checkpoints (``LlamaModel``, ``GPT2Model``) omit the causal-LM wrapper's prefix.
WRAPPER_PREFIXES = ("model.", "transformer.")
# Where multimodal checkpoints (Gemma 3) keep their language model's tensors.
LANGUAGE_MODEL_PREFIXES = {
    "language_model.model.": "model.",
    "model.language_model.": "model.",
    "language_model.lm_head.": "lm_head.",
}
# Gemma3TextConfig's defaults: the multimodal config.json files (gemma-3-4b and larger)
# give only the text_config fields that differ from them.
GEMMA3_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "bos_token_id": 2,
    "eos_token_id": 1,
}


def language_model_tensors(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """``tensors`` with a multimodal checkpoint's language-model tensors renamed as in the
    text-only model (``language_model.model.layers.0...`` -> ``model.layers.0...``); the
    vision tower's are left as they are (and never read). A no-op for text checkpoints."""
    renamed = dict(tensors)
    for name, tensor in tensors.items():
        for prefix, replacement in LANGUAGE_MODEL_PREFIXES.items():
            if name.startswith(prefix):
                renamed[replacement + name[len(prefix) :]] = tensor
                del renamed[name]
                break
    return renamed


class TensorTable:
    """A :class:`~lmppl.lm.layers.ParameterSource` over a mapping of named tensors.

    ``table(name, shape)`` returns ``tensors[name]`` as a JAX array of ``dtype`` after
    checking its shape and that every value is finite (a corrupted file fails here, in
    one line naming the tensor, instead of producing NaN log-weights later). A name with a ``model.`` / ``transformer.`` prefix is also found
    without it (checkpoints of the bare base model).
    """

    def __init__(self, tensors: Mapping[str, Any], dtype: Any, architecture: str):
        self.tensors = tensors
        self.dtype = dtype
        self.architecture = architecture

    def find(self, name: str) -> Any:
        if name in self.tensors:
            return self.tensors[name]
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix) and name[len(prefix) :] in self.tensors:
                return self.tensors[name[len(prefix) :]]
        return None

    def __call__(self, name: str, shape: tuple[int, ...]) -> jax.Array:
        tensor = self.find(name)
        if tensor is None:
            raise ValueError(
                f"tensor {name!r} is missing from the checkpoint ({len(self.tensors)} tensors) "
                f"needed by this {self.architecture} config"
            )
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(
                f"tensor {name!r} has shape {tuple(tensor.shape)} but the {self.architecture} "
                f"config implies {tuple(shape)}"
            )
        if isinstance(tensor, jax.core.Tracer):
            array = jnp.asarray(tensor, dtype=self.dtype)
            bad = int(jnp.size(array) - jnp.count_nonzero(jnp.isfinite(array)))
        else:  # cast and checked in NumPy: no XLA program per tensor shape while loading
            with np.errstate(over="ignore"):
                host = np.asarray(tensor).astype(jnp.dtype(self.dtype), copy=False)
            bad = int(host.size - np.count_nonzero(np.isfinite(host)))
            array = jnp.asarray(host)
        if bad:
            raise ValueError(
                f"tensor {name!r} has {bad} non-finite values (NaN or inf) of {array.size}: "
                "the checkpoint is corrupted (or overflowed when cast to "
                f"{jnp.dtype(self.dtype).name})"
            )
        return array


def build_network(
    config: ModelConfig, tensors: Mapping[str, Any], dtype: Any = jnp.float32
) -> nnx.Module:
    """The network of ``config.architecture`` with its parameters taken from ``tensors``.

    Args:
      config: the model's hyper-parameters.
      tensors: name -> array (NumPy, JAX, or anything ``np.asarray`` accepts), named as in
        the Hugging Face PyTorch state dict (``model.layers.0.self_attn.q_proj.weight``,
        ``transformer.h.0.attn.c_attn.weight``, ...). Extra tensors are ignored. A tied
        output (``config.tie_word_embeddings``) reuses the token embedding and does not
        read ``lm_head.weight``.
      dtype: the parameters' dtype (float32 or bfloat16).

    Raises:
      ValueError: unsupported architecture, missing tensor, or a shape that disagrees
        with the config (the message names the tensor).
    """
    if config.architecture not in NETWORKS:
        raise ValueError(
            f"unsupported architecture {config.architecture!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if config.activation not in ACTIVATIONS:
        raise ValueError(
            f"unsupported activation {config.activation!r}; supported: {', '.join(ACTIVATIONS)}"
        )
    source = TensorTable(tensors, dtype, config.architecture)
    return NETWORKS[config.architecture](config, source)


def config_from_hf(config_dict: Mapping[str, Any]) -> ModelConfig:
    """A :class:`ModelConfig` from a Hugging Face ``config.json`` dictionary.

    Supports ``model_type`` llama (Llama 2 and 3.x), mistral, qwen2, qwen3, phi3 (Phi-3,
    Phi-3.5, Phi-4; all the ``"llama"`` architecture), gemma, gemma2, gemma3_text and
    gemma3 (the language model of the multimodal checkpoints; all the ``"gemma"``
    architecture), gpt2 and gpt_neo; a config without ``model_type`` is read by
    its ``architectures`` class. RoPE scaling kinds: linear, dynamic, yarn, llama3,
    longrope (see :mod:`lmppl.lm.rope`). Features that would change the maths but are not
    implemented (another RoPE scaling kind, Llama's output-projection and MLP biases,
    GPT-2's per-layer score scaling, bidirectional Gemma attention, quantized weights
    (``quantization_config``)) raise a one-line ``ValueError`` naming the feature.
    """
    model_type = config_dict.get("model_type")
    architectures = config_dict.get("architectures") or []
    if model_type is None and architectures and architectures[0] in CAUSAL_LM_CLASSES:
        model_type = CAUSAL_LM_CLASSES[architectures[0]]
        config_dict = dict(config_dict, model_type=model_type)
    head = architectures[0] if architectures else ""
    if head.endswith(_NOT_LANGUAGE_MODEL_HEADS):
        raise ValueError(
            f"{head} is a classifier, not a language model; lmppl.load reads causal LMs "
            "(use a classifier as a scorer: lmppl.scorers.hf_text_classifier)"
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        hint = f" ({_UNSUPPORTED_HINTS[model_type]})" if model_type in _UNSUPPORTED_HINTS else ""
        if not hint and config_dict.get("is_encoder_decoder"):
            hint = " (an encoder-decoder model; of those lmppl.load reads T5 / Flan-T5 only)"
        raise ValueError(
            f"unsupported model type {model_type!r}{hint}; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    quantization = config_dict.get("quantization_config")
    if quantization:
        method = (
            quantization.get("quant_method", "unknown")
            if isinstance(quantization, dict)
            else quantization
        )
        raise ValueError(
            f"{model_type}: quantized checkpoints (quantization_config: {method}) are not "
            "supported; use the unquantized safetensors (dtype='bfloat16' keeps them in "
            "bfloat16) or a GGUF file (dequantised on load)"
        )
    if model_type == "gemma3":  # read the language model's config
        text = dict(config_dict.get("text_config") or {})
        tied = config_dict.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
        config_dict = {**GEMMA3_TEXT_DEFAULTS, **text, "model_type": "gemma3_text"}
        config_dict["tie_word_embeddings"] = tied
    architecture = SUPPORTED_MODEL_TYPES[model_type]
    reader = {
        "llama": _llama_config,
        "gemma": _gemma_config,
        "gpt2": _gpt2_config,
        "gpt_neo": _gpt_neo_config,
    }
    return reader[architecture](config_dict)


def _token_id(value: Any) -> int | None:
    """A special-token id from ``config.json`` (some configs give a list; take the first)."""
    if isinstance(value, list | tuple):
        return int(value[0]) if value else None
    return None if value is None else int(value)


_LAYER_KINDS = {"full_attention": "global", "sliding_attention": "local"}


def _layer_kinds(model_type: str, layer_types: Any, num_layers: int) -> tuple[str, ...]:
    """``config.layer_types`` (``full_attention`` / ``sliding_attention``) as global / local."""
    kinds = tuple(layer_types)
    if len(kinds) != num_layers:
        raise ValueError(
            f"{model_type}: layer_types gives {len(kinds)} kinds for {num_layers} layers"
        )
    unknown = sorted(set(kinds) - set(_LAYER_KINDS))
    if unknown:
        raise ValueError(
            f"{model_type}: attention layer type {unknown[0]!r} is not supported; "
            f"supported: {', '.join(_LAYER_KINDS)}"
        )
    return tuple(_LAYER_KINDS[kind] for kind in kinds)


def _rope_parameters(d: Mapping[str, Any]) -> dict[str, Any]:
    """The RoPE dictionary: legacy ``rope_scaling`` wins over ``rope_parameters`` (as in
    ``transformers``), ``rope_theta`` and ``partial_rotary_factor`` may sit beside it."""
    parameters = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    for key in ("rope_theta", "partial_rotary_factor"):
        if key not in parameters and d.get(key) is not None:
            parameters[key] = d[key]
    return parameters


def _rope_scaling(
    model_type: str, parameters: Mapping[str, Any], d: Mapping[str, Any]
) -> tuple[RopeScaling | None, int | None]:
    """The :class:`RopeScaling` of a RoPE dictionary, and the longest exact context it
    allows (``None``: no limit beyond ``max_position_embeddings``).

    Raises a one-line ``ValueError`` naming an unsupported kind or a missing parameter.
    """
    kind = parameters.get("rope_type", parameters.get("type", "default"))
    if model_type == "phi3" and kind in ("su", "yarn"):  # Phi3Config's aliases of longrope
        kind = "longrope"
    if kind == "default":
        return None, None
    if kind not in SUPPORTED_ROPE_SCALING:
        raise ValueError(
            f"{model_type}: RoPE scaling {kind!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ROPE_SCALING)}"
        )

    def need(key: str) -> Any:
        if parameters.get(key) is None:
            raise ValueError(f"{model_type}: RoPE scaling {kind!r} needs {key!r} in rope_scaling")
        return parameters[key]

    context = int(d.get("max_position_embeddings", 2048))
    # transformers gives a top-level original_max_position_embeddings priority (Phi-3).
    original = int(
        d.get("original_max_position_embeddings")
        or parameters.get("original_max_position_embeddings")
        or context
    )
    factor = parameters.get("factor")
    if kind in ("yarn", "longrope") and factor is None:
        factor = context / original
    if kind == "longrope":
        scaling = RopeScaling(
            kind,
            factor=float(factor),
            original_context_length=original,
            attention_factor=parameters.get("attention_factor"),
            frequency_factors=tuple(float(f) for f in need("short_factor")),
        )
        # Past the original context transformers switches every position to long_factor.
        return scaling, original
    if kind == "yarn":
        return RopeScaling(
            kind,
            factor=float(factor),
            original_context_length=original,
            beta_fast=float(parameters.get("beta_fast") or 32),
            beta_slow=float(parameters.get("beta_slow") or 1),
            attention_factor=parameters.get("attention_factor"),
            mscale=parameters.get("mscale"),
            mscale_all_dim=parameters.get("mscale_all_dim"),
            truncate=bool(parameters.get("truncate", True)),
        ), None
    if kind == "llama3":
        return RopeScaling(
            kind,
            factor=float(need("factor")),
            original_context_length=original,
            low_freq_factor=float(need("low_freq_factor")),
            high_freq_factor=float(need("high_freq_factor")),
        ), None
    # linear, and dynamic NTK (plain RoPE within max_position_embeddings, see lmppl.lm.rope).
    return RopeScaling(kind, factor=float(need("factor"))), None


def _llama_config(d: Mapping[str, Any]) -> ModelConfig:
    model_type = d["model_type"]
    rope = _rope_parameters(d)
    scaling, rope_context = _rope_scaling(model_type, rope, d)
    if model_type in ("llama", "qwen3") and d.get("attention_bias", False):
        raise ValueError(
            f"{model_type}: attention_bias (biases on q/k/v and o_proj) is not supported"
        )
    if d.get("mlp_bias", False):
        raise ValueError(f"{model_type}: mlp_bias is not supported")
    hidden, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
    num_layers = int(d["num_hidden_layers"])
    context = int(d.get("max_position_embeddings", 2048))
    if rope_context is not None:
        context = min(context, rope_context)
    window = d.get("sliding_window")
    attention_layers: tuple[str, ...] = ()
    if model_type in ("mistral", "qwen2"):
        # A sliding window as long as the cache has no effect: cap the context instead.
        if model_type == "qwen2" and not d.get("use_sliding_window", False):
            window = None
        if window is not None:
            context = min(context, int(window))
    elif model_type == "qwen3" and d.get("use_sliding_window", False) and window is not None:
        first_sliding = int(d.get("max_window_layers", 28))
        layer_types = d.get("layer_types") or [
            "sliding_attention" if i >= first_sliding else "full_attention"
            for i in range(num_layers)
        ]
        attention_layers = _layer_kinds(model_type, layer_types, num_layers)
    elif model_type == "phi3" and window is not None:  # every layer slides (Phi-3-mini: 2047)
        attention_layers = ("local",) * num_layers
    head_dim = int(d.get("head_dim") or hidden // heads)
    return ModelConfig(
        architecture="llama",
        vocab_size=int(d["vocab_size"]),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        intermediate_size=int(d["intermediate_size"]),
        context_length=context,
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        rope_scaling=scaling,
        partial_rotary_factor=float(rope.get("partial_rotary_factor", 1.0)),
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        fused_projections=model_type == "phi3",
        attention_layers=attention_layers,
        window_size=int(window) if attention_layers else 256,
        activation=d.get("hidden_act", "silu"),
        bos_token_id=_token_id(d.get("bos_token_id")),
        eos_token_id=_token_id(d.get("eos_token_id")),
    )


def _gemma_rope(
    d: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """RoPE dictionaries of the global layers and (Gemma 3) of the sliding-window layers.

    Gemma 3 configs give them nested by layer type (``rope_parameters.full_attention``,
    ``.sliding_attention``) or, in older files, as ``rope_theta`` (default 1e6) with
    ``rope_scaling`` for the global layers and ``rope_local_base_freq`` (default 1e4).
    """
    if d["model_type"] != "gemma3_text":
        parameters = _rope_parameters(d)
        parameters.setdefault("rope_theta", 10000.0)
        return parameters, None
    nested = dict(d.get("rope_parameters") or {})
    if "full_attention" in nested or "sliding_attention" in nested:
        full = dict(nested.get("full_attention") or {})
        local = dict(nested.get("sliding_attention") or {})
        full.update(d.get("rope_scaling") or {})
    else:
        full = dict(d.get("rope_scaling") or {})
        local = {}
    full.setdefault("rope_theta", d.get("rope_theta", 1_000_000.0))
    local.setdefault("rope_theta", d.get("rope_local_base_freq", 10_000.0))
    return full, local


def _gemma_config(d: Mapping[str, Any]) -> ModelConfig:
    model_type = d["model_type"]
    if d.get("use_bidirectional_attention"):
        raise ValueError(f"{model_type}: use_bidirectional_attention is not supported")
    if d.get("attention_bias", False):
        raise ValueError(f"{model_type}: attention_bias is not supported")
    hidden, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
    num_layers = int(d["num_hidden_layers"])
    head_dim = int(d.get("head_dim") or 256)
    global_rope, local_rope = _gemma_rope(d)
    scaling, rope_context = _rope_scaling(model_type, global_rope, d)
    local_scaling, local_context = None, None
    if local_rope is not None:
        local_scaling, local_context = _rope_scaling(model_type, local_rope, d)
    context = int(d.get("max_position_embeddings", 8192))
    for limit in (rope_context, local_context):
        if limit is not None:
            context = min(context, limit)
    attention_layers: tuple[str, ...] = ()
    if model_type == "gemma2":
        layer_types = d.get("layer_types") or [
            "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)
        ]
        attention_layers = _layer_kinds(model_type, layer_types, num_layers)
    elif model_type == "gemma3_text":
        pattern = int(d.get("sliding_window_pattern") or 6)
        layer_types = d.get("layer_types") or [
            "sliding_attention" if (i + 1) % pattern else "full_attention"
            for i in range(num_layers)
        ]
        attention_layers = _layer_kinds(model_type, layer_types, num_layers)
    window = d.get("sliding_window", 4096)
    if "local" in attention_layers and window is None:
        raise ValueError(f"{model_type}: sliding-window layers without a sliding_window")
    softcaps = {"gemma2": (50.0, 30.0), "gemma3_text": (None, None), "gemma": (None, None)}
    attention_softcap, final_softcap = softcaps[model_type]
    if model_type == "gemma2":
        attention_softcap = d.get("attn_logit_softcapping", attention_softcap)
    # transformers' Gemma 3 attention ignores attn_logit_softcapping; lmppl does too.
    if model_type != "gemma":
        final_softcap = d.get("final_logit_softcapping", final_softcap)
    scalar = d.get("query_pre_attn_scalar", 256) if model_type != "gemma" else head_dim
    activation = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    if activation == "gelu":  # GemmaConfig's legacy value, meant as the tanh approximation
        activation = "gelu_pytorch_tanh"
    return ModelConfig(
        architecture="gemma",
        vocab_size=int(d["vocab_size"]),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        intermediate_size=int(d["intermediate_size"]),
        context_length=context,
        rope_theta=float(global_rope["rope_theta"]),
        rope_scaling=scaling,
        partial_rotary_factor=float(global_rope.get("partial_rotary_factor", 1.0)),
        local_rope_theta=None if local_rope is None else float(local_rope["rope_theta"]),
        local_rope_scaling=local_scaling,
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        activation=activation,
        attention_layers=attention_layers,
        window_size=int(window) if attention_layers else 256,
        qk_norm=model_type == "gemma3_text",
        norm_weight_offset=1.0,
        embedding_multiplier=hidden**0.5,
        feedforward_norms=model_type != "gemma",
        query_scale=float(scalar) ** -0.5,
        attention_softcap=None if attention_softcap is None else float(attention_softcap),
        final_logit_softcap=None if final_softcap is None else float(final_softcap),
        bos_token_id=_token_id(d.get("bos_token_id")),
        eos_token_id=_token_id(d.get("eos_token_id")),
    )


def _gpt2_config(d: Mapping[str, Any]) -> ModelConfig:
    if d.get("scale_attn_by_inverse_layer_idx", False):
        raise ValueError("gpt2: scale_attn_by_inverse_layer_idx is not supported")
    if not d.get("scale_attn_weights", True):
        raise ValueError("gpt2: scale_attn_weights=false is not supported")
    hidden, heads = int(d["n_embd"]), int(d["n_head"])
    return ModelConfig(
        architecture="gpt2",
        vocab_size=int(d["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(d["n_layer"]),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=int(d.get("n_inner") or 4 * hidden),
        context_length=int(d["n_positions"]),
        norm_eps=float(d.get("layer_norm_epsilon", 1e-5)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        activation=d.get("activation_function", "gelu_new"),
        bos_token_id=_token_id(d.get("bos_token_id")),
        eos_token_id=_token_id(d.get("eos_token_id")),
    )


def _gpt_neo_attention_layers(d: Mapping[str, Any]) -> tuple[str, ...]:
    """``attention_types`` ``[[["global", "local"], 12]]`` expanded to one kind per layer."""
    if d.get("attention_layers"):
        return tuple(d["attention_layers"])
    kinds: list[str] = []
    for pattern, repeats in d.get("attention_types") or [[["global", "local"], 12]]:
        kinds.extend(list(pattern) * int(repeats))
    return tuple(kinds)


def _gpt_neo_config(d: Mapping[str, Any]) -> ModelConfig:
    hidden, heads = int(d["hidden_size"]), int(d["num_heads"])
    num_layers = int(d["num_layers"])
    attention_layers = _gpt_neo_attention_layers(d)
    if len(attention_layers) != num_layers:
        raise ValueError(
            f"gpt_neo: attention_types give {len(attention_layers)} layer kinds "
            f"for num_layers={num_layers}"
        )
    return ModelConfig(
        architecture="gpt_neo",
        vocab_size=int(d["vocab_size"]),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=int(d.get("intermediate_size") or 4 * hidden),
        context_length=int(d["max_position_embeddings"]),
        norm_eps=float(d.get("layer_norm_epsilon", 1e-5)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        activation=d.get("activation_function", "gelu_new"),
        attention_layers=attention_layers,
        window_size=int(d.get("window_size", 256)),
        bos_token_id=_token_id(d.get("bos_token_id")),
        eos_token_id=_token_id(d.get("eos_token_id")),
    )
