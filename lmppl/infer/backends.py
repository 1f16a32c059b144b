"""Inference backends with one interface: ``Backend(program, ...).run(rng_key, *args, **kwargs)``.

* :class:`ImportanceSampling` — sequential importance sampling with p0 as proposal
  (no resampling); ``E[log Ẑ]`` is the IWAE lower bound.
* :class:`SMC` — bootstrap SMC, resampling when the ESS falls below a threshold (or at
  every step).
* :class:`TwistedSMC` — SMC with the twist-induced proposal of learned or given twists
  (Zhao et al. 2024).

A sampler built for N particles also runs any K <= N of them on its one compiled sweep
(:meth:`SMC.active_particles`: the particle axis is padded to N and the inactive particles
masked, see :mod:`lmppl.infer.kernel`), so :func:`lmppl.evaluation.log_z_bounds` over
several K compiles once.

All three run the same jitted sweep (:mod:`lmppl.infer.sweep`) and return an
:class:`~lmppl.infer.result.InferenceResult`. Swapping the backend never touches the
program. Compiled sweeps are cached per (program structure, static arguments).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lmppl.host_errors import reraising
from lmppl.infer.arguments import split_arguments
from lmppl.infer.boundaries import ResampleAt, check_resample_at
from lmppl.infer.kernel import OBSERVED_LM_SCORING, check_options
from lmppl.infer.program import ProgramError, ProgramStructure, discover
from lmppl.infer.resampling import padded_resampler
from lmppl.infer.result import InferenceResult
from lmppl.infer.sweep import SweepOptions, SweepOutput, build_sweep
from lmppl.infer.twist import split_twist

__all__ = [
    "SMC",
    "ActiveParticles",
    "CompiledProgram",
    "ImportanceSampling",
    "TwistedSMC",
    "check_output",
    "explaining_out_of_memory",
    "run_bytes",
    "runs_per_call",
]


class CompiledProgram(NamedTuple):
    """What :meth:`SMC.compile` returns (still unpackable as a 4-tuple).

    Fields:
      structure: the program's :class:`~lmppl.infer.program.ProgramStructure`.
      sweep: the jitted ``sweep(rng_key, model_params, twist_params, arrays, reference)
        -> SweepOutput``.
      arrays: the program's array arguments (the ``arrays`` argument of ``sweep``).
      twist_params: the twist's parameters (None without a twist or for a plain callable).
    """

    structure: ProgramStructure
    sweep: Callable[..., SweepOutput]
    arrays: list
    twist_params: Any


def _check_particles(num_particles: Any) -> int:
    if isinstance(num_particles, bool) or not isinstance(num_particles, int | np.integer):
        raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
    if num_particles < 1:
        raise ValueError(f"num_particles must be at least 1, got {num_particles}")
    return int(num_particles)


def _check_key(rng_key: Any) -> jax.Array:
    if not isinstance(rng_key, jax.Array):
        raise TypeError(
            f"run() takes a JAX random key first (jax.random.key(0)), got {type(rng_key).__name__}"
        )
    return rng_key


TWIST_ERROR_TOLERANCE = 0.01
"""Nats of float32 rounding in log Ẑ above which :func:`check_output` warns."""


def twist_rounding_error(twist_scale: float, num_steps: int) -> float:
    """Typical float32 rounding error (nats) of log Ẑ for a twist of magnitude ``twist_scale``.

    Each step rounds values of size ``|log ψ|`` to a relative 2⁻²⁴ (half an ulp); over
    ``T + 1`` weight updates the errors add like a random walk:
    ``sqrt(T + 1) · |log ψ| · 2⁻²³``. (Measured on stories260K with a per-step shift of
    log ψ: 4e-3 nats at |log ψ| ≈ 1e4, T = 10, against 4e-3 predicted.)
    """
    return math.sqrt(num_steps + 1) * twist_scale * 2.0**-23


def _check_twist_scale(output: SweepOutput, backend: str) -> None:
    """Refuse NaN / +inf twist values; warn when float32 cannot resolve the twist's scale."""
    scale = np.asarray(output.twist_scale, np.float64)
    if np.isnan(scale).any() or np.isposinf(scale).any():
        raise ValueError(
            f"{backend}: the twist returned NaN or +inf for some prefix; log ψ must be finite "
            "or -inf (ψ = 0). Check the twist (a diverged training run?)"
        )
    largest = float(scale.max()) if scale.size else 0.0
    error = twist_rounding_error(largest, int(output.tokens.shape[-1]))
    if error > TWIST_ERROR_TOLERANCE:
        warnings.warn(
            f"{backend}: the twist reaches |log ψ| = {largest:.3g}; float32 resolves it only to "
            f"±{largest * 2.0**-24:.2g}, so log Ẑ and the weights may be off by ~{error:.2g} "
            "nats. Center the twist (subtract a per-step constant) or check its training",
            RuntimeWarning,
            stacklevel=4,
        )


