"""Reshaping a loaded decoder: its first k blocks only, or its blocks scanned.

``truncated(lm, k)`` keeps the embedding, the first ``k`` transformer blocks, the final
norm and the output head of ``lm`` (the parameters are shared, not copied). It is a
language model over the same vocabulary, cheaper per step by about ``k / L``, and a
natural draft proposal for ``SMC(..., proposal=...)`` when no smaller sibling exists
(early-exit / layer-skip drafting).

``scanned(lm)`` is the same model with its ``L`` blocks stacked into one
:class:`~lmppl.lm.layers.LayerStack` (parameters ``[L, ...]``, cache ``[B, L, T, H_kv, D]``)
and applied by ``jax.lax.scan``: XLA compiles one block body instead of ``L``, so the
compilation of a deep model is several times faster; on CPU each layer's weights and
cache slot are copied out of the stacked buffers at every call, so a decoding step can be
slower (see benchmarks/RESULTS.md, "Compile once"). The logits agree with the unrolled
model's to float32 round-off.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from lmppl.lm.base import LanguageModel
from lmppl.lm.layers import LayerStack

__all__ = ["scanned", "truncated"]

_BLOCK_LISTS = ("layers", "h")  # Llama / Gemma; GPT-2 / GPT-Neo


def truncated(lm: LanguageModel, num_layers: int) -> LanguageModel:
    """``lm`` with only its first ``num_layers`` blocks (``1 <= num_layers <= L``)."""
    total = lm.config.num_layers
    if isinstance(num_layers, bool) or not isinstance(num_layers, int):
        raise TypeError(f"num_layers must be an integer, got {num_layers!r}")
    if not 1 <= num_layers <= total:
        raise ValueError(
            f"num_layers must be between 1 and {total} for {lm.name}, got {num_layers}"
        )
    network = lm.network()
    blocks = _block_list(lm, network, "truncate")
    kinds = lm.config.attention_layers
    config = dataclasses.replace(
        lm.config, num_layers=num_layers, attention_layers=kinds[:num_layers] if kinds else kinds
    )
    layers = getattr(network, blocks)
    if isinstance(layers, LayerStack):  # parameters [L, ...] sliced to their first rows
        setattr(network, blocks, layers.truncated(num_layers))
    else:
        setattr(network, blocks, nnx.List(list(layers)[:num_layers]))
    network.config = config  # type: ignore[attr-defined]  # every lmppl network has one
    return LanguageModel(network, config, lm.tokenizer, f"{lm.name}[:{num_layers} layers]")


def scanned(lm: LanguageModel) -> LanguageModel:
    """``lm`` with its blocks stacked and applied by ``jax.lax.scan`` (compiled once).

    The parameters are copied into ``[L, ...]`` stacks (the result does not share them with
    ``lm``); its caches are ``[B, L, T, H_kv, D]`` (:meth:`LanguageModel.init_cache` of the
    result makes them). A model that is already scanned is returned as is.
    """
    network = lm.network()
    blocks = _block_list(lm, network, "scan")
    layers = getattr(network, blocks)
    if isinstance(layers, LayerStack):
        return lm
    setattr(network, blocks, LayerStack.from_blocks(list(layers)))
    return LanguageModel(network, lm.config, lm.tokenizer, lm.name)


def _block_list(lm: LanguageModel, network: nnx.Module, verb: str) -> str:
    """The attribute holding ``network``'s blocks, or a one-line ``ValueError``."""
    blocks = next((name for name in _BLOCK_LISTS if hasattr(network, name)), None)
    if blocks is None:
        raise ValueError(
            f"cannot {verb} {lm.name} ({lm.config.architecture}): its network has no block "
            f"list ({' or '.join(_BLOCK_LISTS)})"
        )
    return blocks
