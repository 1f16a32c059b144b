"""Context-free grammars as potentials: a Lark grammar checked token by token on the host.

:func:`grammar` compiles a grammar in Lark syntax (llguidance's dialect: ``start: ...``
rules, string and regex terminals, ``%ignore``, ...) against a tokenizer's vocabulary with
`llguidance <https://github.com/guidance-ai/llguidance>`_, and
:func:`lmppl.potentials.constrain` puts it in a program. The target is

    σ(s) ∝ p0(s) · 1[text(s) ∈ L(G)] · (other factors),

``text(s)`` the text of the tokens before the first EOS (all ``T`` tokens without one), as
for :func:`lmppl.potentials.regex`. A context-free language has no finite automaton, so the
parser runs on the host: each step of the sweep calls back once for all particles
(``jax.pure_callback``) with their prefixes and gets their ``[V]`` masks.

The per-step factors (their product over a sequence is the indicator above):

* at steps ``t < T − 1``: ``m_t(s_<t, v) = 1[text(s_<t v) is a prefix of a word of L]``
  (llguidance's token mask), and for EOS ``1[text(s_<t) ∈ L]``;
* at the last step ``t = T − 1``: ``m_t(s_<t, v) = 1[text(s_<t v) ∈ L]`` (each allowed
  token tried, then rolled back) and EOS as above.

Every prefix of a word of L passes the first kind, and a sequence that passes all of them
ends (at its EOS or after T tokens) on a word of L, so ``Π_t m_t = 1[text(s) ∈ L]`` exactly
and SMC's proposal is the locally optimal one for the constraint. Unlike a regular
language's distance table, a grammar does not say how many tokens acceptance still needs,
so a particle can be viable at step t and still unable to finish in time; its weight then
drops to zero at the last step (exact, only wasteful: raise ``max_new_tokens``).

The callback is a pure function of the prefix (the parse state is recomputed from the
tokens, never carried), so resampling needs no host state; parse states are memoised by
prefix (a bounded LRU of matchers, each extended from its parent by one token), so a sweep
costs one token of parsing per particle and step.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lmppl.automata import _short as short_pattern
from lmppl.automata import token_texts

__all__ = ["Grammar", "GrammarPotential", "grammar"]

DEFAULT_CACHE_SIZE = 1 << 16
"""Parse states (matchers) kept per grammar, by prefix."""


def _import_llguidance():
    try:
        import llguidance
    except ImportError as error:  # pragma: no cover - a declared dependency
        raise ImportError("grammar constraints need llguidance (pip install llguidance)") from error
    return llguidance


class _VocabularyWrapper:
    """The shape of tokenizer ``llguidance.TokenizerWrapper`` reads: each token's bytes."""

    def __init__(self, tokenizer: Any, texts: list[str | None]):
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_token_id = tokenizer.bos_token_id
        self.tokens = [b"" if text is None else text.encode("utf-8") for text in texts]
        self.special_token_ids = [i for i, text in enumerate(texts) if text is None]
        self._tokenizer = tokenizer

    def __call__(self, text: bytes | str) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return list(self._tokenizer.encode(text, add_bos=False))