def check_output(output: SweepOutput, backend: str, *, conditional: bool = False) -> None:
    """Turn silent numerical failures into errors (NaN) or a warning (all weights zero).

    ``output`` is one sweep's (``log_weights [N]``) or a batch of runs' (``[R, N]``, from
    :meth:`SMC.log_marginals`). For a conditional batch, a reference (particle 0) of
    weight zero is an error: it cannot be a sample of σ, so the upper bound is void.
    """
    for name, values in output.site_log_probs.items():
        values = np.asarray(values)
        for kind, bad in (("NaN", np.isnan(values)), ("+inf", np.isposinf(values))):
            if bad.any():
                raise ValueError(
                    f"site '{name}' returned {kind} for {int(bad.sum())} of {values.size} "
                    "particles; potentials must be finite or -inf"
                )
    _check_twist_scale(output, backend)
    log_weights = np.asarray(output.log_weights)
    if np.isnan(log_weights).any():
        raise ValueError(
            f"{backend}: NaN log-weights (a twist or step potential returned NaN or +inf)"
        )
    if conditional:
        dead = np.flatnonzero(np.isneginf(log_weights[..., 0]))
        if dead.size:
            raise ValueError(
                f"{backend}: conditional SMC reference {int(dead[0])} has weight zero (outside "
                "the support of σ, or its twist is zero there): references must be samples of σ"
            )
    zero = ~np.isfinite(log_weights).any(axis=-1)
    if zero.ndim == 0 and zero:
        warnings.warn(
            f"{backend}: every particle has weight zero (the potentials are -inf for all "
            "sampled sequences); log_marginal is -inf. Try more particles or a twist.",
            RuntimeWarning,
            stacklevel=3,
        )
    elif zero.ndim == 1 and zero.any():
        warnings.warn(
            f"{backend}: in {int(zero.sum())} of {zero.size} runs every particle has weight "
            "zero (the potentials are -inf for all sampled sequences); their log_marginal "
            "is -inf. Try more particles or a twist.",
            RuntimeWarning,
            stacklevel=3,
        )


MEMORY_BUDGET_BYTES = 4 * 1024**3
"""Default budget for the runs vmapped in one call (``LMPPL_MEMORY_BUDGET`` in bytes
overrides it)."""


def run_bytes(structure: ProgramStructure, num_particles: int) -> int:
    """Estimated memory of one run of ``num_particles``: its KV cache (``N`` rows of the
    prompt plus ``T`` positions), a gathered copy of it while resampling, and a handful of
    ``[N, V]`` float32 arrays (logits, log p0, the proposal, the twist):
    ``2 · cache + 8 · N · V · 4`` bytes, an estimate that errs on the large side."""
    largest = 0
    for phase in structure.phases:  # the phases of several LM sites run one after another
        site = phase.lm_site
        model = site.model
        row_bytes = 0
        others = (o.model for o in phase.observed_lms)
        proposal = (phase.proposal,) if phase.proposal is not None else ()
        for other in (model, *others, *proposal):
            length = min(other.context_length, site.prompt_width + site.max_new_tokens)
            cache = jax.eval_shape(lambda other=other, length=length: other.init_cache(1, length))
            row_bytes += sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(cache))
        largest = max(largest, num_particles * (2 * row_bytes + 8 * model.vocab_size * 4))
    return largest


