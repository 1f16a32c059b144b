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
    finalize,
    init,
)
from lmppl.infer.program import ProgramStructure
from lmppl.infer.twist import TwistInputs

__all__ = ["ParticleState", "StepInfo", "SweepOptions", "SweepOutput", "build_sweep"]


def build_sweep(
    structure: ProgramStructure,
    program: Callable,
    options: SweepOptions,
    twist_apply: Callable[[Any, TwistInputs], jax.Array] | None,
    twist_condition: Callable[..., Any] | None = None,
) -> Callable[..., SweepOutput]:
    """The (unjitted) sweep ``sweep(rng_key, model_params, twist_params, args, kwargs, reference)``.

    ``model_params`` is a dict keyed by ``structure.model_keys``; ``twist_params`` is the
    twist's parameter pytree (or None); ``reference`` is the clamped sequence ``[T]`` of a
    conditional sweep (None otherwise); ``twist_condition(*args, **kwargs)``, if given, is
    handed to the twist as ``TwistInputs.condition``. The caller jits it.
    """
    check_options(structure, options)
    num = options.num_particles
    steps = structure.lm_site.max_new_tokens

    def sweep(rng_key, model_params, twist_params, args, kwargs, reference=None):
        prefix_key, step_key, suffix_key = jax.random.split(rng_key, 3)
        target = BoundProgram(structure, program, args, kwargs)
        state = init(prefix_key, target, model_params, num)
        state = _constrain(state, options.particle_sharding, num)
        condition = twist_condition(*args, **kwargs) if twist_condition is not None else None
        step = build_kernel(
            target, model_params, options, twist_apply, twist_params, condition, reference
        )

        def scan_step(state: ParticleState, inputs):
            t, key = inputs
            return step(key, state, t)

        keys = jax.random.split(step_key, steps)
        state, info = jax.lax.scan(scan_step, state, (jnp.arange(steps), keys))
        return finalize(suffix_key, target, model_params, state, info)

    return sweep
