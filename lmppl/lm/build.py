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

from lmppl.lm.config import SUPPORTED_ARCHITECTURES, ModelConfig
from lmppl.lm.gpt2 import GPT2Network
from lmppl.lm.gpt_neo import GPTNeoNetwork
from lmppl.lm.layers import ACTIVATIONS
from lmppl.lm.llama import LlamaNetwork

__all__ = ["SUPPORTED_MODEL_TYPES", "TensorTable", "build_network", "config_from_hf"]

NETWORKS = {"llama": LlamaNetwork, "gpt2": GPT2Network, "gpt_neo": GPTNeoNetwork}

# Hugging Face ``model_type`` -> lmppl architecture.
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "gpt2": "gpt2",
    "gpt_neo": "gpt_neo",
}

# Base-model checkpoints (``LlamaModel``, ``GPT2Model``) omit the causal-LM wrapper's prefix.
WRAPPER_PREFIXES = ("model.", "transformer.")


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
        if not isinstance(tensor, np.ndarray | jax.Array):
            tensor = np.asarray(tensor)
        array = jnp.asarray(tensor, dtype=self.dtype)
        bad = int(jnp.size(array) - jnp.count_nonzero(jnp.isfinite(array)))
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

    Supports ``model_type`` llama, mistral, qwen2 (all the ``"llama"`` architecture),
    gpt2 and gpt_neo. Features that would change the maths but are not implemented
    (RoPE scaling, Llama's output-projection and MLP biases, GPT-2's per-layer score
    scaling, sliding windows shorter than the context) raise a one-line ``ValueError``.
    """
    model_type = config_dict.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported model type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    architecture = SUPPORTED_MODEL_TYPES[model_type]
    reader = {"llama": _llama_config, "gpt2": _gpt2_config, "gpt_neo": _gpt_neo_config}
    return reader[architecture](config_dict)


def _token_id(value: Any) -> int | None:
    """A special-token id from ``config.json`` (some configs give a list; take the first)."""
    if isinstance(value, list | tuple):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def _llama_config(d: Mapping[str, Any]) -> ModelConfig:
    model_type = d["model_type"]
    rope = dict(d.get("rope_parameters") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = d.get("rope_scaling")
    if rope_type != "default" or scaling:
        kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", rope_type))
        raise ValueError(f"{model_type}: RoPE scaling {kind!r} is not supported")
    if model_type == "llama" and d.get("attention_bias", False):
        raise ValueError("llama: attention_bias (biases on q/k/v and o_proj) is not supported")
    if d.get("mlp_bias", False):
        raise ValueError(f"{model_type}: mlp_bias is not supported")
    hidden, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
    context = int(d.get("max_position_embeddings", 2048))
    # A sliding window as long as the cache has no effect: cap the context instead.
    window = d.get("sliding_window")
    if model_type == "qwen2" and not d.get("use_sliding_window", False):
        window = None
    if window is not None:
        context = min(context, int(window))
    return ModelConfig(
        architecture="llama",
        vocab_size=int(d["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(d["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=int(d.get("head_dim") or hidden // heads),
        intermediate_size=int(d["intermediate_size"]),
        context_length=context,
        rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2",
        activation=d.get("hidden_act", "silu"),
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