def runs_per_call(structure: ProgramStructure, num_particles: int) -> int:
    """How many vmapped runs fit the memory budget (``LMPPL_MEMORY_BUDGET`` bytes, default
    :data:`MEMORY_BUDGET_BYTES`) in one call, by :func:`run_bytes`; at least one."""
    budget = int(os.environ.get("LMPPL_MEMORY_BUDGET", MEMORY_BUDGET_BYTES))
    return max(1, budget // max(run_bytes(structure, num_particles), 1))


@contextmanager
def explaining_out_of_memory(
    backend: str, structure: ProgramStructure, num_particles: int, num_runs: int
) -> Iterator[None]:
    """Turn XLA's ``RESOURCE_EXHAUSTED`` into a one-line :class:`MemoryError` that names the
    particles and runs and says what to change."""
    try:
        yield
    except jax.errors.JaxRuntimeError as error:
        text = str(error)
        if "RESOURCE_EXHAUSTED" not in text and "Out of memory" not in text:
            raise
        per_call = min(num_runs, runs_per_call(structure, num_particles))
        estimate = per_call * run_bytes(structure, num_particles) / 1024**3
        raise MemoryError(
            f"{backend}: out of memory with {num_particles} particles x {num_runs} run(s), "
            f"{per_call} per call (about {estimate:.1f} GiB by lmppl's estimate); use fewer "
            "particles, or set LMPPL_MEMORY_BUDGET (bytes) lower to run fewer runs per call"
        ) from None


def _split_twists(structure: ProgramStructure, twist: Any) -> tuple[Any, Any]:
    """``(twist_apply, twist_params)`` of ``twist`` (None: none); for a program with several
    latent LM sites ``twist`` is a tuple over the sites and so are both results."""
    if twist is None:
        return None, None
    if not structure.continuations:
        return split_twist(twist)
    pairs = [split_twist(t) if t is not None else (None, None) for t in twist]
    return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)


class _JittedSweep:
    """A :class:`~lmppl.infer.sweep.Sweep` jitted as its two halves, ``advance`` and
    ``finish``, called one after the other: ``(rng_key, model_params, twist_params, arrays,
    reference) -> SweepOutput``. Jitted apart, the heavy half has no host callback and can
    be stored in JAX's persistent compilation cache (see :class:`~lmppl.infer.sweep.Sweep`).
    """

    def __init__(self, sweep: Any, rebuild: Callable):
        self.sweep = sweep
        self.rebuild = rebuild
        self.advance = jax.jit(self._advance)
        self.finish = jax.jit(self._finish)

    def _advance(self, rng_key, model_params, twist_params, arrays, reference, num_active=None):
        call_args, call_kwargs = self.rebuild(arrays)
        return self.sweep.advance(
            rng_key, model_params, twist_params, call_args, call_kwargs, reference, num_active
        )

    def _finish(self, suffix_key, model_params, arrays, particles, info):
        call_args, call_kwargs = self.rebuild(arrays)
        return self.sweep.finish(suffix_key, model_params, call_args, call_kwargs, particles, info)

    def __call__(self, rng_key, model_params, twist_params, arrays, reference, num_active=None):
        """One sweep; ``num_active`` (``[]`` int32 K, or None: all N) pads the particle axis
        (see :meth:`~lmppl.infer.sweep.Sweep.advance`)."""
        suffix_key, particles, info = self.advance(
            rng_key, model_params, twist_params, arrays, reference, num_active
        )
        return self.finish(suffix_key, model_params, arrays, particles, info)

    def vmapped(self, reference_axis: int | None, padded: bool = False) -> Callable:
        """The same two halves vmapped over runs (keys and, if batched, references);
        ``padded``: they take the active particle count K last (shared by the runs)."""
        in_axes: tuple = (0, None, None, None, reference_axis)
        if padded:
            in_axes = (*in_axes, None)
        advance = jax.jit(jax.vmap(self._advance, in_axes=in_axes))
        finish = jax.jit(jax.vmap(self._finish, in_axes=(0, None, None, 0, 0)))

        def runs(keys, model_params, twist_params, arrays, references, *num_active):
            suffix_keys, particles, info = advance(
                keys, model_params, twist_params, arrays, references, *num_active
            )
            return finish(suffix_keys, model_params, arrays, particles, info)

        return runs


