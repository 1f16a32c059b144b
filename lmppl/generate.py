"""Plain batched generation: N continuations of a prompt in one jitted, cached call."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from lmppl.decoding import check_temperature, sample_tokens, trim_at_eos
from lmppl.lm.base import LanguageModel
from lmppl.prompt import resolve_model_prompt

__all__ = ["Generation", "generate"]


class Generation(NamedTuple):
    """Generated continuations.

    Fields:
      tokens: ``[N, T]`` int32 (EOS padding after a row stops).
      log_probs: ``[N]`` log-probability of each continuation under the (tempered) model;
        zeros for greedy decoding.
      texts: the decoded continuations (up to EOS), or None without a tokenizer.
    """

    tokens: jax.Array
    log_probs: jax.Array
    texts: list[str] | None


def generate(
    lm: LanguageModel,
    prompt: Any = None,
    *,
    source: Any = None,
    num_samples: int = 1,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    stop_at_eos: bool = True,
    rng_key: jax.Array | None = None,
) -> Generation:
    """Sample ``num_samples`` continuations (``temperature=0``: greedy) in one batched scan.

    The prompt (text or token ids) is prefilled once and broadcast to all rows; each
    step decodes ``[N, 1]`` tokens against the ``[N, P + T, ...]`` cache. Sampling
    (``temperature > 0``) needs ``rng_key``; greedy decoding needs none. An
    encoder-decoder model (T5) takes ``source=`` (text or ids) instead of a prompt.
    """
    if num_samples < 1 or max_new_tokens < 1:
        raise ValueError("num_samples and max_new_tokens must be at least 1")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    tokens, length = resolve_model_prompt(lm, prompt, source, max_new_tokens)
    if tokens.ndim != 1:
        raise ValueError("generate takes one prompt; batch prompts with lmppl.LM instead")
    if tokens.shape[-1] + max_new_tokens > lm.context_length:
        raise ValueError(
            f"the prompt ({tokens.shape[-1]} tokens) plus max_new_tokens={max_new_tokens} "
            f"exceeds the context length {lm.context_length} of {lm.name}"
        )
    check_temperature(lm, temperature)
    if rng_key is None:
        if temperature != 0:
            raise ValueError(
                f"generate samples at temperature {temperature}: give rng_key="
                "jax.random.key(...) (only greedy decoding, temperature=0, needs no key)"
            )
        rng_key = jax.random.key(0)  # unused by greedy decoding
    eos = lm.eos_token_id if stop_at_eos else None
    out, log_probs = sample_tokens(
        rng_key,
        lm.params,
        tokens,
        length,
        model=lm,
        num_rows=num_samples,
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        eos=eos,
    )
    texts = None
    if lm.tokenizer is not None:
        texts = [lm.tokenizer.decode(trim_at_eos(row, eos)) for row in np.asarray(out).tolist()]
    return Generation(out, log_probs, texts)
