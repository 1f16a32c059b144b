"""Gemma 2 and Gemma 3 (text) as a Flax NNX network.

The Llama block with Gemma's choices: every RMSNorm multiplies by ``1 + w``
(``config.norm_weight_offset``), token embeddings are scaled by ``sqrt(H)``, and the
attention output and the MLP are each wrapped in a second norm ("sandwich" norms):

    h <- h + n_post_attn(Attention(n_in(h)))
    h <- h + n_post_ffw(W_down (gelu(W_gate n_pre_ffw(h)) * W_up n_pre_ffw(h)))

and ``logits = c tanh(W_out n(h) / c)`` when ``config.final_logit_softcap`` is ``c`` (Gemma 2).
Attention (:class:`lmppl.lm.llama.LlamaAttention`) scores are scaled by
``query_pre_attn_scalar^-1/2`` and soft-capped in Gemma 2; Gemma 3 normalises query and key
heads instead. Layers alternate between a sliding window (``"local"``) and global attention
(Gemma 2: every other layer; Gemma 3: five local then one global), and Gemma 3's local layers
use their own RoPE base (``config.local_rope_theta``). The window is a mask on lmppl's
full-length cache, so sequences longer than the window are exact. Scanned
(:func:`lmppl.lm.scanned`), the local/global pattern is a per-layer flag array scanned with
the parameters (one compiled block body for both kinds). Tensors are named as in
``transformers``' ``Gemma2ForCausalLM`` / ``Gemma3ForCausalLM`` state dicts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lmppl.lm.base import KVCache, LMOutput
from lmppl.lm.config import ModelConfig
from lmppl.lm.layers import (
    Embedding,
    LayerStack,
    ParameterSource,
    RMSNorm,
    empty_cache,
    next_cache,
    run_layers,
    token_positions,
)
from lmppl.lm.llama import LlamaAttention, LlamaMLP

__all__ = ["GemmaBlock", "GemmaNetwork"]


class GemmaBlock(nnx.Module):
    """Pre-norm residual block with Gemma 2/3's post-attention and feed-forward norms."""

    def __init__(self, config: ModelConfig, get: ParameterSource, prefix: str):
        hidden, eps, offset = config.hidden_size, config.norm_eps, config.norm_weight_offset

        def norm(name: str) -> RMSNorm:
            return RMSNorm(get(f"{prefix}.{name}.weight", (hidden,)), eps, offset)

        self.input_layernorm = norm("input_layernorm")
        self.self_attn = LlamaAttention(config, get, f"{prefix}.self_attn")
        # Gemma 2/3 apply this one to the attention output; without the feed-forward norms
        # (Gemma 1's layout) it is the norm before the MLP, as in Llama.
        self.post_attention_layernorm = norm("post_attention_layernorm")
        self.feedforward_norms = config.feedforward_norms
        if config.feedforward_norms:
            self.pre_feedforward_layernorm = norm("pre_feedforward_layernorm")
            self.post_feedforward_layernorm = norm("post_feedforward_layernorm")
        else:
            self.pre_feedforward_layernorm = self.post_feedforward_layernorm = None
        self.mlp = LlamaMLP(config, get, f"{prefix}.mlp")

    def __call__(self, x, cache_keys, cache_values, positions, layer, local=False):
        attended, cache_keys, cache_values = self.self_attn(
            self.input_layernorm(x), cache_keys, cache_values, positions, layer, local
        )
        if not self.feedforward_norms:
            x = x + attended
            return x + self.mlp(self.post_attention_layernorm(x)), cache_keys, cache_values
        x = x + self.post_attention_layernorm(attended)
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x, cache_keys, cache_values


class GemmaNetwork(nnx.Module):
    """A Gemma decoder implementing the :mod:`lmppl.lm.base` network interface."""

    def __init__(self, config: ModelConfig, get: ParameterSource):
        vocab, hidden = config.vocab_size, config.hidden_size
        self.config = config
        self.embed_tokens = Embedding(get("model.embed_tokens.weight", (vocab, hidden)))
        self.layers = nnx.List(
            [GemmaBlock(config, get, f"model.layers.{i}") for i in range(config.num_layers)]
        )
        self.norm = RMSNorm(
            get("model.norm.weight", (hidden,)), config.norm_eps, config.norm_weight_offset
        )
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Embedding(get("lm_head.weight", (vocab, hidden)))
        )

    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32) -> KVCache:
        """An empty cache of length 0 (per layer ``[batch_size, max_length, H_kv, D]``; one
        ``[batch_size, L, max_length, H_kv, D]`` buffer when the blocks are scanned)."""
        c = self.config
        stacked = isinstance(self.layers, LayerStack)
        return empty_cache(
            c.num_layers, batch_size, max_length, c.num_kv_heads, c.head_dim, dtype, stacked
        )

    def __call__(
        self, tokens: jax.Array, cache: KVCache, token_counts: jax.Array | None = None
    ) -> LMOutput:
        """Feed ``tokens`` ``[B, S]`` at positions ``cache.length + (0..S-1)``."""
        steps = tokens.shape[1]
        positions = token_positions(cache.length, steps)
        x = self.embed_tokens(tokens)
        # transformers rounds the multiplier to the parameter dtype before multiplying.
        multiplier = jnp.asarray(self.config.embedding_multiplier, jnp.float32).astype(x.dtype)
        x, keys, values = run_layers(self.layers, x * multiplier, cache, positions, self.config)
        hidden = self.norm(x)
        output_embedding = self.embed_tokens if self.lm_head is None else self.lm_head
        logits = output_embedding.attend(hidden)
        cap = self.config.final_logit_softcap
        if cap is not None:
            logits = cap * jnp.tanh(logits / cap)
        return LMOutput(
            logits=logits,
            hidden=hidden,
            cache=next_cache(cache, keys, values, token_counts, steps),
        )