class SMC:
    """Sequential Monte Carlo over the program's latent LM site.

    Args:
      program: a NumPyro model with one latent ``lmppl.LM`` site.
      num_particles: N.
      resampling: ``"multinomial"`` (default), ``"stratified"``, ``"systematic"``,
        ``"residual"``, or a resampler ``(rng_key, log_weights, n) -> indices``.
      ess_threshold: resample before a step when ``ESS < ess_threshold · N``;
        ``1.0`` resamples at every step (the paper's setting); ``None`` never.
      mesh: a ``jax.sharding.Mesh`` whose first axis shards the particle axis (several
        devices); N must be divisible by that axis' size. A model split over another axis
        of the same mesh (:func:`lmppl.lm.shard`, e.g. a ``(2, 4)`` mesh
        ``("particles", "model")``) keeps its layout: only the particle axis is constrained.
      resample_every: block-level steps: consider resampling only every k tokens (before
        steps k, 2k, ...); the weights stay exact (see :mod:`lmppl.infer.kernel`).
      resample_at: word-level steps: ``"word"`` resamples only the particles whose next
        token starts a new word (its text starts with whitespace, ``Ġ`` or ``▁``; or EOS),
        among themselves; a predicate ``f(token_text) -> bool`` chooses other boundary
        tokens; ``None`` (default) resamples all particles at token positions. Exact (see
        :mod:`lmppl.infer.boundaries`).
      observed_lms: how an observed LM site over the sampled sequence itself
        (``numpyro.sample("y", LM(other, prompt2, T), obs=s)``: product of experts, prompt
        intersection) is scored: ``"per_step"`` (default) as a per-step potential with its
        own KV cache (the proposal is ``∝ p0 · p_other`` token by token and the weights
        see it as it goes), ``"at_end"`` once in φ. Both are exact; per step has the lower
        variance.
      proposal: a second language model (a small draft model, same vocabulary) that
        proposes the tokens instead of p0: ``q_t ∝ p_draft · Π m_t · ψ_t`` and each token's
        ``p0 / p_draft`` joins its weight, so the target and Ẑ are unchanged; each model
        keeps its own KV cache. p0 still scores every token (its step runs too), so a
        draft buys a better-shaped proposal (e.g. a model tuned toward φ), not fewer
        target steps; ``benchmarks/RESULTS.md`` compares the cost per effective sample.
    """

    name = "SMC"

    def __init__(
        self,
        program: Callable,
        num_particles: int,
        *,
        resampling: Any = "multinomial",
        ess_threshold: float | None = 0.5,
        mesh: Any = None,
        resample_every: int = 1,
        resample_at: ResampleAt = None,
        observed_lms: str = "per_step",
        proposal: Any = None,
    ):
        if not callable(program):
            raise TypeError(
                f"program must be a callable NumPyro model, got {type(program).__name__}"
            )
        self.program = program
        self.num_particles = _check_particles(num_particles)
        if ess_threshold is not None and not ess_threshold > 0:
            raise ValueError(f"ess_threshold must be positive or None, got {ess_threshold!r}")
        self.resampling = resampling
        self.ess_threshold = ess_threshold
        self.mesh = mesh
        if isinstance(resample_every, bool) or not isinstance(resample_every, int | np.integer):
            raise ValueError(f"resample_every must be a positive integer, got {resample_every!r}")
        if resample_every < 1:
            raise ValueError(f"resample_every must be a positive integer, got {resample_every}")
        self.resample_every = int(resample_every)
        self.resample_at = check_resample_at(resample_at)
        if observed_lms not in OBSERVED_LM_SCORING:
            raise ValueError(
                f"observed_lms must be one of {OBSERVED_LM_SCORING}, got {observed_lms!r}"
            )
        self.observed_lms = observed_lms
        if proposal is not None and not (
            hasattr(proposal, "apply") and hasattr(proposal, "init_cache")
        ):
            raise TypeError(
                "proposal must be a loaded language model (lmppl.load), got "
                f"{type(proposal).__name__}"
            )
        self.proposal = proposal
        self._compiled: dict[Any, tuple[ProgramStructure, Callable]] = {}
        self._batched: dict[tuple[Callable, bool], Callable] = {}

    # Subclasses choose the twist (and what it is conditioned on).
    twist_condition: Callable[..., Any] | None = None

    def _twist_for(self, structure: ProgramStructure):
        return None

    def _sharding(self):
        if self.mesh is None:
            return None
        from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

        # The sweep places particles with sharding constraints and lets XLA propagate
        # them, so the mesh's axes are used in Auto mode (jax.make_mesh makes Explicit).
        mesh = Mesh(
            self.mesh.devices,
            self.mesh.axis_names,
            axis_types=(AxisType.Auto,) * len(self.mesh.axis_names),
        )
        axis = mesh.axis_names[0]
        size = mesh.shape[axis]
        if self.num_particles % size:
            raise ValueError(
                f"num_particles={self.num_particles} is not divisible by the {size} devices "
                f"of mesh axis '{axis}'"
            )
        return NamedSharding(mesh, PartitionSpec(axis))

    def _options(self, conditional: bool = False) -> SweepOptions:
        return SweepOptions(
            num_particles=self.num_particles,
            resampling=self.resampling,
            ess_threshold=self.ess_threshold,
            particle_sharding=self._sharding(),
            conditional=conditional,
            resample_every=self.resample_every,
            resample_at=self.resample_at,
            observed_lms=self.observed_lms,
        )

    def compile(self, *args, conditional: bool = False, **kwargs) -> CompiledProgram:
        """Discover the program's structure and build (or reuse) its jitted sweep.

        The jitted sweep is ``sweep(rng_key, model_params, twist_params, arrays,
        reference)`` with ``arrays`` the program's array arguments and ``reference`` the
        clamped sequence of a conditional sweep (None otherwise). A conditional sweep
        accepts multinomial resampling only (or none).
        """
        arrays, static_key, rebuild = split_arguments(args, kwargs)
        entry = self._compiled.get((static_key, conditional))
        if entry is None:
            structure = discover(self.program, args, kwargs).with_proposal(self.proposal)
            twist = self._twist_for(structure)
            twist_apply = _split_twists(structure, twist)[0]
            sweep = build_sweep(
                structure,
                self.program,
                self._options(conditional),
                twist_apply,
                self.twist_condition if twist is not None else None,
            )

            entry = (structure, _JittedSweep(sweep, rebuild))
            self._compiled[(static_key, conditional)] = entry
        structure, jitted = entry
        twist_params = _split_twists(structure, self._twist_for(structure))[1]
        return CompiledProgram(structure, jitted, arrays, twist_params)

    @reraising
    def run(self, rng_key: jax.Array, *args, **kwargs) -> InferenceResult:
        """Run one sweep of ``program(*args, **kwargs)`` and return weighted particles."""
        rng_key = _check_key(rng_key)
        structure, jitted, arrays, twist_params = self.compile(*args, **kwargs)
        model_params = structure.model_params()
        with explaining_out_of_memory(self.name, structure, self.num_particles, 1):
            output = jitted(rng_key, model_params, twist_params, arrays, None)
        check_output(output, self.name)
        site = structure.lm_site
        # The last LM site's tokens are the sweep's; earlier sites' are latent values.
        samples = {structure.lm_sites[-1].name: output.tokens, **output.latent_values}
        return InferenceResult(
            samples=samples,
            log_weights=output.log_weights,
            log_marginal=output.log_marginal,
            log_potential=output.log_potential,
            site_log_probs=output.site_log_probs,
            ess=output.ess,
            resampled=output.resampled,
            ancestors=output.ancestors,
            site=site.name,
            backend=self.name,
            model_name=site.model.name,
            tokenizer=site.model.tokenizer,
            eos_token_id=site.eos_token_id,
        )

    def _clampable(self, structure: ProgramStructure) -> bool:
        """Whether this sampler's sweep can also run conditionally (see :meth:`_runs`)."""
        try:
            check_options(structure, self._options(conditional=True))
        except ProgramError:
            return False
        return True

    def _runs(self, compiled: CompiledProgram, conditional: bool, padded: bool = False) -> Callable:
        """The sweep vmapped over runs and jitted once: ``(keys, params, twist, arrays,
        references)``, ``references`` ``[R, T]`` batched for a conditional sweep, else None;
        ``padded``: one more argument, the active particle count K (``[]`` int32, traced:
        every K <= N shares the compilation).

        Runs are split into chunks of at most :func:`runs_per_call` (same-size chunks, the
        last one padded, so one compilation serves them all); each run's result depends
        only on its own key, so chunking changes no number.
        """
        entry = self._batched.get((compiled.sweep, padded))
        if entry is None:
            assert isinstance(compiled.sweep, _JittedSweep)
            many = compiled.sweep.vmapped(reference_axis=0 if conditional else None, padded=padded)
            per_call = runs_per_call(compiled.structure, self.num_particles)

            def entry(keys, model_params, twist_params, arrays, references, *num_active):
                total = keys.shape[0]
                size = min(total, per_call)
                if size == total:
                    return many(keys, model_params, twist_params, arrays, references, *num_active)
                outputs = []
                for start in range(0, total, size):
                    index = jnp.arange(start, start + size) % total  # pad by wrapping
                    chunk_refs = None if references is None else references[index]
                    out = many(
                        keys[index], model_params, twist_params, arrays, chunk_refs, *num_active
                    )
                    outputs.append(out)
                joined = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *outputs)
                return jax.tree.map(lambda x: x[:total], joined)

            self._batched[(compiled.sweep, padded)] = entry
        return entry

    def supports_padding(self) -> bool:
        """Whether :meth:`active_particles` can run this sampler's settings: a built-in
        resampling scheme (or none) and no word-level steps."""
        if self.ess_threshold is None:
            return True
        return self.resample_at is None and padded_resampler(self.resampling) is not None

    def pads(self, other: Any) -> bool:
        """Whether ``other`` is this sampler with ``K <= N`` particles (same class and
        settings, the same twist and proposal objects) and this sampler can run it padded
        (:meth:`active_particles`)."""
        if type(other) is not type(self) or not self.supports_padding():
            return False
        if not isinstance(other.num_particles, int) or other.num_particles > self.num_particles:
            return False
        ignored = {"num_particles", "_compiled", "_batched"}
        mine = {k: v for k, v in vars(self).items() if k not in ignored}
        theirs = {k: v for k, v in vars(other).items() if k not in ignored}
        return mine.keys() == theirs.keys() and all(_same(mine[k], theirs[k]) for k in mine)

    def active_particles(self, num_active: int) -> ActiveParticles:
        """This sampler run with only its first ``K = num_active <= N`` particles active,
        on its own compiled sweep (the particle axis padded to N, the other N − K masked:
        log-weight −inf, never resampled; see :mod:`lmppl.infer.kernel`). Every K shares
        one compilation; each estimate has the law of a ``K``-particle sampler's (for the
        random streams see :class:`ActiveParticles`)."""
        num_active = _check_particles(num_active)
        if num_active > self.num_particles:
            raise ValueError(
                f"num_active={num_active} is more than the sampler's {self.num_particles} particles"
            )
        if not self.supports_padding():
            raise ValueError(
                f"{self.name}: a custom resampler or word-level steps cannot run on a padded "
                "particle axis; build the sampler with K particles instead"
            )
        return ActiveParticles(self, num_active)

    @reraising
    def log_marginals(self, rng_key: jax.Array, num_runs: int, *args, **kwargs) -> jax.Array:
        """``[num_runs]`` independent log Ẑ estimates, the runs vmapped in one call.

        When the sampler also allows conditional runs (multinomial or no resampling), the
        runs use the conditional sweep with nothing clamped (references of −1), so that
        :meth:`conditional_log_marginals` with as many runs reuses the same compilation
        (the lower and upper halves of :func:`lmppl.evaluation.log_z_bounds`).
        """
        return self._log_marginals(rng_key, num_runs, args, kwargs, None)

    def _many(self, compiled: CompiledProgram, conditional: bool, num_active: int | None):
        """``(runs, extra)``: :meth:`_runs` and its trailing arguments (the active count)."""
        if num_active is None:
            return self._runs(compiled, conditional), ()
        return self._runs(compiled, conditional, padded=True), (jnp.asarray(num_active, jnp.int32),)

    def _log_marginals(
        self, rng_key: jax.Array, num_runs: int, args: tuple, kwargs: dict, num_active: int | None
    ) -> jax.Array:
        rng_key = _check_key(rng_key)
        if isinstance(num_runs, bool) or not isinstance(num_runs, int | np.integer) or num_runs < 1:
            raise ValueError(f"num_runs must be a positive integer, got {num_runs!r}")
        keys = jax.random.split(rng_key, num_runs)
        compiled = self.compile(*args, **kwargs)
        if self._clampable(compiled.structure):
            compiled = self.compile(*args, conditional=True, **kwargs)
            steps = compiled.structure.total_steps
            references = jnp.full((num_runs, steps), -1, jnp.int32)
            many, extra = self._many(compiled, True, num_active)
        else:
            references = None
            many, extra = self._many(compiled, False, num_active)
        structure, _, arrays, twist_params = compiled
        with explaining_out_of_memory(self.name, structure, self.num_particles, len(keys)):
            outputs = many(keys, structure.model_params(), twist_params, arrays, references, *extra)
        check_output(outputs, self.name)
        return outputs.log_marginal

    @reraising
    def conditional_log_marginals(
        self, rng_key: jax.Array, references: jax.Array, *args, **kwargs
    ) -> jax.Array:
        """log Ẑ of conditional SMC, one run per reference sequence ``[R, T]`` → ``[R]``.

        Particle 0 is clamped to the reference through every step (it is never
        resampled away); the others are resampled as usual. With references drawn
        exactly from σ, the mean of these estimates is an upper bound on log Z (with no
        resampling: the IWAE upper bound), the counterpart of :meth:`log_marginals`.
        """
        return self._conditional_log_marginals(rng_key, references, args, kwargs, None)

    def _conditional_log_marginals(
        self,
        rng_key: jax.Array,
        references: jax.Array,
        args: tuple,
        kwargs: dict,
        num_active: int | None,
    ) -> jax.Array:
        rng_key = _check_key(rng_key)
        references = jnp.asarray(references, jnp.int32)
        if references.ndim != 2:
            raise ValueError(f"references must be [R, T] token ids, got shape {references.shape}")
        structure, jitted, arrays, twist_params = self.compile(*args, conditional=True, **kwargs)
        if references.shape[1] != structure.total_steps:
            sites = " + ".join(f"'{x.name}' {x.max_new_tokens}" for x in structure.lm_sites)
            raise ValueError(
                f"references have {references.shape[1]} tokens but the LM site(s) generate "
                f"{structure.total_steps} ({sites}; several sites: their tokens concatenated)"
            )
        if bool(jnp.any(references < 0)):
            raise ValueError("references must be token ids (non-negative)")
        keys = jax.random.split(rng_key, references.shape[0])
        compiled = CompiledProgram(structure, jitted, arrays, twist_params)
        many, extra = self._many(compiled, True, num_active)
        with explaining_out_of_memory(self.name, structure, self.num_particles, len(keys)):
            outputs = many(keys, structure.model_params(), twist_params, arrays, references, *extra)
        check_output(outputs, self.name, conditional=True)
        return outputs.log_marginal


