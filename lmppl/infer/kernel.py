"""The SMC kernel over a program's LM site, in BlackJAX's shape: ``init``, ``step``, ``finalize``.

Intermediate targets (Zhao et al. 2024, Alg. 1) with twists ψ_t, per-step potentials
m_t and final potential φ:

    π_t(s_1:t) ∝ p0(s_1:t) · Π_{k<=t} m_k(s_1:k) · ψ_t(s_1:t),     π_T ∝ p0 · Π m · φ = σ̃.

As a Feynman–Kac model (one step of the kernel per token, :func:`build_kernel`)::

    init:      x_0^i = (prompt prefilled once, prefix latents z^i ~ prior), log W_0^i = 0
    for t = 0 .. T-1:                                   # step(rng_key, state, t)
        if t > 0 and ESS(W) < threshold · N:            # resample (conditional: i = 0 kept)
            log Ẑ += log mean_i W^i ;  a ~ R(W) ;  x = x[a] ;  log W = 0
        q_t(v) ∝ p0(v | s_<t) · m_t(s_<t, v; z^i) · ψ_t(s_<t, v)        # propose
        s_t^i ~ q_t                                     # (conditional: s_t^0 = reference_t)
        log W^i += log Σ_v p0 m_t ψ_t − log ψ_{t−1}(s_<t^i)             # G_t, token-free
        feed s_t^i to the LM cache ; advance the step potentials' states (automata) with s_t^i
    finalize:  log W^i += log φ(s^i, z^i) − log ψ_T(s^i) ;  log Ẑ += log mean_i W^i

Per-step potentials m_t may carry a state per particle (``ParticleState.step_states``,
e.g. a constraint's automaton state, see :func:`lmppl.potentials.constrain`): it is
gathered with the particle on resampling and advanced with each sampled token.

The ESS rule is ``ess_threshold`` (``None``: never resample, importance sampling;
``>= 1``: every step). Block-level steps: with ``resample_every = k`` the rule is only
consulted at the block boundaries t = k, 2k, ...; inside a block every token is still
proposed and weighted as above (so step potentials keep masking each token), and the
weights accumulate over the block, so Ẑ stays unbiased and the final weights exact.
Word-level steps: with ``resample_at = "word"`` (or a predicate on token texts) each
step first draws whether a particle's next token starts a new word, and only the particles
at such a boundary are resampled, among themselves (:mod:`lmppl.infer.boundaries`: exact).
Rows that emitted EOS are padded with EOS and carry weight 1 (and their twist value) from
then on. A model that is not ``locally_normalised`` (see
:mod:`lmppl.decoding`) has ``p̃0(s) = Π_t exp m_t(s_t)``: the same formulas hold with
``p0(v | s_<t)`` read as ``exp m_t(v)`` (e.g. global DeRa targets
``π_ref^(1−λ) π_aligned^λ φ`` exactly).

Conditional SMC clamps particle 0 to a reference sequence and keeps its ancestry; the
other particles are resampled from the conditional law of the scheme given that lineage.
That law is ``a^0 = 0, a^i ~ iid Categorical(W)`` for multinomial resampling only, so a
conditional run accepts only that scheme (or no resampling). With the reference an exact
sample of σ, ``E[Z / Ẑ] = 1`` and ``E[log Ẑ] >= log Z`` (the upper bound).

Padded particle axis (``ParticleState.num_active = K``, a traced int; None: all N active):
a sweep compiled for N particles runs K <= N of them, so one compilation serves every K.
Particles i >= K are inert: their log-weight is −inf at every step (they are never an
ancestor, and their offspring never replace them), the ESS rule reads ``ESS < threshold ·
K`` (the ESS of the weights is already over the active ones), resampling draws the K
points of the K-particle scheme (:func:`~lmppl.infer.resampling.resample_active`) and
every closed epoch adds ``log Σ_{i<K} W^i − log K`` to log Ẑ. The law of the active
particles and of Ẑ is that of an unpadded K-particle sweep. The random streams need not be
the same; with JAX's partitionable Threefry (``jax_threefry_partitionable``, the default)
the first K rows of every per-particle draw are the K-particle sweep's draws, so for the
same key the padded run equals the unpadded one with multinomial, stratified or systematic
resampling or none (tested; residual resampling's categorical draw is wider, so only its
law is the same). Conditional SMC's clamped particle 0 is always active. Word-level steps
(``resample_at``) are not padded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp
from jax.sharding import NamedSharding, PartitionSpec

from lmppl.decoding import DecodeState, advance, next_token_log_weights, prefill, reorder
from lmppl.infer.boundaries import (
    ResampleAt,
    boundary_tokens,
    check_resample_at,
    draw_boundaries,
    resample_members,
    restrict,
)
from lmppl.infer.program import (
    ModelParams,
    ProgramError,
    ProgramStructure,
    observed_lm_prompts,
    per_particle_prompt,
    run_prefix,
    run_suffix,
    step_potential_functions,
)
from lmppl.infer.proposal import propose
from lmppl.infer.resampling import (
    effective_sample_size,
    get_resampler,
    multinomial,
    resample_active,
)
from lmppl.infer.twist import TwistInputs
from lmppl.lm.base import gather_rows
from lmppl.token_sampler import sample_categorical

__all__ = [
    "OBSERVED_LM_SCORING",
    "BoundProgram",
    "ParticleState",
    "StepInfo",
    "SweepOptions",
    "SweepOutput",
    "build_kernel",
    "check_options",
    "close_phase",
    "finalize",
    "init",
    "mask_inactive",
]


@dataclasses.dataclass(frozen=True)
class SweepOptions:
    """Static settings of a sweep.

    Attributes:
      num_particles: N.
      resampling: name of a scheme in :mod:`lmppl.infer.resampling` or a resampler.
      ess_threshold: resample before a step when ``ESS < ess_threshold · N``; ``None``
        never resamples (importance sampling); ``1.0`` or more resamples at every step.
      particle_sharding: a ``jax.sharding.Sharding`` for particle-leading arrays, or None.
      conditional: conditional SMC: particle 0 is clamped to a given reference sequence
        through every step and keeps its own ancestry, only the other N − 1 particles are
        resampled (multinomial resampling only). With the reference an exact sample of σ,
        ``E[log Ẑ] >= log Z`` (the upper half of the bidirectional bounds).
      resample_every: block size k: resampling is considered only before steps
        t = k, 2k, ... (block-level steps; 1: before every step).
      resample_at: ``None`` (resample all particles at token positions), ``"word"`` or a
        predicate on a token's text: resample only the particles whose next token starts
        a new word (or satisfies the predicate), among themselves
        (:mod:`lmppl.infer.boundaries`); ``resample_every`` still gates the steps.
      observed_lms: ``"per_step"`` (default): observed LM sites over the latent sequence
        (:class:`~lmppl.infer.program.ObservedLMSite`, e.g. a second prompt it must also
        fit) are per-step potentials ``log m_t(v) = log p_other(v | s_<t)``, each with its
        own KV cache, so the proposal and the weights see them token by token;
        ``"at_end"`` scores them once in φ, like any other observed site.
      record_steps: keep what the base LM gave before every step, the hidden state
        ``[N, H]`` and ``log p0(· | s_<t)`` ``[N, V]`` (:attr:`StepInfo.hidden`,
        :attr:`StepInfo.log_p0`; :attr:`SweepOutput.step_hidden`,
        :attr:`SweepOutput.step_log_p0`), so that twist training reads them instead of
        teacher-forcing the drawn sequences through the LM again. Only without
        resampling (``ess_threshold=None``): the rows are then each final sequence's own
        prefixes.
    """

    num_particles: int
    resampling: Any = "multinomial"
    ess_threshold: float | None = 0.5
    particle_sharding: Any = None
    conditional: bool = False
    resample_every: int = 1
    resample_at: ResampleAt = None
    observed_lms: str = "per_step"
    record_steps: bool = False


OBSERVED_LM_SCORING = ("per_step", "at_end")


class BoundProgram(NamedTuple):
    """A program with its (possibly traced) arguments, read as a sequential target."""

    structure: ProgramStructure
    program: Callable
    args: tuple
    kwargs: dict


class ParticleState(NamedTuple):
    """Carried from step to step (leading axis N = particles, except the prompt).

    Fields:
      decode: the particles' :class:`~lmppl.decoding.DecodeState`: cache ``[N, ...]``,
        next-token logits ``[N, V]``, hidden ``[N, H]``, tokens ``[N, T]`` (0 beyond the
        current step), ``done`` ``[N]`` (the row has emitted EOS) and ``step``.
      log_weights: ``[N]`` log-weights of the current resampling epoch.
      log_psi: ``[N]`` log ψ of each particle's current prefix (0 without a twist).
      prefix_values: ``{site: [N, ...]}`` latent sites sampled before the LM site.
      step_states: one state pytree per per-step potential (leaves ``[N, ...]``; ``()``
        for a stateless one), e.g. each particle's automaton state of a constraint.
      log_marginal: ``[]`` Σ of log mean weights over closed resampling epochs.
      prompt_tokens: ``[P]`` the LM site's prompt (right-padded), shared by all particles,
        or ``[N, P]`` when it depends on a latent site sampled before the LM site.
      prompt_length: ``[]`` (or ``[N]``) int32 its real length.
      observers: one :class:`~lmppl.decoding.DecodeState` per observed LM site scored per
        step (``SweepOptions.observed_lms``), rows gathered with the particles.
      observed_log_probs: ``[N]`` per such site: its log-probability of the prefix so far.
      proposals: ``(DecodeState,)`` of the proposal model when one proposes the tokens
        (``ProgramStructure.proposal``), else ``()``.
      reference_alive: ``[]`` bool, conditional SMC: every clamped token so far had
        positive proposal probability (a reference outside the support of σ, e.g. one a
        per-step potential forbids, gets weight zero at the end, and the backends refuse it).
      earlier_log_probs: ``{site: [N]}`` the observed LM sites scored per step in earlier
        phases (a program with several latent LM sites), gathered with the particles.
      num_active: ``[]`` int32 K, a padded particle axis of which only the first K
        particles are active (the others carry log-weight −inf), or None: all N are.
    """

    decode: DecodeState
    log_weights: jax.Array
    log_psi: jax.Array
    prefix_values: dict
    step_states: tuple
    log_marginal: jax.Array
    prompt_tokens: jax.Array
    prompt_length: jax.Array
    observers: tuple = ()
    observed_log_probs: tuple = ()
    proposals: tuple = ()
    reference_alive: Any = None
    earlier_log_probs: dict = {}  # noqa: RUF012 (a NamedTuple default, never mutated)
    num_active: Any = None


class StepInfo(NamedTuple):
    """Per-step diagnostics (stacked over steps by the sweep's scan).

    Fields:
      ess: ``[]`` ESS of the weights before the step's resampling decision.
      resampled: ``[]`` bool, whether the step resampled.
      ancestors: ``[N]`` the ancestor of each particle (identity when not resampled).
      log_weights: ``[N]`` log-weights of the current epoch after the step's increment
        (for t < T, without φ): with no resampling, the SIS weights of π_t.
      twist_scale: ``[]`` the largest ``|log ψ_t|`` the twist returned (−inf entries, ψ = 0,
        excluded; NaN or +inf when it returned such values; 0 without a twist).
      hidden: ``[N, H]`` the base LM's final hidden state before the step, or None
        (``SweepOptions.record_steps`` off).
      log_p0: ``[N, V]`` ``log p0(· | s_<t)`` before the step, or None.
    """

    ess: jax.Array
    resampled: jax.Array
    ancestors: jax.Array
    log_weights: jax.Array
    twist_scale: jax.Array
    hidden: Any = None
    log_p0: Any = None


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
      prompt_tokens: ``[P]`` the LM site's prompt (right-padded).
      prompt_length: ``[]`` int32 its real length.
      twist_scale: ``[]`` the largest ``|log ψ|`` of the sweep (see :class:`StepInfo`):
        float32 resolves log ψ to about ``twist_scale · 2⁻²⁴``, which bounds how exact
        the weights can be (:func:`~lmppl.infer.backends.check_output` warns).
      step_hidden: ``[T, N, H]`` the base LM's hidden state before each step, or None
        (``SweepOptions.record_steps`` off).
      step_log_p0: ``[T, N, V]`` ``log p0(· | s_<t)`` before each step, or None.
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
    prompt_tokens: jax.Array
    prompt_length: jax.Array
    twist_scale: jax.Array
    step_hidden: Any = None
    step_log_p0: Any = None


def _twist_scale(log_psi: jax.Array) -> jax.Array:
    """``max |log ψ|`` over the entries that are not −inf (NaN / +inf propagate)."""
    return jnp.max(jnp.where(jnp.isneginf(log_psi), 0.0, jnp.abs(log_psi)))


def _log_mean_exp(log_weights: jax.Array, num_active: Any = None) -> jax.Array:
    """``log mean_i W^i`` over the N particles, or over the first ``num_active = K``
    (the others are −inf): ``logsumexp(log W) − log K``."""
    if num_active is None:
        return logsumexp(log_weights) - jnp.log(log_weights.shape[0])
    return logsumexp(log_weights) - jnp.log(num_active.astype(jnp.float32))


def active_mask(num_particles: int, num_active: jax.Array) -> jax.Array:
    """``[N]`` bool: the particles ``i < K`` of a padded particle axis."""
    return jnp.arange(num_particles) < num_active


def mask_inactive(log_weights: jax.Array, num_active: Any) -> jax.Array:
    """``log_weights`` with the inactive particles (``i >= K``) at −inf (None: unchanged)."""
    if num_active is None:
        return log_weights
    return jnp.where(active_mask(log_weights.shape[0], num_active), log_weights, -jnp.inf)


def _constrain(state: ParticleState, sharding: Any, num_particles: int) -> ParticleState:
    """Place the particle-leading fields of ``state`` with ``sharding`` (prompt replicated)."""
    if sharding is None:
        return state
    # On a mesh with more axes than the particle one (a model split over a "model" axis,
    # lmppl.lm.shard), only the leading axis is constrained: the others are left to the
    # model's own constraints (its KV cache split over heads) and to XLA, rather than
    # forced to be replicated. On a particle-only mesh the constraint is ``sharding``.
    several_axes = isinstance(sharding, NamedSharding) and len(sharding.mesh.axis_names) > 1

    def leaf(x):
        if hasattr(x, "shape") and x.ndim >= 1 and x.shape[0] == num_particles:
            if several_axes and x.ndim > 1:
                free = (PartitionSpec.UNCONSTRAINED,) * (x.ndim - len(sharding.spec))
                placed = NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec, *free))
                return jax.lax.with_sharding_constraint(x, placed)
            return jax.lax.with_sharding_constraint(x, sharding)
        return x

    shared = ("prompt_tokens", "prompt_length")
    placed = {
        name: jax.tree.map(leaf, value)
        for name, value in state._asdict().items()
        if name not in shared
    }
    return state._replace(**placed)


def _lm_params(structure: ProgramStructure, model_params: ModelParams) -> Any:
    return model_params[structure.lm_params_key]


def _scored_observers(structure: ProgramStructure, options: SweepOptions) -> tuple:
    """The observed LM sites the kernel scores token by token under ``options``."""
    return structure.observed_lms if options.observed_lms == "per_step" else ()


def check_options(structure: ProgramStructure, options: SweepOptions) -> None:
    """Refuse settings the kernel cannot run exactly (one-line :class:`ProgramError`)."""
    every = options.resample_every
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ProgramError(f"resample_every must be a positive integer, got {every!r}")
    check_resample_at(options.resample_at)
    if structure.proposal is not None and options.resample_at is not None:
        raise ProgramError(
            "word-level steps (resample_at) with a proposal model are not supported: the "
            "proposal's weights depend on the token drawn after the boundary is"
        )
    if options.observed_lms not in OBSERVED_LM_SCORING:
        raise ProgramError(
            f"observed_lms must be one of {OBSERVED_LM_SCORING}, got {options.observed_lms!r}"
        )
    if structure.continuations and options.resample_at is not None:
        structure.refuse_several_sites("word-level steps (resample_at)")
    if options.record_steps and (options.ess_threshold is not None or options.conditional):
        raise ProgramError(
            "record_steps keeps each row's own prefixes only without resampling: "
            "set ess_threshold=None (and no conditional sweep)"
        )
    if not options.conditional:
        return
    for phase in structure.phases:
        sampled = [name for name in phase.prefix_sites if name not in phase.earlier_lm_sites]
        if sampled:
            raise ProgramError(
                "conditional SMC clamps the LM sites only; the program samples latent sites "
                f"before it ('{phase.lm_site.name}'): " + ", ".join(sampled)
            )
    resampler = options.resampling
    if options.ess_threshold is not None and resampler not in ("multinomial", multinomial):
        name = (
            resampler
            if isinstance(resampler, str)
            else getattr(resampler, "__name__", "a custom resampler")
        )
        raise ProgramError(
            f"conditional SMC needs multinomial resampling (the only scheme whose law given the "
            f"clamped reference's lineage is implemented); got {name!r}"
        )


def init(
    rng_key: jax.Array,
    target: BoundProgram,
    model_params: ModelParams,
    num_particles: int,
    options: SweepOptions | None = None,
    previous: ParticleState | None = None,
) -> ParticleState:
    """Run every particle's program up to the LM site and prefill its prompt once.

    ``rng_key`` is split into one key per particle for the latent sites sampled before the
    LM site (their values are carried by each particle). The observed LM sites scored per
    step (``options.observed_lms``) get their own prefilled caches.

    ``previous``: the final state of the previous phase of a program with several latent
    LM sites (``target.structure`` is then a later phase, see
    :attr:`~lmppl.infer.program.ProgramStructure.phases`). Its particles continue: their
    latent values and the previous site's tokens are given to the program (latent sites
    between the two LM sites are sampled from their prior), and the weights, ``log ψ``
    (the next step's increment divides by it), ``log Ẑ`` so far and the conditional
    reference's status carry over.
    """
    structure = target.structure
    site = structure.lm_site
    given = None
    if previous is not None:
        given = {**previous.prefix_values, structure.earlier_lm_sites[-1]: previous.decode.tokens}
    prefix_values, prompt_tokens, prompt_length = run_prefix(
        structure,
        target.program,
        target.args,
        target.kwargs,
        model_params,
        jax.random.split(rng_key, num_particles),
        given,
    )
    step_functions = step_potential_functions(
        structure, target.program, target.args, target.kwargs, model_params
    )
    step_states: tuple = ()
    if step_functions is not None:
        # The particle index gives vmap its axis when there are no prefix values.
        step_states = jax.vmap(lambda values, _: step_functions.init(values))(
            prefix_values, jnp.arange(num_particles)
        )
    decode = prefill(
        site.model,
        _lm_params(structure, model_params),
        prompt_tokens,
        prompt_length,
        num_particles,
        site.max_new_tokens,
    )
    observers = []
    scored = _scored_observers(structure, options or SweepOptions(num_particles))
    if scored:
        prompts = observed_lm_prompts(
            structure,
            target.program,
            target.args,
            target.kwargs,
            model_params,
            prefix_values,
            num_particles,
        )
        for observed, prompt in zip(scored, prompts, strict=True):
            observers.append(
                prefill(
                    observed.model,
                    structure.params_of(model_params, observed.model),
                    prompt.tokens,
                    prompt.length,
                    num_particles,
                    site.max_new_tokens,
                )
            )
    proposals: tuple[DecodeState, ...] = ()
    if structure.proposal is not None:
        proposals = (
            prefill(
                structure.proposal,
                structure.params_of(model_params, structure.proposal),
                prompt_tokens,
                prompt_length,
                num_particles,
                site.max_new_tokens,
            ),
        )
    zeros = jnp.zeros((num_particles,), jnp.float32)
    state = ParticleState(
        decode=decode,
        log_weights=zeros,
        log_psi=zeros,
        prefix_values=prefix_values,
        step_states=step_states,
        log_marginal=jnp.zeros((), jnp.float32),
        prompt_tokens=prompt_tokens,
        prompt_length=prompt_length,
        observers=tuple(observers),
        observed_log_probs=tuple(zeros for _ in observers),
        proposals=proposals,
        reference_alive=jnp.ones((), bool),
    )
    if previous is None:
        return state
    return state._replace(
        log_weights=previous.log_weights,
        log_psi=previous.log_psi,
        log_marginal=previous.log_marginal,
        reference_alive=previous.reference_alive,
        earlier_log_probs=previous.earlier_log_probs,
        num_active=previous.num_active,
    )


def close_phase(
    structure: ProgramStructure, state: ParticleState, options: SweepOptions
) -> ParticleState:
    """The final state of one phase of a program with several latent LM sites, ready to be
    continued (``init(..., previous=...)``): the log-probabilities of the observed LM
    sites it scored per step move to ``earlier_log_probs`` (keyed by site)."""
    names = [o.name for o in _scored_observers(structure, options)]
    scored = dict(zip(names, state.observed_log_probs, strict=True))
    return state._replace(
        observers=(),
        observed_log_probs=(),
        earlier_log_probs={**state.earlier_log_probs, **scored},
    )


def _gather_particles(state: ParticleState, ancestors: jax.Array) -> ParticleState:
    """Every per-particle field of ``state`` gathered by ``ancestors`` (weights unchanged)."""
    gather = lambda tree: jax.tree.map(lambda x: gather_rows(x, ancestors), tree)
    prompt_tokens, prompt_length = state.prompt_tokens, state.prompt_length
    if per_particle_prompt(prompt_tokens):
        prompt_tokens, prompt_length = gather((prompt_tokens, prompt_length))
    return state._replace(
        decode=reorder(state.decode, ancestors),
        log_psi=gather(state.log_psi),
        prefix_values=gather(state.prefix_values),
        step_states=gather(state.step_states),
        prompt_tokens=prompt_tokens,
        prompt_length=prompt_length,
        observers=tuple(reorder(observer, ancestors) for observer in state.observers),
        observed_log_probs=gather(state.observed_log_probs),
        proposals=tuple(reorder(proposal, ancestors) for proposal in state.proposals),
        earlier_log_probs=gather(state.earlier_log_probs),
    )


def _resample(state: ParticleState, ancestors: jax.Array) -> ParticleState:
    """Close the epoch (``log Ẑ += log mean W``) and gather every particle field."""
    return _gather_particles(state, ancestors)._replace(
        log_weights=mask_inactive(jnp.zeros_like(state.log_weights), state.num_active),
        log_marginal=state.log_marginal + _log_mean_exp(state.log_weights, state.num_active),
    )


def _regroup(
    state: ParticleState, ancestors: jax.Array, log_weights: jax.Array, log_mean: jax.Array
) -> ParticleState:
    """Gather every particle field by ``ancestors`` and set the weights (word-level steps:
    ``log_weights`` already divided by the mean ``log_mean`` moved into log Ẑ)."""
    return _gather_particles(state, ancestors)._replace(
        log_weights=log_weights, log_marginal=state.log_marginal + log_mean
    )


def build_kernel(
    target: BoundProgram,
    model_params: ModelParams,
    options: SweepOptions,
    twist_apply: Callable[[Any, TwistInputs], jax.Array] | None = None,
    twist_params: Any = None,
    condition: Any = None,
    reference: jax.Array | None = None,
    offset: int = 0,
) -> Callable[[jax.Array, ParticleState, jax.Array], tuple[ParticleState, StepInfo]]:
    """``step(rng_key, state, t) -> (state, info)``: resample, propose, weight, feed.

    Args:
      target: the program and its arguments.
      model_params: the models' parameters keyed by ``target.structure.model_keys``.
      options: static settings (:func:`check_options` must accept them).
      twist_apply: ``twist_apply(twist_params, TwistInputs) -> [N, V]`` log ψ_t, or None.
      twist_params: the twist's parameters.
      condition: handed to the twist as ``TwistInputs.condition``.
      reference: ``[T]`` the clamped sequence of a conditional sweep (None otherwise). A
        reference of −1 everywhere clamps nothing: the run is then an ordinary SMC run of
        the same compiled sweep (lower and upper bounds share one compilation).
      offset: the steps of earlier phases (a program with several latent LM sites): the
        resampling rule reads the step ``offset + t`` of the whole sweep, so the first
        step of a later phase may resample.
    """
    structure = target.structure
    check_options(structure, options)
    site = structure.lm_site
    model = site.model
    lm_params = _lm_params(structure, model_params)
    num = options.num_particles
    eos = site.eos_token_id
    resampler = get_resampler(options.resampling)
    threshold = options.ess_threshold
    normalised = model.locally_normalised
    step_functions = step_potential_functions(
        structure, target.program, target.args, target.kwargs, model_params
    )
    if step_functions is not None:
        step_log_weights = jax.vmap(step_functions.log_weights, in_axes=(0, 0, 0, None))
        step_update = jax.vmap(step_functions.update, in_axes=(0, 0, 0, None))
    drafter = structure.proposal
    if drafter is not None:
        draft_params = structure.params_of(model_params, drafter)
    scored = _scored_observers(structure, options)
    observer_params = tuple(structure.params_of(model_params, o.model) for o in scored)
    word_level = options.resample_at is not None and threshold is not None
    if word_level:
        boundary = jnp.asarray(
            boundary_tokens(
                options.resample_at, model.tokenizer, model.vocab_size, model.eos_token_id
            )
        )

    def clamps(t: jax.Array) -> jax.Array:
        """Whether particle 0 is clamped at step ``t`` (a reference of −1s clamps nothing)."""
        assert reference is not None, "a conditional sweep needs its reference [T]"
        return reference[t] >= 0

    def resample_branch(state: ParticleState, rng_key, t):
        if state.num_active is None:
            ancestors = resampler(rng_key, state.log_weights, num)
        else:  # the K-point scheme over the active particles, the others kept
            ancestors = resample_active(resampler, rng_key, state.log_weights, state.num_active)
        if options.conditional:
            ancestors = ancestors.at[0].set(jnp.where(clamps(t), 0, ancestors[0]))
        return _resample(state, ancestors), ancestors

    def keep_branch(state: ParticleState, rng_key, t):
        return state, jnp.arange(num, dtype=jnp.int32)

    def step(rng_key: jax.Array, state: ParticleState, t: jax.Array):
        if state.num_active is not None and word_level:
            raise ProgramError(
                "word-level steps (resample_at) cannot run on a padded particle axis"
            )
        resample_key, sample_key = jax.random.split(rng_key)
        ess = effective_sample_size(state.log_weights)
        active = num if state.num_active is None else state.num_active
        position = t + offset  # the step in the whole sweep (all LM sites)
        gate = (position > 0) & (position % options.resample_every == 0)
        if threshold is None or word_level:  # word-level: resampled after the proposal
            resampled = jnp.zeros((), bool)
            ancestors = jnp.arange(num, dtype=jnp.int32)
        else:
            resampled = gate & ((threshold >= 1.0) | (ess < threshold * active))
            state, ancestors = jax.lax.cond(
                resampled, resample_branch, keep_branch, state, resample_key, t
            )

        log_p0 = next_token_log_weights(model, state.decode.logits, site.temperature)
        potentials: tuple[jax.Array, ...] = ()
        if step_functions is not None:
            potentials = step_log_weights(
                state.prefix_values, state.step_states, state.decode.tokens, t
            )
        observed = tuple(  # the observed LM sites' log m_t(v) = scale · log p_other(v | s_<t)
            next_token_log_weights(o.model, observer.logits, o.temperature)
            for o, observer in zip(scored, state.observers, strict=True)
        )
        observed = tuple(
            x if o.scale == 1.0 else o.scale * x for o, x in zip(scored, observed, strict=True)
        )
        potentials = (*potentials, *observed)
        log_psi_next = None
        twist_scale = jnp.zeros((), jnp.float32)
        if twist_apply is not None:
            inputs = TwistInputs(
                state.decode.hidden,
                state.decode.tokens,
                t,
                condition,
                state.prompt_tokens,
                state.prompt_length,
            )
            log_psi_next = twist_apply(twist_params, inputs).astype(jnp.float32)
            twist_scale = _twist_scale(log_psi_next)
        if drafter is None:
            log_q, increment = propose(
                log_p0, potentials, log_psi_next, state.log_psi, normalised=normalised
            )
        else:  # q_t ∝ p_draft · Π m · ψ_t; the token's p0 / p_draft joins the weight below
            log_draft = next_token_log_weights(drafter, state.proposals[0].logits, site.temperature)
            log_q, increment = propose(log_draft, potentials, log_psi_next, state.log_psi)
        if word_level:
            boundary_key, resample_key = jax.random.split(resample_key)
            at_boundary, _ = draw_boundaries(boundary_key, log_q, boundary)
            keep_first = jnp.zeros((), bool)
            if options.conditional:  # the clamped particle's class is its reference token's
                keep_first = clamps(t)
                assert reference is not None, "a conditional sweep needs its reference [T]"
                reference_class = boundary[jnp.maximum(reference[t], 0)]
                at_boundary = at_boundary.at[0].set(
                    jnp.where(keep_first, reference_class, at_boundary[0])
                )
            if eos is not None:  # an ended row is complete: at a boundary, weight fixed
                increment = jnp.where(state.decode.done, 0.0, increment)
                at_boundary = at_boundary | state.decode.done
            resampled, ancestors, log_weights, log_mean = resample_members(
                resample_key,
                resampler,
                state.log_weights + increment,
                at_boundary & gate,
                threshold or 0.0,  # never None here (word_level)
                keep_first,
            )

            def regroup(state, proposal, ancestors, log_weights, log_mean):
                take = lambda tree: jax.tree.map(lambda x: gather_rows(x, ancestors), tree)
                return _regroup(state, ancestors, log_weights, log_mean), take(proposal)

            def keep(state, proposal, ancestors, log_weights, log_mean):
                return state._replace(log_weights=log_weights), proposal

            state, (log_q, log_psi_next, at_boundary) = jax.lax.cond(
                resampled,
                regroup,
                keep,
                state,
                (log_q, log_psi_next, at_boundary),
                ancestors,
                log_weights,
                log_mean,
            )
            increment = jnp.zeros_like(increment)  # already in the weights
            log_q = restrict(log_q, boundary, at_boundary)
        token = sample_categorical(sample_key, log_q)
        if options.conditional:
            assert reference is not None, "a conditional sweep needs its reference [T]"
            token = token.at[0].set(jnp.where(reference[t] >= 0, reference[t], token[0]))
            possible = jnp.isfinite(log_q[0, token[0]]) | ~clamps(t) | state.decode.done[0]
            state = state._replace(reference_alive=state.reference_alive & possible)
        if drafter is not None:
            at_token = lambda x: jnp.take_along_axis(x, token[:, None], axis=1)[:, 0]
            increment = increment + (at_token(log_p0) - at_token(log_draft))
        new_log_psi = (
            jnp.take_along_axis(log_psi_next, token[:, None], axis=1)[:, 0]
            if log_psi_next is not None
            else state.log_psi
        )
        if eos is not None:
            increment = jnp.where(state.decode.done, 0.0, increment)
            new_log_psi = jnp.where(state.decode.done, state.log_psi, new_log_psi)
        new_step_states = state.step_states
        if step_functions is not None:
            new_step_states = step_update(state.prefix_values, state.step_states, token, t)
            if eos is not None:  # rows already ended keep their states (EOS padding)
                new_step_states = jax.tree.map(
                    lambda new, old: jnp.where(
                        state.decode.done.reshape((-1,) + (1,) * (new.ndim - 1)), old, new
                    ),
                    new_step_states,
                    state.step_states,
                )
        chosen = tuple(
            jnp.where(state.decode.done, 0.0, jnp.take_along_axis(x, token[:, None], axis=1)[:, 0])
            for x in observed
        )
        new_state = state._replace(
            decode=advance(model, lm_params, state.decode, token, eos),
            log_weights=mask_inactive(state.log_weights + increment, state.num_active),
            log_psi=new_log_psi,
            step_states=new_step_states,
            observers=tuple(
                advance(o.model, params, observer, token, eos)
                for o, params, observer in zip(
                    scored, observer_params, state.observers, strict=True
                )
            ),
            observed_log_probs=tuple(
                total + x for total, x in zip(state.observed_log_probs, chosen, strict=True)
            ),
            proposals=tuple(
                advance(drafter, draft_params, proposal, token, eos)
                for proposal in state.proposals
                if drafter is not None
            ),
        )
        new_state = _constrain(new_state, options.particle_sharding, num)
        recorded = (state.decode.hidden, log_p0) if options.record_steps else (None, None)
        info = StepInfo(ess, resampled, ancestors, new_state.log_weights, twist_scale, *recorded)
        return new_state, info

    return step


def finalize(
    rng_key: jax.Array,
    target: BoundProgram,
    model_params: ModelParams,
    state: ParticleState,
    info: StepInfo,
) -> SweepOutput:
    """Weight by the final potential and close the last epoch.

    ``log W^i += log φ(s^i) − log ψ_T(s^i)`` (φ: every observed site and factor except the
    per-step potentials and observed LM sites the kernel applied) and ``log Ẑ += log mean_i W^i``. ``rng_key`` is
    split into one key per particle for latent sites after the LM site; ``info`` holds the
    steps' :class:`StepInfo` stacked ``[T, ...]``.
    """
    num = state.log_weights.shape[0]
    structure = target.structure
    last = structure.phases[-1]  # the last LM site's phase: its suffix is the program's
    # The observed LM sites the kernel scored per step (it kept their log-probabilities).
    scored = [o.name for o in last.observed_lms][: len(state.observed_log_probs)]
    earlier = state.earlier_log_probs
    log_potential, site_log_probs, later = run_suffix(
        last,
        target.program,
        target.args,
        target.kwargs,
        model_params,
        jax.random.split(rng_key, num),
        state.prefix_values,
        state.decode.tokens,
        include_step_potentials=False,
        scored=frozenset([*scored, *earlier]),
        applied=frozenset(p.name for phase in structure.phases for p in phase.step_potentials),
    )
    site_log_probs = {
        **site_log_probs,
        **earlier,
        **dict(zip(scored, state.observed_log_probs, strict=True)),
    }
    log_weights = jnp.where(
        jnp.isneginf(state.log_psi),
        -jnp.inf,
        state.log_weights + log_potential - state.log_psi,
    )
    log_weights = mask_inactive(log_weights, state.num_active)
    if state.reference_alive is not None:  # a clamped reference the proposal could not make
        log_weights = log_weights.at[0].set(
            jnp.where(state.reference_alive, log_weights[0], -jnp.inf)
        )
    return SweepOutput(
        tokens=state.decode.tokens,
        log_weights=log_weights,
        log_marginal=state.log_marginal + _log_mean_exp(log_weights, state.num_active),
        log_potential=log_potential,
        site_log_probs=site_log_probs,
        latent_values={**state.prefix_values, **later},
        ess=jnp.concatenate([info.ess, effective_sample_size(log_weights)[None]]),
        resampled=info.resampled,
        ancestors=info.ancestors,
        log_weight_history=info.log_weights,
        prompt_tokens=state.prompt_tokens,
        prompt_length=state.prompt_length,
        twist_scale=jnp.max(info.twist_scale),
        step_hidden=info.hidden,
        step_log_p0=info.log_p0,
    )
