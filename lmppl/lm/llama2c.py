"""Reader for llama2.c ``.bin`` checkpoints (Karpathy's legacy export, version 0).

Layout (little-endian): a header of 7 int32 ``dim, hidden_dim, n_layers, n_heads,
n_kv_heads, vocab_size, seq_len``, then float32 arrays in this order::

    token_embedding [V, H]; rms_att [L, H]; wq [L, Hq*D, H]; wk [L, Hkv*D, H];
    wv [L, Hkv*D, H]; wo [L, H, Hq*D]; rms_ffn [L, H]; w1 [L, F, H]; w2 [L, H, F];
    w3 [L, F, H]; rms_final [H]; two legacy RoPE tables of seq_len * D / 2 floats each;
    output [V, H] only when the header's vocab_size is negative (untied).

llama2.c rotates adjacent pairs ``(2i, 2i+1)`` of each head (interleaved RoPE); Hugging Face
Llama rotates the two halves ``(i, i + D/2)``. :func:`interleaved_to_half_split` permutes
the rows of ``wq``/``wk`` within each head so the half-split network computes the same
function (it is the permutation of Hugging Face's ``convert_llama_weights_to_hf``).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from lmppl.lm.config import ModelConfig

__all__ = ["Llama2cHeader", "interleaved_to_half_split", "read_llama2c"]

_HEADER_FIELDS = 7
_HEADER_BYTES = 4 * _HEADER_FIELDS
# llama2.c's newer exports (version >= 1) start with the magic "ak42".
_VERSIONED_MAGIC = 0x616B3432


class Llama2cHeader(NamedTuple):
    """The 7 int32 of a llama2.c checkpoint header (``vocab_size`` as stored: negative
    means an untied output matrix follows the other weights)."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int