def _same(a: Any, b: Any) -> bool:
    """Two sampler settings are the same: the same object, equal plain values, or dicts /
    tuples of such (a twist or model is compared by identity, never by ``==``)."""
    if a is b:
        return True
    plain = (str, int, float, bool, type(None))
    if isinstance(a, plain) and isinstance(b, plain):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return False


class ActiveParticles:
    """A sampler run with only its first ``K`` particles active (:meth:`SMC.active_particles`).

    ``log_marginals`` and ``conditional_log_marginals`` as the sampler's, each estimate
    distributed as a ``K``-particle sampler's: the sweep compiled for the sampler's N
    particles runs with particles ``K .. N − 1`` inert (log-weight −inf, never an ancestor;
    the ESS rule reads ``ESS < threshold · K``; each closed epoch adds
    ``logsumexp_{i<K} log W^i − log K`` to log Ẑ), so every K <= N shares one compilation.
    Random streams: with JAX's partitionable Threefry (the default) the numbers equal those
    of a sampler built with K particles for the same key, except with residual resampling
    (same law, another stream); see :mod:`lmppl.infer.kernel`.
    """

    def __init__(self, sampler: SMC, num_active: int):
        self.sampler = sampler
        self.num_particles = num_active
        self.name = sampler.name

    @reraising
    def log_marginals(self, rng_key: jax.Array, num_runs: int, *args, **kwargs) -> jax.Array:
        """``[num_runs]`` log Ẑ estimates with K particles (see :meth:`SMC.log_marginals`)."""
        return self.sampler._log_marginals(rng_key, num_runs, args, kwargs, self.num_particles)

    @reraising
    def conditional_log_marginals(
        self, rng_key: jax.Array, references: jax.Array, *args, **kwargs
    ) -> jax.Array:
        """Conditional SMC log Ẑ with K particles, one run per reference ``[R, T]`` (see
        :meth:`SMC.conditional_log_marginals`)."""
        return self.sampler._conditional_log_marginals(
            rng_key, references, args, kwargs, self.num_particles
        )


