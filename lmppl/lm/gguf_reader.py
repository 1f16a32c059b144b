"""Reader for GGUF files (llama.cpp's format): config, dequantized tensors, tokenizer.

The file's header is walked by :func:`lmppl.lm.gguf_file.read_gguf_file` (memory-mapped;
PyPI ``gguf``'s :class:`gguf.GGUFReader` for the files it leaves, and for
:func:`read_gguf_metadata`) and every tensor is dequantized to float32 with :func:`gguf.quants.dequantize` (F32, F16, BF16, Q4_0,
Q4_1, Q5_0, Q5_1, Q8_0, the K-quants, ...). llama.cpp's names are mapped to the Hugging Face
``LlamaForCausalLM`` names, and the Q/K row permutation llama.cpp's converter applies to
the ``llama`` architecture (``permute`` in ``convert_hf_to_gguf.py``: half-split rows to
interleaved RoPE pairs) is undone, so the tensors fit the half-split networks of
:mod:`lmppl.lm.llama`. Qwen2 and Qwen3 files (NEOX-style RoPE) are stored half-split
already; Qwen3's per-head q/k norms are ``attn_q_norm`` / ``attn_k_norm``. Phi-3 (also
NEOX-style) keeps its fused ``attn_qkv`` and ``ffn_up`` (= ``gate_up_proj``), may rotate
part of each head (``rope.dimension_count``) and stores LongRoPE as
``rope_factors_short`` / ``rope_factors_long`` tensors. Llama 3.1+
files carry their RoPE scaling as per-frequency divisors (``rope_freqs.weight``), which
become :class:`~lmppl.lm.config.RopeScaling` ``"rope_freqs"``.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from lmppl.lm.base import Tokenizer
from lmppl.lm.config import ModelConfig, RopeScaling
from lmppl.lm.gguf_file import GGUFLayoutError, read_gguf_file
from lmppl.lm.llama2c import interleaved_to_half_split
from lmppl.lm.tokenizers import tokenizer_from_gguf_metadata

__all__ = [
    "SUPPORTED_GGUF_ARCHITECTURES",
    "gguf_tensor_name_to_hf",
    "read_gguf",
    "read_gguf_metadata",
]

SUPPORTED_GGUF_ARCHITECTURES: tuple[str, ...] = ("llama", "qwen2", "qwen3", "phi3")
# Only llama.cpp's "llama" architecture has its q/k rows permuted to interleaved RoPE pairs.
_PERMUTED_ARCHITECTURES = ("llama",)

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Phi-3 keeps Hugging Face's fused projections: attn_qkv = [W_q; W_k; W_v] and
# ffn_up = gate_up_proj = [W_gate; W_up].
_FUSED_BLOCK_NAMES = dict(_BLOCK_NAMES, attn_qkv="self_attn.qkv_proj", ffn_up="mlp.gate_up_proj")
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# llama.cpp's LongRoPE divisors (Phi-3.5, Phi-4-mini); not Hugging Face tensors.
_ROPE_FACTOR_TENSORS = ("rope_factors_short.weight", "rope_factors_long.weight")


def gguf_tensor_name_to_hf(name: str, architecture: str = "llama") -> str:
    """The Hugging Face name of a llama.cpp tensor (``blk.3.attn_q.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``; Phi-3's ``blk.3.attn_qkv.weight`` ->
    ``model.layers.3.self_attn.qkv_proj.weight``); ``ValueError`` for names it does not know."""
    block = _BLOCK_TENSOR.fullmatch(name)
    names = _FUSED_BLOCK_NAMES if architecture == "phi3" else _BLOCK_NAMES
    if block and block.group(2) in names:
        layer, part, kind = block.groups()
        return f"model.layers.{layer}.{names[part]}.{kind}"
    stem, _, kind = name.rpartition(".")
    if stem in _GLOBAL_NAMES and kind in ("weight", "bias"):
        return f"{_GLOBAL_NAMES[stem]}.{kind}"
    raise ValueError(f"unsupported GGUF tensor {name!r} for a llama model")


def _field_value(field: Any) -> Any:
    """A GGUF metadata field as a plain Python value (str, int, float, bool or list)."""
    import gguf

    kinds = field.types
    if kinds[0] == gguf.GGUFValueType.ARRAY:
        if len(kinds) > 1 and kinds[1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        if len(kinds) > 1 and kinds[1] == gguf.GGUFValueType.ARRAY:
            return [field.parts[i] for i in field.data]
        if not field.data:
            return []
        return np.concatenate([field.parts[i] for i in field.data]).tolist()
    if kinds[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    value = field.parts[field.data[0]][0]
    if kinds[0] == gguf.GGUFValueType.BOOL:
        return bool(value)
    if kinds[0] == gguf.GGUFValueType.FLOAT32:
        # The shortest decimal that is this float32: 1e-05, not 9.999999747378752e-06.
        return float(np.format_float_positional(value, unique=True, trim="-"))
    return value.item()


def read_gguf_metadata(reader: Any) -> dict[str, Any]:
    """Every key/value of an open :class:`gguf.GGUFReader` as plain Python values."""
    return {key: _field_value(field) for key, field in reader.fields.items()}


def _config_from_metadata(metadata: dict[str, Any], name: str) -> ModelConfig:
    architecture = metadata.get("general.architecture")
    if architecture not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(
            f"{name}: GGUF architecture {architecture!r} is not supported; supported: "
            + ", ".join(SUPPORTED_GGUF_ARCHITECTURES)
        )

    def get(key: str, default: Any = None) -> Any:
        value = metadata.get(f"{architecture}.{key}", default)
        if value is None:
            raise ValueError(f"{name}: GGUF metadata lacks {architecture}.{key}")
        return value

    scaling = metadata.get(f"{architecture}.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ValueError(f"{name}: RoPE scaling {scaling!r} is not supported")
    hidden = int(get("embedding_length"))
    num_heads = int(get("attention.head_count"))
    num_layers = int(get("block_count"))
    head_dim = int(get("attention.key_length", hidden // num_heads))
    rotary_dim = int(get("rope.dimension_count", head_dim))
    if rotary_dim != head_dim and architecture != "phi3":
        raise ValueError(f"{name}: partial rotary embeddings are only supported for phi3")
    window = metadata.get(f"{architecture}.attention.sliding_window")
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab_size = len(tokens) if tokens is not None else int(get("vocab_size"))
    return ModelConfig(
        architecture="llama",
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(get("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        intermediate_size=int(get("feed_forward_length")),
        context_length=int(get("context_length")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        qk_norm=architecture == "qwen3",
        fused_projections=architecture == "phi3",
        partial_rotary_factor=rotary_dim / head_dim,
        attention_layers=("local",) * num_layers if window else (),
        window_size=int(window) if window else 256,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
    )


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> shape for a llama config (weights only; biases checked apart)."""
    hidden, head_dim = config.hidden_size, config.head_dim
    q_rows, kv_rows = config.num_heads * head_dim, config.num_kv_heads * head_dim
    shapes = {
        "model.embed_tokens.weight": (config.vocab_size, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (config.vocab_size, hidden),
    }
    inner = config.intermediate_size
    for layer in range(config.num_layers):
        prefix = f"model.layers.{layer}"
        shapes[f"{prefix}.input_layernorm.weight"] = (hidden,)
        if config.fused_projections:
            shapes[f"{prefix}.self_attn.qkv_proj.weight"] = (q_rows + 2 * kv_rows, hidden)
        else:
            shapes |= {
                f"{prefix}.self_attn.q_proj.weight": (q_rows, hidden),
                f"{prefix}.self_attn.k_proj.weight": (kv_rows, hidden),
                f"{prefix}.self_attn.v_proj.weight": (kv_rows, hidden),
            }
        shapes |= {
            f"{prefix}.self_attn.o_proj.weight": (hidden, q_rows),
            f"{prefix}.post_attention_layernorm.weight": (hidden,),
        }
        if config.fused_projections:
            shapes[f"{prefix}.mlp.gate_up_proj.weight"] = (2 * inner, hidden)
        else:
            shapes |= {
                f"{prefix}.mlp.gate_proj.weight": (inner, hidden),
                f"{prefix}.mlp.up_proj.weight": (inner, hidden),
            }
        shapes[f"{prefix}.mlp.down_proj.weight"] = (hidden, inner)
        if config.qk_norm:
            shapes[f"{prefix}.self_attn.q_norm.weight"] = (head_dim,)
            shapes[f"{prefix}.self_attn.k_norm.weight"] = (head_dim,)
    return shapes


def _dequantize(tensor: Any, name: str) -> np.ndarray:
    """A GGUF tensor as a float32 array in NumPy (row-major, ``[out, in]``) order."""
    from gguf import quants

    try:
        values = quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as error:
        raise ValueError(
            f"{name}: tensor {tensor.name} has type {tensor.tensor_type.name}, "
            "which gguf cannot dequantize"
        ) from error
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return np.array(values, dtype=np.float32).reshape(shape)


def read_gguf(
    path: str | os.PathLike,
) -> tuple[ModelConfig, dict[str, np.ndarray], Tokenizer]:
    """Read a llama, qwen2, qwen3 or phi3 GGUF file as a config, Hugging Face tensors and
    its tokenizer.

    Args:
      path: the ``.gguf`` file.

    Returns:
      ``(config, tensors, tokenizer)``: float32 tensors named as in ``LlamaForCausalLM``
      (``model.layers.{i}.self_attn.q_proj.weight`` ``[Hq*D, H]`` in half-split RoPE layout,
      ...; no ``lm_head.weight`` when the file has no ``output.weight``, i.e. tied), and the
      tokenizer from the file's ``tokenizer.ggml.*`` metadata.

    Raises:
      FileNotFoundError: no such file.
      ValueError: not a GGUF file, unsupported architecture, tensor type or tokenizer, or
        tensors whose shapes disagree with the metadata.
    """
    import gguf

    path = os.fspath(path)
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GGUF file at {path}")
    truncated = (
        f"{name}: truncated GGUF file ({os.path.getsize(path)} bytes): its tensor data "
        "ends before the sizes its header declares (an interrupted download or copy?)"
    )
    try:
        walked = read_gguf_file(path)  # fast; None: a file left to gguf.GGUFReader
    except GGUFLayoutError as error:
        if "truncated" in str(error):
            raise ValueError(truncated) from None
        raise ValueError(f"{name}: not a readable GGUF file ({error})") from None
    if walked is not None:
        metadata, file_tensors = walked
    else:
        try:
            reader = gguf.GGUFReader(path)
        except (ValueError, OSError, IndexError) as error:
            if "cannot reshape" in str(error):  # the tensor data ends before its size
                raise ValueError(truncated) from None
            raise ValueError(f"{name}: not a readable GGUF file ({error})") from None
        metadata, file_tensors = read_gguf_metadata(reader), reader.tensors
    config = _config_from_metadata(metadata, name)
    permuted = metadata["general.architecture"] in _PERMUTED_ARCHITECTURES

    architecture = metadata["general.architecture"]
    tensors: dict[str, np.ndarray] = {}
    for tensor in file_tensors:
        if tensor.name == "rope_freqs.weight":  # llama3 RoPE scaling as frequency divisors
            factors = tuple(float(f) for f in _dequantize(tensor, name).reshape(-1))
            config = config.replace(
                rope_scaling=RopeScaling("rope_freqs", frequency_factors=factors)
            )
            continue
        if tensor.name in _ROPE_FACTOR_TENSORS:
            if tensor.name == "rope_factors_short.weight":
                config = _longrope_config(config, metadata, _dequantize(tensor, name), name)
            continue
        try:
            hf_name = gguf_tensor_name_to_hf(tensor.name, architecture)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None
        values = _dequantize(tensor, name)
        if permuted and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            values = _undo_llama_cpp_permutation(values, config.num_heads)
        elif permuted and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            values = _undo_llama_cpp_permutation(values, config.num_kv_heads)
        tensors[hf_name] = values

    config = config.replace(
        tie_word_embeddings="lm_head.weight" not in tensors,
        attention_bias="model.layers.0.self_attn.q_proj.bias" in tensors,
    )
    expected = _expected_shapes(config)
    if config.tie_word_embeddings:
        del expected["lm_head.weight"]
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{name}: GGUF file lacks {len(missing)} tensors, e.g. {missing[0]}")
    for hf_name, shape in expected.items():
        if tensors[hf_name].shape != shape:
            raise ValueError(
                f"{name}: tensor {hf_name} has shape {tensors[hf_name].shape}, "
                f"the metadata implies {shape}"
            )
    tokenizer = tokenizer_from_gguf_metadata(metadata)
    tokenizer.name = name
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(
            f"{name}: tokenizer of {tokenizer.vocab_size} tokens for a model of {config.vocab_size}"
        )
    return config, tensors, tokenizer


def _longrope_config(
    config: ModelConfig, metadata: dict[str, Any], short_factors: np.ndarray, name: str
) -> ModelConfig:
    """Phi-3's LongRoPE from ``rope_factors_short`` and the ``rope.scaling.*`` metadata.

    As for Hugging Face checkpoints (:mod:`lmppl.lm.rope`), only the short factors are
    exact -- for sequences within the original context, to which the context is capped.
    """
    architecture = metadata["general.architecture"]
    original = metadata.get(f"{architecture}.rope.scaling.original_context_length")
    if original is None:
        raise ValueError(
            f"{name}: rope_factors_short without {architecture}.rope.scaling.original_context_length"
        )
    scaling = RopeScaling(
        "longrope",
        factor=config.context_length / int(original),
        original_context_length=int(original),
        attention_factor=metadata.get(f"{architecture}.rope.scaling.attn_factor"),
        frequency_factors=tuple(float(f) for f in short_factors.reshape(-1)),
    )
    return config.replace(
        rope_scaling=scaling, context_length=min(config.context_length, int(original))
    )


def _undo_llama_cpp_permutation(values: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp stores q/k rows as interleaved RoPE pairs; restore half-split order."""
    if values.ndim == 1:
        return interleaved_to_half_split(values[:, None], num_heads)[:, 0]
    return interleaved_to_half_split(values, num_heads)