def interleaved_to_half_split(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Reorder the rows of a q/k projection from interleaved RoPE pairs to half-split.

    Within each head of width ``D``, output row ``2i + j`` (pair ``i``, component ``j``) moves
    to row ``j * D/2 + i``.

    Args:
      weight: ``[num_heads * D, in_features]`` projection, rows grouped by head.
      num_heads: heads in the projection (the key/value head count for ``wk``).

    Returns:
      ``[num_heads * D, in_features]``, the same rows permuted.
    """
    rows, columns = weight.shape
    half = rows // num_heads // 2
    if half * 2 * num_heads != rows:
        raise ValueError(f"{rows} rows do not split into {num_heads} heads of even width")
    return weight.reshape(num_heads, half, 2, columns).swapaxes(1, 2).reshape(rows, columns)


def _header_error(header: Llama2cHeader) -> str | None:
    """Why the header cannot describe a Llama, or ``None``."""
    if min(header.dim, header.hidden_dim, header.n_layers, header.n_heads, header.n_kv_heads) <= 0:
        return f"non-positive sizes in header {tuple(header)}"
    if header.vocab_size == 0 or header.seq_len <= 0:
        return f"bad vocab_size or seq_len in header {tuple(header)}"
    if header.dim % header.n_heads:
        return f"dim {header.dim} is not a multiple of n_heads {header.n_heads}"
    if (header.dim // header.n_heads) % 2:
        return f"odd head size {header.dim // header.n_heads} (RoPE needs pairs)"
    if header.n_heads % header.n_kv_heads:
        return f"n_heads {header.n_heads} is not a multiple of n_kv_heads {header.n_kv_heads}"
    return None


def _array_shapes(header: Llama2cHeader) -> list[tuple[str, tuple[int, ...]]]:
    """Every float32 array in file order, named by its llama2.c name, with its shape."""
    dim, hidden, layers = header.dim, header.hidden_dim, header.n_layers
    vocab = abs(header.vocab_size)
    head_size = dim // header.n_heads
    q_rows, kv_rows = header.n_heads * head_size, header.n_kv_heads * head_size
    shapes = [
        ("token_embedding", (vocab, dim)),
        ("rms_att", (layers, dim)),
        ("wq", (layers, q_rows, dim)),
        ("wk", (layers, kv_rows, dim)),
        ("wv", (layers, kv_rows, dim)),
        ("wo", (layers, dim, q_rows)),
        ("rms_ffn", (layers, dim)),
        ("w1", (layers, hidden, dim)),
        ("w2", (layers, dim, hidden)),
        ("w3", (layers, hidden, dim)),
        ("rms_final", (dim,)),
        ("rope_real", (header.seq_len * head_size // 2,)),
        ("rope_imaginary", (header.seq_len * head_size // 2,)),
    ]
    if header.vocab_size < 0:
        shapes.append(("output", (vocab, dim)))
    return shapes


def read_llama2c(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Read a llama2.c checkpoint as a config and Hugging Face ``LlamaForCausalLM`` tensors.

    Args:
      path: the ``.bin`` file.

    Returns:
      ``(config, tensors)``: ``tensors`` maps Hugging Face names (``model.embed_tokens.weight``
      ``[V, H]``, ``model.layers.{i}.self_attn.q_proj.weight`` ``[Hq*D, H]`` in half-split RoPE
      layout, ..., ``lm_head.weight`` only when untied) to float32 arrays.

    Raises:
      FileNotFoundError: no such file.
      ValueError: the header is inconsistent or the file size disagrees with it.
    """
    path = os.fspath(path)
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no llama2.c checkpoint at {path}")
    file_bytes = os.path.getsize(path)
    if file_bytes < _HEADER_BYTES:
        raise ValueError(f"{name}: truncated llama2.c checkpoint ({file_bytes} bytes, no header)")
    header_values = np.fromfile(path, dtype="<i4", count=_HEADER_FIELDS)
    if int(header_values[0]) & 0xFFFFFFFF == _VERSIONED_MAGIC:
        raise ValueError(
            f"{name}: llama2.c export version >= 1 ('ak42' magic) is not supported; "
            "export with the legacy (version 0) format"
        )
    header = Llama2cHeader(*(int(value) for value in header_values))
    problem = _header_error(header)
    if problem:
        raise ValueError(f"{name}: inconsistent llama2.c checkpoint: {problem}")
    shapes = _array_shapes(header)
    expected_bytes = _HEADER_BYTES + 4 * sum(int(np.prod(shape)) for _, shape in shapes)
    if file_bytes != expected_bytes:
        kind = "truncated" if file_bytes < expected_bytes else "oversized"
        tying = "untied" if header.vocab_size < 0 else "tied"
        raise ValueError(
            f"{name}: {kind} llama2.c checkpoint: header {tuple(header)} ({tying} output) "
            f"needs {expected_bytes} bytes, the file has {file_bytes}"
        )
    flat = np.fromfile(path, dtype="<f4", offset=_HEADER_BYTES).astype(np.float32, copy=False)
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for array_name, shape in shapes:
        size = int(np.prod(shape))
        arrays[array_name] = flat[offset : offset + size].reshape(shape)
        offset += size

    config = ModelConfig(
        architecture="llama",
        vocab_size=abs(header.vocab_size),
        hidden_size=header.dim,
        num_layers=header.n_layers,
        num_heads=header.n_heads,
        num_kv_heads=header.n_kv_heads,
        head_dim=header.dim // header.n_heads,
        intermediate_size=header.hidden_dim,
        context_length=header.seq_len,
        rope_theta=10000.0,
        norm_eps=1e-5,
        tie_word_embeddings=header.vocab_size > 0,
        bos_token_id=1,
        eos_token_id=2,
    )
    tensors = {"model.embed_tokens.weight": arrays["token_embedding"]}
    for layer in range(header.n_layers):
        prefix = f"model.layers.{layer}"
        tensors[f"{prefix}.input_layernorm.weight"] = arrays["rms_att"][layer]
        tensors[f"{prefix}.self_attn.q_proj.weight"] = interleaved_to_half_split(
            arrays["wq"][layer], header.n_heads
        )
        tensors[f"{prefix}.self_attn.k_proj.weight"] = interleaved_to_half_split(
            arrays["wk"][layer], header.n_kv_heads
        )
        tensors[f"{prefix}.self_attn.v_proj.weight"] = arrays["wv"][layer]
        tensors[f"{prefix}.self_attn.o_proj.weight"] = arrays["wo"][layer]
        tensors[f"{prefix}.post_attention_layernorm.weight"] = arrays["rms_ffn"][layer]
        tensors[f"{prefix}.mlp.gate_proj.weight"] = arrays["w1"][layer]
        tensors[f"{prefix}.mlp.down_proj.weight"] = arrays["w2"][layer]
        tensors[f"{prefix}.mlp.up_proj.weight"] = arrays["w3"][layer]
    tensors["model.norm.weight"] = arrays["rms_final"]
    if header.vocab_size < 0:
        tensors["lm_head.weight"] = arrays["output"]
    return config, tensors