class ImportanceSampling(SMC):
    """Sequential importance sampling (SMC that never resamples), with p0 as proposal or
    ``proposal``, a second language model over the same vocabulary; ``observed_lms`` as
    :class:`SMC`."""

    name = "ImportanceSampling"

    def __init__(
        self,
        program: Callable,
        num_particles: int,
        *,
        mesh: Any = None,
        proposal: Any = None,
        observed_lms: str = "per_step",
    ):
        super().__init__(
            program,
            num_particles,
            ess_threshold=None,
            mesh=mesh,
            proposal=proposal,
            observed_lms=observed_lms,
        )


class TwistedSMC(SMC):
    """SMC with twist-induced proposals ``q_t ∝ p0 · ψ_t`` (Zhao et al. 2024, Alg. 1).

    Args:
      twists: ``{lm_site_name: twist}`` with a twist as in :mod:`lmppl.infer.twist`
        (a callable, or an object with ``params`` and ``apply``). An untrained twist
        (log ψ ≡ 0) makes this bootstrap SMC.
      resampling, ess_threshold, mesh, resample_every, resample_at, observed_lms, proposal:
        as :class:`SMC` (with a proposal model, ``q_t ∝ p_draft · ψ_t``)
        (default: resample every step, as in the paper).
      twist_condition: ``f(*args, **kwargs) -> pytree`` computed from the program's
        arguments and handed to the twist as ``TwistInputs.condition`` (e.g. the observed
        continuation of an infilling program, for a conditional twist).
    """

    name = "TwistedSMC"

    def __init__(
        self,
        program: Callable,
        num_particles: int,
        twists: dict[str, Any],
        *,
        resampling: Any = "multinomial",
        ess_threshold: float | None = 1.0,
        mesh: Any = None,
        twist_condition: Callable[..., Any] | None = None,
        resample_every: int = 1,
        resample_at: ResampleAt = None,
        observed_lms: str = "per_step",
        proposal: Any = None,
    ):
        super().__init__(
            program,
            num_particles,
            resampling=resampling,
            ess_threshold=ess_threshold,
            mesh=mesh,
            resample_every=resample_every,
            resample_at=resample_at,
            observed_lms=observed_lms,
            proposal=proposal,
        )
        if not isinstance(twists, dict) or not twists:
            raise ValueError("twists must be a dict {lm_site_name: twist}")
        if twist_condition is not None and not callable(twist_condition):
            raise TypeError("twist_condition must be a callable f(*args, **kwargs) -> pytree")
        self.twists = twists
        self.twist_condition = twist_condition

    def _twist_for(self, structure: ProgramStructure):
        if structure.continuations:  # one twist per LM site; a site without one: ψ ≡ 1
            names = [site.name for site in structure.lm_sites]
            unknown = sorted(set(self.twists) - set(names))
            if unknown:
                raise ProgramError(
                    f"twists given for {unknown}, which are not latent LM sites of the "
                    f"program ({names})"
                )
            return tuple(self.twists.get(name) for name in names)
        name = structure.lm_site.name
        if name not in self.twists:
            raise ProgramError(
                f"no twist for the LM site '{name}' (twists given for {sorted(self.twists)})"
            )
        return self.twists[name]
