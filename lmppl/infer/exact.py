"""Exact inference by enumeration, for tiny vocabularies and lengths.

Every sequence s ∈ V^T of the LM site is scored: ``log σ̃(s) = log p0(s) + log φ(s)``
with ``log φ`` the program's own factors and observed sites (per-step potentials
included, as plain NumPyro would add them), so ``log Z = logsumexp_s log σ̃(s)`` and
``σ(s) = σ̃(s) / Z`` exactly. Sequences outside the LM's support (a token other than EOS
after EOS) are dropped. The enumeration also gives the optimal twists

    ψ*_t(s_1:t) = E_p0[φ(s) | s_1:t] = Σ_{s_t+1:T} σ̃(s) / p0(s_1:t),

with which twisted SMC has zero-variance weights (log Ẑ = log Z on every run).
For a model with unnormalised logits (:mod:`lmppl.decoding`) p0 is its unnormalised
sequence weight ``Π_t exp m_t(s_t)`` and everything above holds as written.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from lmppl.decoding import force_rows, token_log_weights
from lmppl.host_errors import reraising
from lmppl.infer.arguments import split_arguments
from lmppl.infer.program import (
    ProgramError,
    ProgramStructure,
    combined_step_potential,
    discover,
    prefix_supports,
    run_prefix_given,
    run_suffix,
    step_potential_functions,
)
from lmppl.infer.result import InferenceResult
from lmppl.infer.twist import TwistInputs
from lmppl.potentials import step_log_factors

__all__ = ["Exact", "ExactTwist", "token_log_probs"]


def token_log_probs(
    structure: ProgramStructure,
    params: Any,
    prompt_tokens: jax.Array,
    prompt_length: jax.Array,
    sequences: jax.Array,
) -> jax.Array:
    """Per-token ``log p0(s_t | s_<t)`` ``[M, T]`` for sequences ``[M, T]`` (EOS padding → 0)."""
    site = structure.lm_site
    logits = force_rows(site.model, params, prompt_tokens, prompt_length, sequences).logits
    return token_log_weights(site.model, logits, sequences, site.temperature, site.eos_token_id)


class ExactTwist:
    """The optimal twist ψ*_t from an enumeration, usable by ``TwistedSMC``.

    Attributes:
      log_psi: list over t = 1..T of arrays ``[V^t]``: ``log ψ*_t`` of every prefix,
        indexed by the prefix read as a base-V number.
    """

    def __init__(self, log_psi: list[np.ndarray], vocab_size: int):
        self.log_psi = log_psi
        self.vocab_size = vocab_size
        sizes = [table.size for table in log_psi]
        self._offsets = jnp.asarray(np.concatenate([[0], np.cumsum(sizes)[:-1]]), jnp.int32)
        self._table = jnp.asarray(np.concatenate(log_psi), jnp.float32)

    def __call__(self, inputs: TwistInputs) -> jax.Array:
        tokens, step = inputs.tokens, inputs.step
        vocab = self.vocab_size
        positions = jnp.arange(tokens.shape[1])
        powers = jnp.where(positions < step, vocab ** jnp.maximum(step - 1 - positions, 0), 0)
        code = jnp.sum(tokens * powers, axis=1)
        index = self._offsets[step] + code[:, None] * vocab + jnp.arange(vocab)[None, :]
        return self._table[index]

    def at(self, prefix: list[int] | tuple[int, ...]) -> float:
        """``log ψ*_t`` of one prefix (t = its length)."""
        code = 0
        for token in prefix:
            code = code * self.vocab_size + int(token)
        return float(self.log_psi[len(prefix) - 1][code])


class Exact:
    """Enumerate every sequence of the LM site (``V^T`` of them, at most ``max_sequences``).

    ``run(rng_key, *args, **kwargs)`` returns an :class:`InferenceResult` whose particles
    are all sequences of the support, weighted by ``σ̃``: ``log_marginal`` is log Z exactly
    and ``softmax(log_weights)`` is σ. Discrete latent sites before the LM site (a persona,
    a topic; anything with ``enumerate_support``) are enumerated jointly with the sequence:
    ``σ̃(z, s) = p(z) p0(s | z) φ(s, z)``, and their values are among the samples.
    Several latent LM sites (a title, then a story) are enumerated jointly the same way:
    ``σ̃(s¹, s²) = p0(s¹) p0(s² | s¹) φ(s¹, s²)``, over ``V^(T1 + T2)`` sequences.
    """

    name = "Exact"

    def __init__(self, program: Callable, *, max_sequences: int = 1 << 16, chunk_size: int = 4096):
        self.program = program
        self.max_sequences = max_sequences
        self.chunk_size = chunk_size

    def _enumerate(self, rng_key, args, kwargs):
        structure = discover(self.program, args, kwargs)
        # Several latent LM sites: the earlier ones are enumerated as prefix latents of the
        # last one (every token sequence; log p0 of each from its prompt, -inf off support).
        structure = structure.phases[-1]
        site = structure.lm_site
        vocab, steps = site.model.vocab_size, site.max_new_tokens
        if structure.suffix_latent_sites:
            raise ProgramError(
                "Exact enumerates the LM site and the discrete latent sites before it; the "
                "program samples latent sites after it: " + ", ".join(structure.suffix_latent_sites)
            )
        supports = prefix_supports(structure, self.program, args, kwargs)
        assignments = list(itertools.product(*(range(len(v)) for v in supports.values())))
        count = vocab**steps * len(assignments)
        if count > self.max_sequences:
            sizes = "".join(f" × {len(v)} values of '{k}'" for k, v in supports.items())
            raise ProgramError(
                f"Exact would enumerate {vocab}^{steps}{sizes} = {count} sequences of site "
                f"'{site.name}', more than max_sequences={self.max_sequences}"
            )
        arrays, _, rebuild = split_arguments(args, kwargs)
        sequences = np.asarray(list(itertools.product(range(vocab), repeat=steps)), np.int32)
        model_params = structure.model_params()
        lm_params = model_params[structure.lm_params_key]

        @jax.jit
        def score(rng_key, model_params, arrays, values, chunk):
            call_args, call_kwargs = rebuild(arrays)
            log_prior, prompt_tokens, prompt_length = run_prefix_given(
                structure, self.program, call_args, call_kwargs, model_params, values
            )
            per_token = token_log_probs(structure, lm_params, prompt_tokens, prompt_length, chunk)
            keys = jax.random.split(rng_key, chunk.shape[0])
            rows = jax.tree.map(lambda v: jnp.broadcast_to(v, (chunk.shape[0], *v.shape)), values)
            log_phi, site_log_probs, _ = run_suffix(
                structure,
                self.program,
                call_args,
                call_kwargs,
                model_params,
                keys,
                rows,
                chunk,
                include_step_potentials=True,
            )
            rows_prior = jnp.broadcast_to(log_prior, (chunk.shape[0],))
            return per_token, log_phi + log_prior, site_log_probs, rows_prior

        pieces = []
        latents: dict[str, list[np.ndarray]] = {name: [] for name in supports}
        for assignment in assignments:
            values = {k: v[i] for (k, v), i in zip(supports.items(), assignment, strict=True)}
            for start in range(0, len(sequences), self.chunk_size):
                chunk = jnp.asarray(sequences[start : start + self.chunk_size])
                pieces.append(jax.device_get(score(rng_key, model_params, arrays, values, chunk)))
                for name, value in values.items():
                    latents[name].append(np.repeat(np.asarray(value)[None], len(chunk), axis=0))
        per_token = np.concatenate([p[0] for p in pieces])
        log_phi = np.concatenate([p[1] for p in pieces])
        site_log_probs = {
            name: np.concatenate([p[2][name] for p in pieces]) for name in pieces[0][2]
        }
        log_prior = np.concatenate([p[3] for p in pieces])
        # A sequence outside the support: its own p0 or its prefix sites' prior is zero.
        per_token = np.where(np.isneginf(log_prior)[:, None], -np.inf, per_token)
        all_sequences = np.tile(sequences, (len(assignments), 1))
        prefix_values = {name: np.concatenate(parts) for name, parts in latents.items()}
        return structure, all_sequences, per_token, log_phi, site_log_probs, prefix_values

    @reraising
    def run(self, rng_key: jax.Array | None = None, *args, **kwargs) -> InferenceResult:
        """Enumerate and return the exact target as a weighted result.

        Enumeration is deterministic (the program may have no latent site besides the LM
        site), so ``rng_key`` may be None; it is taken first for parity with the backends.
        """
        rng_key = jax.random.key(0) if rng_key is None else rng_key  # seeds no random site
        structure, sequences, per_token, log_phi, site_log_probs, prefix_values = self._enumerate(
            rng_key, args, kwargs
        )
        for name, values in site_log_probs.items():
            if np.isnan(values).any():
                raise ValueError(f"site '{name}' returned NaN for some sequences")
        log_p0 = per_token.sum(axis=1)
        keep = np.isfinite(log_p0)
        log_target = log_p0 + log_phi
        site = structure.lm_site
        return InferenceResult(
            samples={
                site.name: jnp.asarray(sequences[keep]),
                **{name: jnp.asarray(values[keep]) for name, values in prefix_values.items()},
            },
            log_weights=jnp.asarray(log_target[keep]),
            log_marginal=logsumexp(jnp.asarray(log_target[keep])),
            log_potential=jnp.asarray(log_phi[keep]),
            site_log_probs={k: jnp.asarray(v[keep]) for k, v in site_log_probs.items()},
            ess=None,
            resampled=None,
            ancestors=None,
            site=site.name,
            backend=self.name,
            model_name=site.model.name,
            tokenizer=site.model.tokenizer,
            eos_token_id=site.eos_token_id,
        )

    def _step_log_factors(self, structure, args, kwargs, sequences) -> np.ndarray:
        """``[M, T]`` each step's ``Σ log m_t(s_<t, s_t)`` over the per-step potentials
        (0 after the first EOS and without potentials), the states advanced token by token
        as the sweep does."""
        if not structure.step_potentials:
            return np.zeros(sequences.shape, np.float32)
        functions = step_potential_functions(
            structure, self.program, args, kwargs, structure.model_params()
        )
        assert functions is not None, "the structure has step potentials"
        combined = combined_step_potential(functions)
        eos = structure.lm_site.eos_token_id
        factors = jax.jit(jax.vmap(lambda row: step_log_factors(combined, row, eos)))
        return np.asarray(factors(jnp.asarray(sequences)))

    @reraising
    def optimal_twist(self, *args, rng_key: jax.Array | None = None, **kwargs) -> ExactTwist:
        """``ψ*_t(s_1:t) = E_p0[Π_{k>t} m_k · φ | s_1:t]`` for every prefix, as a twist for
        TwistedSMC.

        Per-step potentials ``m_k`` are folded into the twist the same way SMC applies them
        (the proposal multiplies p0 by ``m_t`` before the twist): ``ψ*_t`` covers the
        potentials of steps after t and φ, so twisted SMC is exact on every run.
        """
        rng_key = jax.random.key(0) if rng_key is None else rng_key
        structure, sequences, per_token, log_phi, _, _ = self._enumerate(rng_key, args, kwargs)
        if structure.prefix_sites:
            raise ProgramError(
                "optimal_twist needs a program without latent sites before the LM site: "
                + ", ".join(structure.prefix_sites)
            )
        vocab, steps = structure.lm_site.model.vocab_size, structure.lm_site.max_new_tokens
        log_target = per_token.sum(axis=1) + log_phi
        log_target = np.where(np.isnan(log_target), -np.inf, log_target)
        tables = []
        # Per-step potentials are applied by the sweep before the twist: ψ*_t divides by
        # p0(s_1:t) Π_{k≤t} m_k(s_1:k), so it covers the factors of later steps and φ.
        factors = self._step_log_factors(structure, args, kwargs, sequences)
        with np.errstate(invalid="ignore"):
            prefix_log_p0 = np.cumsum(per_token + factors, axis=1)
        for t in range(1, steps + 1):
            codes = np.zeros(len(sequences), np.int64)
            for k in range(t):
                codes = codes * vocab + sequences[:, k]
            numerator = np.full(vocab**t, -np.inf)
            np.logaddexp.at(numerator, codes, log_target)
            denominator = np.full(vocab**t, -np.inf)
            denominator[codes] = prefix_log_p0[:, t - 1]
            with np.errstate(invalid="ignore"):
                table = np.where(np.isneginf(denominator), -np.inf, numerator - denominator)
            tables.append(table)
        return ExactTwist(tables, vocab)
