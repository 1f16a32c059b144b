"""One SMC sweep over a program's LM site: a single jitted ``lax.scan`` over tokens.

Intermediate targets (Zhao et al. 2024, Alg. 1) with twists ψ_t, per-step potentials
m_t and final potential φ:

    π_t(s_1:t) ∝ p0(s_1:t) · Π_{k<=t} m_k(s_1:k) · ψ_t(s_1:t),     π_T ∝ p0 · Π m · φ = σ̃.

At step t every particle proposes from ``q_t(v) ∝ p0(v | s_<t) m_t(s_<t, v) ψ_t(s_<t, v)``
(``p0`` itself when there is neither twist nor step potential: bootstrap SMC) and its
log-weight grows by

    log w_t = log Σ_v p0(v | s_<t) m_t(s_<t, v) ψ_t(s_<t, v) − log ψ_{t−1}(s_<t),

which does not depend on the sampled token. After the last step ``log φ(s) − log ψ_T(s)``
is added (φ from the program's factors and observed sites, evaluated once per sweep).
Before each step the particles are resampled when ``ESS < threshold · N`` (always, or
never for importance sampling); the log-marginal estimate is

    log Ẑ = Σ_epochs log mean_i exp(log W_i)

over the resampling epochs, the last one closed by the final weights. Rows that emitted
EOS are padded with EOS and carry weight 1 (and their twist value) from then on.

A model with ``unnormalised_logits = True`` (see :mod:`lmppl.decoding`) has
``p̃0(s) = Π_t exp m_t(s_t)`` with unnormalised per-token log-weights ``m_t = logits``;
the same formulas hold with ``p0(v | s_<t)`` read as ``exp m_t(v)``, so even without
twist or step potential the proposal is ``softmax(m_t)`` and the increment is
``log Σ_v exp m_t(v)`` (never skipped as 0). E.g. global DeRa: ``m_t = (1−λ) log π_ref
+ λ log π_aligned`` and σ ∝ π_ref^(1−λ) π_aligned^λ φ exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

from lmppl.decoding import DecodeState, feed, next_token_log_weights, prefill
from lmppl.infer.program import (
    ProgramError,
    ProgramStructure,
    run_prefix,
    run_suffix,
    step_potential_functions,
)
from lmppl.infer.resampling import effective_sample_size, get_resampler
from lmppl.infer.twist import TwistInputs
from lmppl.lm.base import reorder_cache

__all__ = ["ParticleState", "StepInfo", "SweepOptions", "SweepOutput", "build_sweep"]


@dataclasses.dataclass(frozen=True)
class SweepOptions:
    """Static settings of a sweep.

    Attributes:
      num_particles: N.
      resampling: name of a scheme in :mod:`lmppl.infer.resampling` or a resampler.
      ess_threshold: resample before a step when ``ESS < ess_threshold · N``; ``None``
        never resamples (importance sampling); ``1.0`` or more resamples at every step.
      apply_step_potentials: apply per-step potentials inside the sweep (otherwise they
        are part of the final φ, as for plain SIS with p0 proposals).
      particle_sharding: a ``jax.sharding.Sharding`` for particle-leading arrays, or None.
      conditional: conditional SMC: particle 0 is clamped to a given reference sequence
        through every step and keeps its own ancestry, only the other N − 1 particles are
        resampled. With the reference an exact sample of σ, ``E[log Ẑ] >= log Z`` (the
        upper half of the bidirectional bounds).
    """

    num_particles: int
    resampling: Any = "multinomial"
    ess_threshold: float | None = 0.5
    apply_step_potentials: bool = True
    particle_sharding: Any = None
    conditional: bool = False


class ParticleState(NamedTuple):
    """Carried through the scan (leading axis N = particles).

    Fields:
      decode: cache ``[N, ...]``, next-token logits ``[N, V]``, hidden ``[N, H]``.
      tokens: ``[N, T]`` generated tokens (0 beyond the current step).
      log_weights: ``[N]`` log-weights of the current resampling epoch.
      log_psi: ``[N]`` log ψ of each particle's current prefix (0 without a twist).
      done: ``[N]`` the row has emitted EOS.
      prefix_values: ``{site: [N, ...]}`` latent sites sampled before the LM site.
      log_marginal: ``[]`` Σ of log mean weights over closed resampling epochs.
    """

    decode: DecodeState
    tokens: jax.Array
    log_weights: jax.Array
    log_psi: jax.Array
    done: jax.Array
    prefix_values: dict
    log_marginal: jax.Array


class StepInfo(NamedTuple):
    """Per-step diagnostics (stacked over steps by the scan).

    Fields:
      ess: ``[]`` ESS of the weights before the step's resampling decision.
      resampled: ``[]`` bool, whether the step resampled.
      ancestors: ``[N]`` the ancestor of each particle (identity when not resampled).
      log_weights: ``[N]`` log-weights of the current epoch after the step's increment
        (for t < T, without φ): with no resampling, the SIS weights of π_t.
    """

    ess: jax.Array
    resampled: jax.Array
    ancestors: jax.Array
    log_weights: jax.Array


class SweepOutput(NamedTuple):
    """Everything one sweep returns.

    Fields:
      tokens: ``[N, T]`` sampled sequences.
      log_weights: ``[N]`` final log-weights (last epoch).
      log_marginal: ``[]`` log Ẑ.
      log_potential: ``[N]`` log φ of each sequence (final potential only).
      site_log_probs: ``{site: [N]}`` log-probability of each observed site / factor.
      latent_values: ``{site: [N, ...]}`` other latent and deterministic sites.
      ess: ``[T + 1]`` ESS before each step's resampling and of the final weights.
      resampled: ``[T]`` bool.
      ancestors: ``[T, N]``.
      log_weight_history: ``[T, N]`` each step's log-weights (see :class:`StepInfo`).
    """

    tokens: jax.Array
    log_weights: jax.Array
    log_marginal: jax.Array
    log_potential: jax.Array
    site_log_probs: dict
    latent_values: dict
    ess: jax.Array
    resampled: jax.Array
    ancestors: jax.Array
    log_weight_history: jax.Array


def _log_mean_exp(log_weights: jax.Array) -> jax.Array:
    return logsumexp(log_weights) - jnp.log(log_weights.shape[0])


def _constrain(tree: Any, sharding: Any, num_particles: int) -> Any:
    if sharding is None:
        return tree

    def leaf(x):
        if hasattr(x, "shape") and x.ndim >= 1 and x.shape[0] == num_particles:
            return jax.lax.with_sharding_constraint(x, sharding)
        return x

    return jax.tree.map(leaf, tree)


def build_sweep(
    structure: ProgramStructure,
    program: Callable,
    options: SweepOptions,
    twist_apply: Callable[[Any, TwistInputs], jax.Array] | None,
    twist_condition: Callable[..., Any] | None = None,
) -> Callable[..., SweepOutput]:
    """The (unjitted) sweep ``sweep(rng_key, model_params, twist_params, args, kwargs, reference)``.

    ``model_params`` is a tuple aligned with ``structure.models``; ``twist_params`` is the
    twist's parameter pytree (or None); ``reference`` is the clamped sequence ``[T]`` of a
    conditional sweep (None otherwise); ``twist_condition(*args, **kwargs)``, if given, is
    handed to the twist as ``TwistInputs.condition``. The caller jits it.
    """
    site = structure.lm_site
    model = site.model
    num = options.num_particles
    steps = site.max_new_tokens
    eos = site.eos_token_id
    resample = get_resampler(options.resampling)
    threshold = options.ess_threshold
    unnormalised = bool(getattr(model, "unnormalised_logits", False))

    if options.conditional and structure.prefix_sites:
        raise ProgramError(
            "conditional SMC clamps the LM site only; the program samples latent sites "
            "before it: " + ", ".join(structure.prefix_sites)
        )

    def sweep(rng_key, model_params, twist_params, args, kwargs, reference=None):
        prefix_key, step_key, suffix_key = jax.random.split(rng_key, 3)
        lm_params = model_params[structure.models.index(model)]
        prefix_values, prompt_tokens, prompt_length = run_prefix(
            structure, program, args, kwargs, model_params, jax.random.split(prefix_key, num)
        )
        decode = prefill(model, lm_params, prompt_tokens, prompt_length, num, steps)
        condition = twist_condition(*args, **kwargs) if twist_condition is not None else None
        step_potentials = (
            step_potential_functions(structure, program, args, kwargs, model_params, prefix_key)
            if options.apply_step_potentials
            else ()
        )
        state = ParticleState(
            decode=decode,
            tokens=jnp.zeros((num, steps), jnp.int32),
            log_weights=jnp.zeros((num,), jnp.float32),
            log_psi=jnp.zeros((num,), jnp.float32),
            done=jnp.zeros((num,), bool),
            prefix_values=prefix_values,
            log_marginal=jnp.zeros((), jnp.float32),
        )
        state = _constrain(state, options.particle_sharding, num)

        def resample_branch(state: ParticleState, key):
            ancestors = resample(key, state.log_weights, num)
            if options.conditional:
                ancestors = ancestors.at[0].set(0)
            gather = lambda tree: jax.tree.map(lambda x: jnp.take(x, ancestors, axis=0), tree)
            new = ParticleState(
                decode=DecodeState(
                    reorder_cache(state.decode.cache, ancestors),
                    gather(state.decode.logits),
                    gather(state.decode.hidden),
                ),
                tokens=gather(state.tokens),
                log_weights=jnp.zeros_like(state.log_weights),
                log_psi=gather(state.log_psi),
                done=gather(state.done),
                prefix_values=gather(state.prefix_values),
                log_marginal=state.log_marginal + _log_mean_exp(state.log_weights),
            )
            return new, ancestors

        def keep_branch(state: ParticleState, key):
            return state, jnp.arange(num, dtype=jnp.int32)

        def step(state: ParticleState, inputs):
            t, key = inputs
            resample_key, sample_key = jax.random.split(key)
            ess = effective_sample_size(state.log_weights)
            if threshold is None:
                resampled = jnp.zeros((), bool)
                ancestors = jnp.arange(num, dtype=jnp.int32)
            else:
                resampled = (t > 0) & ((threshold >= 1.0) | (ess < threshold * num))
                state, ancestors = jax.lax.cond(
                    resampled, resample_branch, keep_branch, state, resample_key
                )

            log_p0 = next_token_log_weights(model, state.decode.logits, site.temperature)
            proposal_logits = log_p0
            for log_potential in step_potentials:
                step_log_weights = jax.vmap(log_potential, in_axes=(0, None))(state.tokens, t)
                proposal_logits = proposal_logits + step_log_weights
            log_psi_all = None
            if twist_apply is not None:
                inputs = TwistInputs(
                    state.decode.hidden, state.tokens, t, condition, prompt_tokens, prompt_length
                )
                log_psi_all = twist_apply(twist_params, inputs).astype(jnp.float32)
                proposal_logits = proposal_logits + log_psi_all
            if proposal_logits is log_p0 and not unnormalised:
                proposal = log_p0
                increment = jnp.zeros((num,), jnp.float32)
            else:
                log_norm = logsumexp(proposal_logits, axis=-1)
                valid = jnp.isfinite(log_norm)[:, None]
                # A row whose every candidate has weight zero is dead: propose from p0 so
                # that sampling stays defined; its weight is -inf anyway.
                proposal = jnp.where(valid, proposal_logits - log_norm[:, None], log_p0)
                # A prefix with ψ = 0 only survives on a dead row (weight already 0).
                increment = jnp.where(
                    jnp.isneginf(state.log_psi), -jnp.inf, log_norm - state.log_psi
                )
            token = jax.random.categorical(sample_key, proposal).astype(jnp.int32)
            if options.conditional:
                token = token.at[0].set(reference[t])
            new_log_psi = (
                jnp.take_along_axis(log_psi_all, token[:, None], axis=1)[:, 0]
                if log_psi_all is not None
                else state.log_psi
            )
            done = state.done
            if eos is not None:
                token = jnp.where(done, eos, token)
                increment = jnp.where(done, 0.0, increment)
                new_log_psi = jnp.where(done, state.log_psi, new_log_psi)
                done = done | (token == eos)
            decode = feed(model, lm_params, state.decode, token)
            new_state = ParticleState(
                decode=decode,
                tokens=state.tokens.at[:, t].set(token),
                log_weights=state.log_weights + increment,
                log_psi=new_log_psi,
                done=done,
                prefix_values=state.prefix_values,
                log_marginal=state.log_marginal,
            )
            new_state = _constrain(new_state, options.particle_sharding, num)
            return new_state, StepInfo(ess, resampled, ancestors, new_state.log_weights)

        keys = jax.random.split(step_key, steps)
        state, info = jax.lax.scan(step, state, (jnp.arange(steps), keys))

        log_potential, site_log_probs, later = run_suffix(
            structure,
            program,
            args,
            kwargs,
            model_params,
            jax.random.split(suffix_key, num),
            state.prefix_values,
            state.tokens,
            include_step_potentials=not options.apply_step_potentials,
        )
        log_weights = jnp.where(
            jnp.isneginf(state.log_psi),
            -jnp.inf,
            state.log_weights + log_potential - state.log_psi,
        )
        log_marginal = state.log_marginal + _log_mean_exp(log_weights)
        return SweepOutput(
            tokens=state.tokens,
            log_weights=log_weights,
            log_marginal=log_marginal,
            log_potential=log_potential,
            site_log_probs=site_log_probs,
            latent_values={**state.prefix_values, **later},
            ess=jnp.concatenate([info.ess, effective_sample_size(log_weights)[None]]),
            resampled=info.resampled,
            ancestors=info.ancestors,
            log_weight_history=info.log_weights,
        )

    return sweep