class Grammar:
    """A context-free grammar compiled against one vocabulary (build once, outside programs).

    Attributes:
      lark: the grammar's text.
      vocab_size: V, the width of the masks (the model's vocabulary).
      eos_token_id: the tokenizer's EOS.
    """

    def __init__(self, lark: str, tokenizer: Any, vocab_size: int, cache_size: int):
        llguidance = _import_llguidance()
        self.lark = lark
        self.vocab_size = int(vocab_size)
        self.eos_token_id = tokenizer.eos_token_id
        texts = token_texts(tokenizer)
        texts = texts + [None] * (self.vocab_size - len(texts))
        self._text_tokens = np.asarray([text is not None for text in texts])
        wrapper = llguidance.TokenizerWrapper(_VocabularyWrapper(tokenizer, texts))
        self._tokenizer = llguidance.LLTokenizer(wrapper, n_vocab=self.vocab_size)
        self._grammar = llguidance.grammar_from("lark", lark)
        error = llguidance.LLMatcher.validate_grammar(self._grammar, self._tokenizer)
        if error and not error.startswith("WARNING"):
            first = " ".join(line.strip() for line in error.strip().splitlines()[:1])
            raise ValueError(f"grammar: cannot compile {_short(lark)}: {first}")
        self._llguidance = llguidance
        self._cache: OrderedDict[bytes, Any] = OrderedDict()
        self._cache_size = int(cache_size)
        self.host_seconds = 0.0  # time spent in the callbacks (for benchmarks)

    def __repr__(self) -> str:
        return f"Grammar({_short(self.lark)}, vocab_size={self.vocab_size})"

    def _start(self) -> Any:
        return self._llguidance.LLMatcher(self._tokenizer, self._grammar, log_level=0)

    def matcher(self, prefix: np.ndarray) -> Any | None:
        """The parse state after ``prefix`` (token ids, no EOS), or None when it left L's
        prefixes. Memoised: extended from the parent prefix's state by one token."""
        prefix = np.asarray(prefix, np.int32)
        key = prefix.tobytes()
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        if prefix.size == 0:
            state = self._start()
        else:
            parent = self.matcher(prefix[:-1])
            state = None
            if parent is not None:
                state = parent.deep_copy()
                if not state.consume_token(int(prefix[-1])) or state.is_error():
                    state = None
        self._cache[key] = state
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return state

    def accepts(self, token_ids: Any, eos_token_id: int | None = None) -> bool:
        """Whether the text of ``token_ids`` (up to the first ``eos_token_id``) is in L."""
        tokens = np.asarray(token_ids, np.int32)
        if eos_token_id is not None and (tokens == eos_token_id).any():
            tokens = tokens[: int(np.argmax(tokens == eos_token_id))]
        if not self._text_tokens[tokens].all():
            return False
        state = self.matcher(tokens)
        return state is not None and bool(state.is_accepting())

    def _allowed(self, state: Any) -> np.ndarray:
        bits = np.frombuffer(state.compute_bitmask(), np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[: self.vocab_size].astype(bool)
        return allowed & self._text_tokens

    def mask(self, prefix: np.ndarray, t: int, steps: int, eos_token_id: int | None) -> np.ndarray:
        """``[V]`` float32 log m_t (0 or −inf) of one particle at step ``t`` of ``steps``."""
        out = np.full((self.vocab_size,), -np.inf, np.float32)
        head = np.asarray(prefix[:t], np.int32)
        if eos_token_id is not None and (head == eos_token_id).any():
            out[eos_token_id] = 0.0  # padding after EOS (not scored)
            return out
        state = self.matcher(head) if self._text_tokens[head].all() else None
        if state is None:
            return out
        allowed = self._allowed(state)
        if t == steps - 1:  # the text must be in L after this token
            finishing = np.zeros_like(allowed)
            probe = state.deep_copy()  # a failed consume leaves a matcher in error for good
            for token in np.flatnonzero(allowed):
                if probe.consume_token(int(token)):
                    finishing[token] = probe.is_accepting()
                    probe.rollback(1)
                else:
                    probe = state.deep_copy()
            allowed = finishing
        out[allowed] = 0.0
        if eos_token_id is not None:
            out[eos_token_id] = 0.0 if state.is_accepting() else -np.inf
        return out

    def masks(self, prefixes: np.ndarray, t: np.ndarray, steps: int, eos: int | None) -> np.ndarray:
        """``[..., V]`` masks for prefixes ``[..., T]`` at steps ``t`` ``[...]`` (the
        host side of :meth:`GrammarPotential.log_weights`)."""
        start = time.perf_counter()
        prefixes = np.asarray(prefixes)
        batch = prefixes.shape[:-1]
        flat = prefixes.reshape(-1, prefixes.shape[-1])
        steps_at = np.broadcast_to(np.asarray(t), batch).reshape(-1)
        out = np.stack(
            [self.mask(row, int(k), steps, eos) for row, k in zip(flat, steps_at, strict=True)]
        )
        self.host_seconds += time.perf_counter() - start
        return out.reshape((*batch, self.vocab_size))

    def bind(self, steps: int, eos_token_id: int | None) -> GrammarPotential:
        """The per-step potential of this grammar for ``steps`` new tokens."""
        return GrammarPotential(self, steps, eos_token_id)


class GrammarPotential:
    """The :class:`~lmppl.types.StatefulStepPotential` of a :class:`Grammar` (see the module
    doc for its factors). Stateless on the device: the host reads the prefix."""

    def __init__(self, grammar: Grammar, steps: int, eos_token_id: int | None):
        self.grammar = grammar
        self.steps = int(steps)
        self.eos_token_id = eos_token_id

    def init(self) -> jax.Array:
        return jnp.zeros((), jnp.int32)

    def log_weights(self, state: jax.Array, prefix: jax.Array, t: jax.Array) -> jax.Array:
        del state
        shape = jax.ShapeDtypeStruct((self.grammar.vocab_size,), jnp.float32)

        def host(prefix, t):
            return self.grammar.masks(prefix, t, self.steps, self.eos_token_id)

        return jax.pure_callback(host, shape, prefix, t, vmap_method="broadcast_all")

    def update(self, state: jax.Array, token: jax.Array, t: jax.Array) -> jax.Array:
        del token, t
        return state


def _short(text: str) -> str:
    """The grammar on one line, cut to 60 characters, quoted (for messages)."""
    return short_pattern(" ".join(text.split()))


def grammar(lark: str, tokenizer_or_model: Any, *, cache_size: int = DEFAULT_CACHE_SIZE) -> Grammar:
    """Compile a context-free grammar (Lark syntax, llguidance's dialect) over a vocabulary.

    Args:
      lark: the grammar, e.g. ``'start: "[" item ("," item)* "]"\\nitem: /[0-9]+/'``.
      tokenizer_or_model: a model (its tokenizer and its logits' width) or a tokenizer.
      cache_size: parse states memoised by prefix.

    Returns a :class:`Grammar` for :func:`lmppl.potentials.constrain`.

    Raises:
      ValueError: the grammar does not compile (one line naming the problem).
    """
    from lmppl.automata import _tokenizer_and_size

    tokenizer, size = _tokenizer_and_size(tokenizer_or_model)
    if not isinstance(lark, str) or not lark.strip():
        raise ValueError("grammar: give the grammar's text (Lark syntax, a 'start' rule)")
    return Grammar(lark, tokenizer, size, cache_size)
