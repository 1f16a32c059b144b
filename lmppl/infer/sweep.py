"""One SMC sweep over a program's LM site: :mod:`lmppl.infer.kernel` scanned over tokens.

``build_sweep`` is the facade the backends and the twist trainer jit: it splits the key
into the prefix, step and suffix keys, runs :func:`~lmppl.infer.kernel.init`, one
``lax.scan`` of the kernel's ``step`` over ``t = 0 .. T-1`` and
:func:`~lmppl.infer.kernel.finalize`. See :mod:`lmppl.infer.kernel` for the targets, the
weights and the Feynman–Kac pseudo-code.

The program is traced three times per compilation, each for a part no other trace can
serve: :func:`~lmppl.infer.program.discover` (abstractly, once per program and argument
shapes: the static structure), the prefix run in ``init`` (the latent sites before the LM
site and its prompt, per particle) and the suffix run in ``finalize`` (φ and later sites,
given the sequences); a program with per-step potentials is traced a fourth time, up to
its last potential, inside the step (its functions of the prefix). The prompt comes back
with the output (``SweepOutput.prompt_tokens``), so callers never re-run the prefix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from lmppl.infer.kernel import (
    BoundProgram,
    ParticleState,
    StepInfo,
    SweepOptions,
    SweepOutput,
    _constrain,
    build_kernel,
    check_options,
    close_phase,
    finalize,
    init,
    mask_inactive,
)
from lmppl.infer.program import ProgramStructure
from lmppl.infer.twist import TwistInputs

__all__ = ["ParticleState", "StepInfo", "Sweep", "SweepOptions", "SweepOutput", "build_sweep"]


class Sweep:
    """The (unjitted) sweep, callable as a whole or as its two halves.

    ``sweep(rng_key, model_params, twist_params, args, kwargs, reference=None)`` returns the
    :class:`SweepOutput`. The same computation in two parts::

        suffix_key, particles, info = sweep.advance(rng_key, model_params, twist_params,
                                                    args, kwargs, reference)
        output = sweep.finish(suffix_key, model_params, args, kwargs, particles, info)

    ``advance`` is the prefix and the scan over tokens (everything heavy); ``finish`` runs
    the program's suffix (φ, observed sites). Jitted apart, a host scorer of φ (a
    ``jax.pure_callback``) lives only in ``finish``: JAX does not store programs with host
    callbacks in its persistent compilation cache, so the expensive ``advance`` can still
    be loaded from disk by the next process. ``particles`` is the final
    :class:`ParticleState` without the network cache, logits and hidden states (finish
    does not read them).
    """

    def __init__(
        self,
        structure: ProgramStructure,
        program: Callable,
        options: SweepOptions,
        twist_apply: Callable[[Any, TwistInputs], jax.Array] | tuple | None,
        twist_condition: Callable[..., Any] | None,
    ):
        check_options(structure, options)
        self.structure = structure
        self.program = program
        self.options = options
        self.twist_apply = twist_apply
        self.twist_condition = twist_condition

    def _target(self, args, kwargs) -> BoundProgram:
        return BoundProgram(self.structure, self.program, args, kwargs)

    def _twists(self, twist_params) -> list[tuple[Any, Any]]:
        """``(twist_apply, twist_params)`` per phase (one phase per latent LM site; with
        several, both are tuples over the phases, ``None`` for an untwisted site)."""
        phases = self.structure.phases
        if len(phases) == 1:
            return [(self.twist_apply, twist_params)]
        applies = self.twist_apply if isinstance(self.twist_apply, tuple) else (None,) * len(phases)
        params = twist_params if twist_params is not None else (None,) * len(phases)
        return list(zip(applies, params, strict=True))

    def advance(
        self, rng_key, model_params, twist_params, args, kwargs, reference=None, num_active=None
    ):
        """``(suffix_key, particles, info)``: init and the kernel scanned over the T steps.

        A program with several latent LM sites runs one scan per site, in program order,
        each continuing the previous one's particles (:func:`~lmppl.infer.kernel.init` with
        ``previous``); ``info`` is concatenated over all their steps and ``reference`` is
        the concatenation of the sites' clamped sequences.

        ``num_active``: ``[]`` int32 K <= N (traced: one compilation for every K), a padded
        particle axis of which only the first K particles are active (initial log-weights
        ``0`` for ``i < K``, ``−inf`` after; see :mod:`lmppl.infer.kernel`): the law of an
        N = K sweep (its random stream: see :mod:`lmppl.infer.kernel`). None (default): all N particles."""
        options, num = self.options, self.options.num_particles
        prefix_key, step_key, suffix_key = jax.random.split(rng_key, 3)
        condition = (
            self.twist_condition(*args, **kwargs) if self.twist_condition is not None else None
        )
        state, infos, offset = None, [], 0
        phases = self.structure.phases
        for index, (phase, (twist_apply, phase_twist)) in enumerate(
            zip(phases, self._twists(twist_params), strict=True)
        ):
            steps = phase.lm_site.max_new_tokens
            target = BoundProgram(phase, self.program, args, kwargs)
            if state is not None:
                state = close_phase(phases[index - 1], state, options)
            phase_key = jax.random.fold_in(prefix_key, index) if index else prefix_key
            state = init(phase_key, target, model_params, num, options, previous=state)
            if index == 0 and num_active is not None:
                num_active = jnp.asarray(num_active, jnp.int32)
                state = state._replace(
                    log_weights=mask_inactive(state.log_weights, num_active),
                    num_active=num_active,
                )
            state = _constrain(state, options.particle_sharding, num)
            phase_reference = None if reference is None else reference[offset : offset + steps]
            step = build_kernel(
                target,
                model_params,
                options,
                twist_apply,
                phase_twist,
                condition if twist_apply is not None else None,
                phase_reference,
                offset,
            )

            def scan_step(state: ParticleState, inputs, step=step):
                t, key = inputs
                return step(key, state, t)

            phase_step_key = jax.random.fold_in(step_key, index) if index else step_key
            keys = jax.random.split(phase_step_key, steps)
            state, info = jax.lax.scan(scan_step, state, (jnp.arange(steps), keys))
            infos.append(info)
            offset += steps
        info = infos[0] if len(infos) == 1 else jax.tree.map(lambda *x: jnp.concatenate(x), *infos)
        slim = lambda d: d._replace(cache=None, logits=None, hidden=None)
        state = state._replace(
            decode=slim(state.decode),
            observers=tuple(slim(o) for o in state.observers),
            proposals=tuple(slim(o) for o in state.proposals),
        )
        return suffix_key, state, info

    def finish(self, suffix_key, model_params, args, kwargs, particles, info) -> SweepOutput:
        """The final potential and the closing of the last epoch (:func:`finalize`)."""
        return finalize(suffix_key, self._target(args, kwargs), model_params, particles, info)

    def __call__(
        self, rng_key, model_params, twist_params, args, kwargs, reference=None, num_active=None
    ):
        suffix_key, particles, info = self.advance(
            rng_key, model_params, twist_params, args, kwargs, reference, num_active
        )
        return self.finish(suffix_key, model_params, args, kwargs, particles, info)


def build_sweep(
    structure: ProgramStructure,
    program: Callable,
    options: SweepOptions,
    twist_apply: Callable[[Any, TwistInputs], jax.Array] | tuple | None,
    twist_condition: Callable[..., Any] | None = None,
) -> Sweep:
    """The (unjitted) :class:`Sweep` ``sweep(rng_key, model_params, twist_params, args, kwargs,
    reference)``.

    ``model_params`` is a dict keyed by ``structure.model_keys``; ``twist_params`` is the
    twist's parameter pytree (or None); ``reference`` is the clamped sequence ``[T]`` of a
    conditional sweep (None otherwise); ``twist_condition(*args, **kwargs)``, if given, is
    handed to the twist as ``TwistInputs.condition``. The caller jits it (whole, or its
    two halves ``advance`` and ``finish``). For a program with several latent LM sites
    (``structure.continuations``), ``twist_apply`` and ``twist_params`` are tuples with
    one entry per site (``None``: that site is untwisted).
    """
    return Sweep(structure, program, options, twist_apply, twist_condition)
