"""Word-level steps: resample only the particles whose next token starts a new word.

With ``SMC(..., resample_at="word")`` a step of the sweep reads the vocabulary as two
classes: the *boundary* tokens B (a token whose text starts with whitespace — a leading
``" "``, GPT-2's ``Ġ`` / ``Ċ`` or SentencePiece's ``▁`` — and EOS: the current word is
complete before them) and the others. Step t (every particle at once) becomes

    b^i ~ Bernoulli(q_t^i(B))                        # does the next token start a word?
    log W^i += log w_t^i                             # the usual token-free increment
    R = {i : b^i = 1 or row i ended}                 # the particles at a word boundary
    if t > 0 and ESS(W_R) < threshold · |R|:         # resample R among itself
        a^j ~ R(W_R) for j ∈ R ;  x^j = x^{a^j} ;  W^j = mean_{i∈R} W^i
    s_t^i ~ q_t^i( · | class b^i)                    # a token of the chosen class

Why it is exact: drawing the class first and the token within it is drawing s_t ~ q_t
(``q(b) q(v | b) = q(v)``), and the weight of the extended target over ``(s_<t, b)``,
``Σ_{v ∈ class b} p0 m_t ψ_t / (ψ_{t−1} q(b))``, is the usual increment
``Σ_v p0 m_t ψ_t / ψ_{t−1}``; the token drawn within its class then has weight one. The
set R is a function of the particles' past and their b, so resampling R among itself and
giving each of its |R| offspring the weight ``W_R / |R|`` keeps the weighted particle
system unbiased (``E[Σ_{j∈R} W'^j f(x'^j)] = Σ_{i∈R} W^i f(x^i)``), hence Ẑ unbiased; the
particles outside R keep their state and weight. When every particle is at a boundary this
is an ordinary resampling step that closes the epoch; in general the mean weight of the
system is moved into ``log Ẑ`` (:func:`resample_members`), so epochs close at every
resampling event either way.

Any resampling scheme works: the scheme draws N offspring from R's weights and |R| of
them, chosen uniformly at random, go to R's slots (each slot then has the scheme's
marginal law ∝ W). Conditional SMC keeps particle 0 (its b is the reference token's
class); the others of R are drawn iid from R's weights, the conditional law of
multinomial resampling.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from lmppl.infer.resampling import effective_sample_size

__all__ = [
    "ResampleAt",
    "boundary_tokens",
    "check_resample_at",
    "draw_boundaries",
    "resample_members",
    "word_starts",
]

ResampleAt = str | Callable[[str], bool] | None
"""``None`` (token positions), ``"word"``, or a predicate on a token's text."""

_BYTE_LEVEL_WHITESPACE = frozenset("ĠĊĉč")  # GPT-2's stand-ins for " ", "\n", "\t", "\r"


def check_resample_at(resample_at: Any) -> ResampleAt:
    """Return ``resample_at`` if it is ``None``, ``"word"`` or a callable (one-line error)."""
    if resample_at is None or resample_at == "word" or callable(resample_at):
        return resample_at
    raise ValueError(
        "resample_at must be None (every token position), 'word' (before a token that "
        f"starts a new word) or a predicate on a token's text, got {resample_at!r}"
    )


def _piece_texts(tokenizer: Any) -> list[str | None]:
    """Each token's text as the tokenizer's pieces spell it (None: special or unreadable)."""
    from lmppl.automata import token_texts

    try:
        return token_texts(tokenizer)
    except TypeError:
        pass
    # A transformers tokenizer (HFTokenizer): its raw pieces, with ▁ / Ġ / Ċ read as the
    # whitespace they stand for.
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is None or not hasattr(inner, "convert_ids_to_tokens"):
        raise TypeError(
            f"cannot read the token pieces of a {type(tokenizer).__name__} to find word "
            "starts; give resample_at a predicate on token texts of a supported tokenizer"
        )
    special = set(getattr(inner, "all_special_ids", ()))
    texts: list[str | None] = []
    for token_id, piece in enumerate(inner.convert_ids_to_tokens(list(range(len(inner))))):
        if token_id in special or piece is None:
            texts.append(None)
        elif piece[:1] == "▁" or piece[:1] in _BYTE_LEVEL_WHITESPACE:
            texts.append(" " + piece[1:])
        else:
            texts.append(piece)
    return texts


def word_starts(text: str) -> bool:
    """The predicate of ``resample_at="word"``: the token's text starts with whitespace."""
    return text[:1].isspace()


# Boundary masks of the last few (tokenizer, predicate) pairs: reading a 49k vocabulary
# takes about a second. Entries keep their tokenizer and predicate alive, so ids are not
# reused while cached.
_MASKS: dict[tuple[int, int], tuple[Any, Any, np.ndarray]] = {}
_MASK_CACHE_SIZE = 4


