"""A cheap draft of a decoder: the same model with only its first k blocks.

``truncated(lm, k)`` keeps the embedding, the first ``k`` transformer blocks, the final
norm and the output head of ``lm`` (the parameters are shared, not copied). It is a
language model over the same vocabulary, cheaper per step by about ``k / L``, and a
natural draft proposal for ``SMC(..., proposal=...)`` when no smaller sibling exists
(early-exit / layer-skip drafting).
"""

from __future__ import annotations

import dataclasses

from lmppl.lm.base import LanguageModel

__all__ = ["truncated"]

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
    blocks = next((name for name in _BLOCK_LISTS if hasattr(network, name)), None)
    if blocks is None:
        raise ValueError(
            f"cannot truncate {lm.name} ({lm.config.architecture}): its network has no block "
            f"list ({' or '.join(_BLOCK_LISTS)})"
        )
    kinds = lm.config.attention_layers
    config = dataclasses.replace(
        lm.config, num_layers=num_layers, attention_layers=kinds[:num_layers] if kinds else kinds
    )
    # The blocks are a LayerStack: parameters [L, ...] sliced to their first num_layers rows.
    setattr(network, blocks, getattr(network, blocks).truncated(num_layers))
    network.config = config  # type: ignore[attr-defined]  # every lmppl network has one
    return LanguageModel(network, config, lm.tokenizer, f"{lm.name}[:{num_layers} layers]")
