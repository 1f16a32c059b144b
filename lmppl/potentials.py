"""Potentials: the factors φ of a target σ(s) ∝ p0(s) φ(s), written as NumPyro sites.

Every potential is used inside a program as ``numpyro.factor(name, log_phi)``: the
functions here compute ``log φ`` from a sampled sequence. Kinds:

* JAX functions of token ids: any ``jnp`` expression of the sequence works directly;
  :func:`log_indicator` and :func:`threshold` turn conditions into ``0 / -inf``
  (``log 0`` is handled: such particles get weight zero).
* Host scorers of decoded text (:func:`text`, :func:`text_classifier`): any Python
  callable on a list of strings, run through one ``jax.pure_callback`` for all
  particles of a sweep (never per token).
* Per-step token constraints (:func:`step_factor`, :func:`banned_tokens`): factors
  ``Σ_t log m_t(s_<t, s_t)`` that SMC applies at every decoding step (the locally
  optimal proposal for them), while plain NumPyro sees an ordinary factor.
* Regular languages (:func:`regex`, :func:`json_schema` build a token automaton once;
  :func:`constrain` puts it in a program): ``σ ∝ p0 · 1[text(s) ∈ L]``, the automaton
  state carried per particle by SMC (a stateful per-step potential).
* Context-free languages (:func:`grammar`, a Lark grammar compiled by llguidance;
  :func:`constrain` as above): the parser runs on the host, one callback per step for
  all particles (:mod:`lmppl.grammars`).
* An observed LM continuation (infilling) needs no helper: ``numpyro.sample("ending",
  lmppl.LM(lm, prompt=lmppl.concat(prompt, story), ...), obs=ending_ids)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro.distributions.distribution import Unit

from lmppl.automata import AutomatonPotential, TokenAutomaton, json_schema, regex
from lmppl.decoding import trim_at_eos, valid_mask
from lmppl.grammars import Grammar, grammar
from lmppl.host_errors import remembered
from lmppl.lm.base import Tokenizer

__all__ = [
    "STEP_POTENTIAL_KEY",
    "banned_tokens",
    "constrain",
    "grammar",
    "json_schema",
    "log_indicator",
    "regex",
    "step_factor",
    "step_log_factors",
    "step_log_weight_rows",
    "text",
    "text_classifier",
    "threshold",
]

#: ``infer`` key under which a per-step potential's function is recorded on its site.
STEP_POTENTIAL_KEY = "lmppl_step_potential"


def log_indicator(condition: jax.Array, floor: float | None = None) -> jax.Array:
    """``log 1[condition]``: 0 where true, ``-inf`` (or ``log floor``) where false.

    ``floor`` (e.g. 1e-16, as the paper's threshold task) keeps the target's support
    full, so that every sequence has positive weight.
    """
    low = -jnp.inf if floor is None else jnp.log(floor)
    return jnp.where(condition, 0.0, low).astype(jnp.float32)


def threshold(
    score: jax.Array, limit: float, *, below: bool = True, floor: float | None = None
) -> jax.Array:
    """``log 1[score < limit]`` (or ``> limit`` with ``below=False``), see :func:`log_indicator`."""
    score = jnp.asarray(score)
    return log_indicator(score < limit if below else score > limit, floor)


def _decode_rows(tokens: np.ndarray, tokenizer: Tokenizer) -> list[str]:
    eos = tokenizer.eos_token_id
    rows = tokens.reshape(-1, tokens.shape[-1]).tolist()
    return [tokenizer.decode(trim_at_eos(row, eos)) for row in rows]


def text(
    score_fn: Callable[[list[str]], Sequence[float]],
    tokenizer: Tokenizer,
    *,
    name: str | None = None,
) -> Callable[[jax.Array], jax.Array]:
    """Wrap a host scorer of decoded text as a JAX function of token ids.

    ``score_fn`` takes the decoded strings of all particles (text up to the first EOS)
    and returns one log-potential per string. The returned function maps tokens
    ``[..., T]`` to ``[...]`` float32 through one ``jax.pure_callback``; under a vmap
    over particles the callback receives all particles at once.

    Args:
      score_fn: ``list[str] -> sequence of floats`` (log φ for each string).
      tokenizer: decodes token ids (``lm.tokenizer``).
      name: used in error messages (defaults to ``score_fn``'s name).
    """
    label = name or getattr(score_fn, "__name__", "score_fn")

    @remembered
    def host(tokens: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens)
        texts = _decode_rows(tokens, tokenizer)
        scores = np.asarray(score_fn(texts), dtype=np.float32).reshape(-1)
        if scores.shape[0] != len(texts):
            raise ValueError(
                f"{label} returned {scores.shape[0]} scores for {len(texts)} texts; "
                "it must return one log-potential per string"
            )
        return scores.reshape(tokens.shape[:-1])

    def potential(tokens: jax.Array) -> jax.Array:
        tokens = jnp.asarray(tokens, jnp.int32)
        out = jax.ShapeDtypeStruct(tokens.shape[:-1], jnp.float32)
        return jax.pure_callback(host, out, tokens, vmap_method="expand_dims")

    return potential


def text_classifier(
    predict_proba: Callable[[list[str]], Any],
    tokenizer: Tokenizer,
    target_class: int,
    *,
    name: str | None = None,
) -> Callable[[jax.Array], jax.Array]:
    """``log p(target_class | text)`` from a host classifier's class probabilities.

    ``predict_proba`` maps a list of strings to an array ``[n, num_classes]`` (as
    scikit-learn's ``predict_proba``; ``[n]`` is read as the probability of class 1). It is
    called once here on ``[""]`` to check ``target_class`` against its classes, so a bad
    class fails in one line before any sweep is compiled.
    """
    label = name or getattr(predict_proba, "__name__", "predict_proba")
    if (
        isinstance(target_class, bool)
        or not isinstance(target_class, int | np.integer)
        or target_class < 0
    ):
        raise ValueError(f"target_class must be a non-negative integer, got {target_class!r}")
    probe = np.asarray(predict_proba([""]))
    classes = 2 if probe.ndim == 1 else int(probe.shape[-1])
    if target_class >= classes:
        raise ValueError(
            f"target_class={target_class} but {label} has {classes} classes (0 to {classes - 1})"
        )

    def score(texts: list[str]) -> np.ndarray:
        probs = np.asarray(predict_proba(texts), dtype=np.float64)
        if probs.ndim == 1:
            probs = np.stack([1.0 - probs, probs], axis=-1)
        if probs.shape[0] != len(texts) or not 0 <= target_class < probs.shape[-1]:
            raise ValueError(
                f"{label} returned probabilities of shape {probs.shape} for {len(texts)} "
                f"texts; class {target_class} must be one of its columns"
            )
        with np.errstate(divide="ignore"):
            return np.log(probs[:, target_class])

    return text(score, tokenizer, name=label)


class _PrefixPotential:
    """A stateless per-step potential ``log_potential(prefix, t)`` read as a stateful one."""

    def __init__(self, log_potential: Callable[[jax.Array, jax.Array], jax.Array]):
        self.log_potential = log_potential

    def init(self) -> tuple:
        return ()

    def log_weights(self, state: Any, prefix: jax.Array, t: jax.Array) -> jax.Array:
        return self.log_potential(prefix, t)

    def update(self, state: Any, token: jax.Array, t: jax.Array) -> Any:
        return state


def _lm_site_of(sequence: Any) -> tuple[str, Any] | None:
    """``(site name, model)`` of the ``lmppl.LM`` site whose value is ``sequence``.

    Read from the trace of every enclosing ``numpyro.handlers.trace`` (the handler under
    which NumPyro's inference utilities, ``Predictive`` and lmppl's own inference run a
    program); None when no trace holds it (e.g. a bare ``handlers.seed``).
    """
    from numpyro.handlers import trace
    from numpyro.primitives import _PYRO_STACK

    from lmppl.distribution import LM

    for handler in reversed(_PYRO_STACK):
        if not isinstance(handler, trace):
            continue
        for site_name, site in handler.trace.items():
            if site["type"] != "sample" or site["value"] is not sequence:
                continue
            fn = site["fn"]
            while not isinstance(fn, LM) and hasattr(fn, "base_dist"):
                fn = fn.base_dist  # wrapped by a handler (Predictive masks every site)
            if isinstance(fn, LM):
                return site_name, fn.model
    return None


def _check_vocabulary(name: str, potential: Any, width: int, lm_site: tuple[str, Any]) -> None:
    """Refuse a per-step potential whose ``[V]`` log-weights do not span the model's vocabulary."""
    site_name, model = lm_site
    if width == model.vocab_size:
        return
    where = f"the LM site '{site_name}' ({model.name}) has a vocabulary of {model.vocab_size}"
    if isinstance(potential, AutomatonPotential):
        raise ValueError(
            f"constraint '{name}' was built for a vocabulary of {width} tokens but {where}: "
            "build it from the model itself (potentials.regex(pattern, lm), "
            "potentials.json_schema(schema, lm))"
        )
    raise ValueError(
        f"per-step potential '{name}' returns {width} log-weights per step but {where}"
    )


def step_log_factors(
    potential: Any,
    sequence: jax.Array,
    eos_token_id: int | None,
    check_width: Callable[[int], None] | None = None,
) -> jax.Array:
    """``[T]`` ``log m_t(state_t, s_<t, s_t)`` of one sequence ``[T]`` under a
    :class:`~lmppl.types.StatefulStepPotential`, the state advanced token by token from
    ``potential.init()`` (as SMC does); 0 after the first EOS, −inf for a token beyond the
    potential's width. ``check_width(V)`` is called with the width while tracing."""
    positions = jnp.arange(sequence.shape[-1])

    def at(state, t):
        prefix = jnp.where(positions < t, sequence, 0)
        log_weights = potential.log_weights(state, prefix, t)
        if check_width is not None:
            check_width(log_weights.shape[-1])
        value = log_weights.at[sequence[t]].get(mode="fill", fill_value=-jnp.inf)
        return potential.update(state, sequence[t], t), value

    _, values = jax.lax.scan(at, potential.init(), positions)
    return jnp.where(valid_mask(sequence, eos_token_id), values, 0.0)


def step_log_weight_rows(
    potential: Any, sequence: jax.Array, eos_token_id: int | None
) -> jax.Array:
    """``[T, V]`` ``log m_t(state_t, s_<t, v)`` of every candidate ``v`` at every step of one
    sequence ``[T]`` (teacher-forced: the state advanced by the sequence's own tokens, as
    :func:`step_log_factors`, whose values are these rows taken at ``s_t``); rows after
    the first EOS are 0 (padding is not scored)."""
    positions = jnp.arange(sequence.shape[-1])

    def at(state, t):
        prefix = jnp.where(positions < t, sequence, 0)
        log_weights = potential.log_weights(state, prefix, t)
        return potential.update(state, sequence[t], t), log_weights

    _, rows = jax.lax.scan(at, potential.init(), positions)
    return jnp.where(valid_mask(sequence, eos_token_id)[:, None], rows, 0.0)


def _step_site(
    name: str, sequence: jax.Array, potential: Any, eos_token_id: int | None
) -> jax.Array:
    """Record ``potential`` (a :class:`~lmppl.types.StatefulStepPotential`) as a factor site.

    The factor is ``Σ_t log m_t(state_t, s_<t, s_t)`` over the positions up to the first
    EOS, the state advanced token by token from ``potential.init()``. When the sequence is
    an ``lmppl.LM`` site's value (seen through an enclosing trace: plain NumPyro's inference
    utilities, ``Predictive``, and every lmppl backend), the potential's width must be that
    model's vocabulary size (one-line ``ValueError`` otherwise); a token beyond the
    potential's width gets weight zero, never another token's.
    """
    original = sequence
    lm_site = _lm_site_of(original)
    sequence = jnp.asarray(sequence)
    steps = sequence.shape[-1]

    def check(width: int) -> None:
        if lm_site is not None:  # the width is static: checked once, while tracing
            _check_vocabulary(name, potential, width, lm_site)

    def total(row: jax.Array) -> jax.Array:
        return step_log_factors(potential, row, eos_token_id, check).sum()

    flat = sequence.reshape(-1, steps)
    log_factor = jax.vmap(total)(flat).reshape(sequence.shape[:-1])
    numpyro.sample(
        name,
        Unit(log_factor),
        obs=jnp.empty(jnp.shape(log_factor) + (0,)),
        infer={
            "is_auxiliary": True,
            STEP_POTENTIAL_KEY: (potential, eos_token_id, original),
        },
    )
    return log_factor


def step_factor(
    name: str,
    sequence: jax.Array,
    log_potential: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    eos_token_id: int | None = None,
) -> jax.Array:
    """A factor ``Σ_t log m_t(s_<t, s_t)`` that SMC applies token by token.

    ``log_potential(prefix, t)`` returns ``[V]`` log-weights of every candidate for
    token ``t`` given ``prefix`` ``[T]`` (whose entries at positions ``>= t`` are
    placeholders: a potential must only read ``prefix[:t]``). SMC multiplies the
    proposal by ``m_t`` and weights by its normaliser at each step, so particles never
    waste steps on forbidden tokens; plain NumPyro sees the same total as one factor.
    With ``eos_token_id`` set, positions after the first EOS (padding) are not scored;
    it must match the sequence's LM site (its ``stop_at_eos``).

    Returns the total log-factor (also recorded as the site's value).
    """
    return _step_site(name, sequence, _PrefixPotential(log_potential), eos_token_id)


_AUTOMATON_EOS = object()


def constrain(
    name: str,
    sequence: jax.Array,
    constraint: Any,
    *,
    eos_token_id: Any = _AUTOMATON_EOS,
) -> jax.Array:
    """Constrain ``sequence`` to a language: the factor ``log 1[text(s) ∈ L]``, per step.

    ``constraint`` is a :class:`~lmppl.automata.TokenAutomaton` (from :func:`regex` or
    :func:`json_schema`, built once outside the program), a
    :class:`~lmppl.grammars.Grammar` (from :func:`grammar`: checked on the host) or any
    :class:`~lmppl.types.StatefulStepPotential`. The target becomes
    ``σ(s) ∝ p0(s) · 1[text(s) ∈ L] · (other factors)``, ``text(s)`` the text before the
    first EOS (all T tokens without one), so the log Z of the bare constraint is the
    log-probability that p0's text (stopped at EOS or after ``max_new_tokens``) is in L.

    SMC carries each particle's automaton state (gathered on resampling), multiplies the
    proposal by the allowed-token mask at every step (the locally optimal proposal for the
    constraint, increment ``log Σ_{v allowed} p0(v | s_<t)``), allows EOS only in
    accepting states and only tokens from which acceptance stays reachable within the
    remaining steps. ``Exact`` and plain NumPyro see the indicator of the whole sequence.

    Args:
      name: the site's name.
      sequence: the LM site's value ``[T]``.
      constraint: the automaton (or stateful potential).
      eos_token_id: the LM site's EOS (default: the automaton's tokenizer EOS; pass None
        for a site with ``stop_at_eos=False``).

    Raises:
      ValueError: no text of the language fits in ``T`` tokens; or the automaton was
        built on a tokenizer whose size (``constraint.vocab_size``) is not the vocabulary
        of the LM site that produced ``sequence`` (checked by every lmppl backend and under
        NumPyro's ``trace``, ``log_density`` and ``Predictive``).
    """
    steps = jnp.shape(sequence)[-1]
    if isinstance(constraint, TokenAutomaton):
        if eos_token_id is _AUTOMATON_EOS:
            eos_token_id = constraint.eos_token_id
        needed = int(constraint.distance[0])
        if needed > steps:
            raise ValueError(
                f"constraint '{name}': the shortest token sequence matching "
                f"{constraint.pattern!r} has {needed} tokens; the sequence has {steps}"
            )
        potential = constraint.bind(steps, eos_token_id)
    elif isinstance(constraint, Grammar):
        if eos_token_id is _AUTOMATON_EOS:
            eos_token_id = constraint.eos_token_id
        potential = constraint.bind(steps, eos_token_id)
    else:
        if eos_token_id is _AUTOMATON_EOS:
            eos_token_id = None
        potential = constraint
    return _step_site(name, sequence, potential, eos_token_id)


def banned_tokens(
    name: str,
    sequence: jax.Array,
    token_ids: Sequence[int],
    vocab_size: int,
    *,
    eos_token_id: int | None = None,
) -> jax.Array:
    """Forbid ``token_ids`` anywhere in ``sequence`` (a per-step ``log 1[s_t ∉ banned]``)."""
    mask = np.zeros((vocab_size,), np.float32)
    mask[np.asarray(list(token_ids), dtype=np.int64)] = -np.inf
    return step_factor(
        name, sequence, lambda prefix, t: jnp.asarray(mask), eos_token_id=eos_token_id
    )