def boundary_tokens(
    resample_at: ResampleAt, tokenizer: Any, vocab_size: int, eos_token_id: int | None
) -> np.ndarray:
    """``[vocab_size]`` bool: the tokens before which a particle is at a boundary.

    ``resample_at="word"`` uses :func:`word_starts`, a callable is applied to every token
    with a text (special tokens and pieces of a multi-byte character are never
    boundaries); EOS always is (the text is complete before it). Ids beyond the
    tokenizer's vocabulary (a model's padding rows) are not boundaries.
    """
    predicate = word_starts if resample_at == "word" else resample_at
    if not callable(predicate):
        raise ValueError(f"not a boundary rule: {resample_at!r}")
    if tokenizer is None:
        raise ValueError("word-level steps read the model's tokenizer; this model has none")
    key = (id(tokenizer), id(predicate))
    entry = _MASKS.get(key)
    if entry is None or entry[0] is not tokenizer or entry[1] is not predicate:
        while len(_MASKS) >= _MASK_CACHE_SIZE:
            del _MASKS[next(iter(_MASKS))]
        texts = _piece_texts(tokenizer)
        mask = np.asarray([text is not None and bool(predicate(text)) for text in texts], bool)
        entry = _MASKS[key] = (tokenizer, predicate, mask)
    mask = np.zeros(vocab_size, bool)
    known = min(vocab_size, entry[2].shape[0])
    mask[:known] = entry[2][:known]
    if eos_token_id is not None and eos_token_id < vocab_size:
        mask[eos_token_id] = True
    return mask


def draw_boundaries(
    rng_key: jax.Array, log_q: jax.Array, boundary: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``(at_boundary [N], log_q restricted [N, V])``: each particle's class of next token.

    ``at_boundary^i ~ Bernoulli(q^i(B))`` with ``log_q`` ``[N, V]`` normalised and
    ``boundary`` ``[V]`` bool; the restricted proposal keeps the chosen class only (its
    rows are unnormalised: :func:`~lmppl.token_sampler.sample_categorical` normalises).
    """
    log_mass = logsumexp(jnp.where(boundary[None, :], log_q, -jnp.inf), axis=-1)
    uniform = jax.random.uniform(rng_key, log_mass.shape)
    at_boundary = jnp.log(uniform) < log_mass
    return at_boundary, restrict(log_q, boundary, at_boundary)


def restrict(log_q: jax.Array, boundary: jax.Array, at_boundary: jax.Array) -> jax.Array:
    """``log_q`` with the tokens outside each row's class (``at_boundary [N]``) at −inf."""
    same_class = boundary[None, :] == at_boundary[:, None]
    return jnp.where(same_class, log_q, -jnp.inf)


def resample_members(
    rng_key: jax.Array,
    resampler: Callable[[jax.Array, jax.Array, int], jax.Array],
    log_weights: jax.Array,
    members: jax.Array,
    threshold: float,
    keep_first: jax.Array | bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Resample the particles ``members`` ``[N]`` among themselves when their ESS is low.

    Returns ``(resampled [], ancestors [N], log_weights [N], log_mean [])``: the ancestors
    are the identity outside ``members`` (and everywhere when not resampled); the members'
    new log-weights are their log mean weight; ``log_mean`` is the log mean weight of the
    whole system after resampling (0 when not resampled), which the caller moves into
    ``log Ẑ`` (the returned weights are already divided by it), so that ``log Ẑ + log mean
    W`` is unchanged and a resampling of every particle is an ordinary epoch close.
    ``keep_first`` (conditional SMC, traced bool): particle 0 is its own ancestor.
    """
    num = log_weights.shape[0]
    draw_key, order_key = jax.random.split(rng_key)
    member_log_weights = jnp.where(members, log_weights, -jnp.inf)
    count = jnp.sum(members)
    ess = effective_sample_size(member_log_weights)
    resampled = (count > 0) & ((threshold >= 1.0) | (ess < threshold * count))
    draws = resampler(draw_key, member_log_weights, num)
    # Slot k of the members (in index order) takes draw order[k]: |R| of the N draws,
    # chosen uniformly at random.
    order = jax.random.permutation(order_key, num)
    rank = jnp.cumsum(members) - 1
    identity = jnp.arange(num, dtype=jnp.int32)
    ancestors = jnp.where(members, draws[order[jnp.clip(rank, 0, num - 1)]], identity)
    # Conditional SMC: the clamped particle 0 keeps its own lineage.
    ancestors = ancestors.at[0].set(jnp.where(keep_first, 0, ancestors[0]))
    ancestors = jnp.where(resampled, ancestors, identity).astype(jnp.int32)
    member_mean = logsumexp(member_log_weights) - jnp.log(jnp.maximum(count, 1))
    new_log_weights = jnp.where(members, member_mean, log_weights)
    log_mean = logsumexp(new_log_weights) - jnp.log(num)
    log_mean = jnp.where(resampled & jnp.isfinite(log_mean), log_mean, 0.0)
    new_log_weights = jnp.where(resampled, new_log_weights - log_mean, log_weights)
    return resampled, ancestors, new_log_weights.astype(jnp.float32), log_mean
