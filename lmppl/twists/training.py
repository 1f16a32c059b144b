"""Training a twist: ``fit(program, twist, method="ctl", ...) -> (trained_twist, history)``.

One training step is one ``jax.jit``:

1. sample without gradient: SIS from the current twist-induced proposal (the sweep of
   :mod:`lmppl.infer.sweep` with no resampling) and, if the loss needs them, p0 rollouts
   (the same sweep without twist) and exact target samples (``target_sampler``);
2. one teacher-forced pass of the frozen base LM over each batch (log p0 and hidden
   states; its parameters are jit arguments, never trained) and of the twist (the only
   place gradients flow);
3. the loss of :mod:`lmppl.twists.losses`, its gradient, one optax update.

Metrics per step: ``loss``, ``ess`` (of the SIS batch's final weights, as a fraction of
N), ``log_marginal`` (the SIS estimate log Ẑ with the current twist), ``grad_norm``.
Checkpoints (``step_XXXXXXX.npz`` in ``checkpoint_dir``) are written every
``checkpoint_every`` steps and at the end; with ``resume=True`` training continues from
the latest one (parameters, optimiser state, step, history; the step keys are
``fold_in(rng_key, step)``, so a resumed run draws the same samples). A NaN loss or
gradient stops training with an error naming the step (the last good parameters are
checkpointed first when ``checkpoint_dir`` is set).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lmppl.infer.arguments import split_arguments
from lmppl.infer.program import ProgramError, discover, run_prefix
from lmppl.infer.resampling import effective_sample_size
from lmppl.infer.sweep import SweepOptions, build_sweep
from lmppl.twists.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from lmppl.twists.losses import TwistLoss, get_loss
from lmppl.twists.samples import Samples, base_pass, twist_sequence

__all__ = ["TrainingDiverged", "build_train_step", "fit"]

METRICS = ("loss", "ess", "log_marginal", "grad_norm")


class TrainingDiverged(FloatingPointError):
    """The loss or the gradient became NaN (the message names the step)."""


def build_train_step(
    program: Callable,
    twist: Any,
    loss: TwistLoss,
    optimizer: optax.GradientTransformation,
    num_particles: int,
    args: tuple,
    kwargs: dict,
    *,
    num_base_particles: int | None = None,
    twist_condition: Callable[..., Any] | None = None,
    target_sampler: Callable[[jax.Array, int], jax.Array] | None = None,
):
    """``(step, model_params, arrays)``: the jitted ``step(params, opt_state, rng_key,
    model_params, arrays) -> (params, opt_state, metrics)`` and its data arguments."""
    structure = discover(program, args, kwargs)
    if structure.step_potentials:
        raise ProgramError(
            "twist training does not support per-step potentials yet: "
            + ", ".join(s.name for s in structure.step_potentials)
        )
    arrays, _, rebuild = split_arguments(args, kwargs)
    site = structure.lm_site
    model = site.model
    num_base = num_base_particles or num_particles
    proposal_sweep = build_sweep(
        structure,
        program,
        SweepOptions(num_particles=num_particles, ess_threshold=None),
        twist.apply,
        twist_condition,
    )
    base_sweep = build_sweep(
        structure, program, SweepOptions(num_particles=num_base, ess_threshold=None), None
    )

    def step(params, opt_state, rng_key, model_params, arrays):
        call_args, call_kwargs = rebuild(arrays)
        proposal_key, base_key, target_key, prefix_key = jax.random.split(rng_key, 4)
        frozen = jax.lax.stop_gradient(params)
        lm_params = model_params[structure.models.index(model)]
        _, prompt_tokens, prompt_length = run_prefix(
            structure, program, call_args, call_kwargs, model_params, prefix_key[None]
        )
        condition = twist_condition(*call_args, **call_kwargs) if twist_condition else None

        drawn = {}
        proposal = proposal_sweep(proposal_key, model_params, frozen, call_args, call_kwargs)
        drawn["proposal"] = (
            proposal.tokens,
            proposal.log_potential,
            proposal.log_weights,
            proposal.log_weight_history,
        )
        if "base" in loss.needs:
            base = base_sweep(base_key, model_params, None, call_args, call_kwargs)
            zeros = jnp.zeros_like(base.log_weights)
            drawn["base"] = (base.tokens, base.log_potential, zeros, base.log_weight_history * 0)
        if target_sampler is not None:
            tokens = jnp.asarray(target_sampler(target_key, num_particles), jnp.int32)
            zeros = jnp.zeros((tokens.shape[0],), jnp.float32)
            drawn["target"] = (tokens, zeros, zeros, jnp.zeros(tokens.shape[::-1], jnp.float32))
        passes = {
            kind: base_pass(
                model,
                lm_params,
                prompt_tokens,
                prompt_length,
                d[0],
                site.temperature,
                site.eos_token_id,
            )
            for kind, d in drawn.items()
        }

        def objective(params):
            samples = {}
            for kind, (tokens, log_potential, log_weights, history) in drawn.items():
                log_psi = twist_sequence(
                    twist, params, passes[kind], tokens, condition, prompt_tokens, prompt_length
                )
                samples[kind] = Samples(
                    tokens,
                    log_potential,
                    log_weights,
                    history,
                    passes[kind].log_p0,
                    passes[kind].valid,
                    log_psi,
                )
            return loss.loss(samples)

        (value, extra), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        metrics = {
            "loss": value,
            "ess": effective_sample_size(proposal.log_weights) / num_particles,
            "log_marginal": proposal.log_marginal,
            "grad_norm": optax.tree.norm(grads),
            **extra,
        }
        return new_params, new_opt_state, metrics

    model_params = tuple(m.params for m in structure.models)
    return jax.jit(step), model_params, arrays


def _checkpoint_path(directory, step: int):
    from pathlib import Path

    return Path(directory) / f"step_{step:07d}.npz"


def fit(
    program: Callable,
    twist: Any,
    method: str | TwistLoss = "ctl",
    *,
    num_steps: int,
    num_particles: int,
    learning_rate: float = 1e-3,
    rng_key: jax.Array,
    args: tuple = (),
    kwargs: dict | None = None,
    optimizer: optax.GradientTransformation | None = None,
    num_base_particles: int | None = None,
    twist_condition: Callable[..., Any] | None = None,
    target_sampler: Callable[[jax.Array, int], jax.Array] | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 100,
    resume: bool = True,
    progress: bool = True,
) -> tuple[Any, dict[str, list[float]]]:
    """Train ``twist`` for ``program(*args, **kwargs)``'s LM site.

    Args:
      program: a NumPyro program with one latent ``lmppl.LM`` site (σ ∝ p0 φ).
      twist: a learned twist (:class:`~lmppl.twists.LinearTwist`, ``MLPTwist``,
        ``TransformerTwist``, ``TabularTwist``, or any object with ``params``,
        ``apply`` and ``with_params``).
      method: ``"ctl"``, ``"rl"``, ``"sixo"``, ``"fudge"``, ``"dpg"`` or a
        :class:`~lmppl.twists.losses.TwistLoss`.
      num_steps: number of gradient steps (in total, counting resumed ones).
      num_particles: N of the SIS batch (and of exact target samples).
      learning_rate: Adam's learning rate (ignored when ``optimizer`` is given).
      rng_key: the run's key; step k uses ``fold_in(rng_key, k)``.
      args, kwargs: the program's arguments.
      optimizer: an optax transformation (default ``optax.adam(learning_rate)``).
      num_base_particles: number of p0 rollouts for SIXO / FUDGE (default N).
      twist_condition: ``f(*args, **kwargs) -> pytree`` handed to the twist as
        ``TwistInputs.condition`` (conditional twists); pass the same to ``TwistedSMC``.
      target_sampler: ``f(rng_key, n) -> [n, T]`` exact samples of σ (jittable); used
        as the positives of CTL / SIXO / DPG instead of the reweighted SIS batch.
      checkpoint_dir: where to write ``step_*.npz`` checkpoints (None: none).
      checkpoint_every: steps between checkpoints.
      resume: continue from the latest checkpoint in ``checkpoint_dir``.
      progress: show a tqdm bar with loss, ESS and log Ẑ.

    Returns:
      ``(trained_twist, history)``: a copy of ``twist`` with the trained parameters, and
      ``{"step", "loss", "ess", "log_marginal", "grad_norm", "seconds"}`` lists.
    """
    kwargs = dict(kwargs or {})
    loss = get_loss(method)
    if loss.name == "fudge" and getattr(twist, "output", "log_sigmoid") != "log_sigmoid":
        raise ValueError("FUDGE fits ψ as a probability: build the twist with output='log_sigmoid'")
    if not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps must be a non-negative integer, got {num_steps!r}")
    optimizer = optimizer or optax.adam(learning_rate)
    step_fn, model_params, arrays = build_train_step(
        program,
        twist,
        loss,
        optimizer,
        num_particles,
        args,
        kwargs,
        num_base_particles=num_base_particles,
        twist_condition=twist_condition,
        target_sampler=target_sampler,
    )
    params = twist.params
    opt_state = optimizer.init(params)
    history: dict[str, list[float]] = {name: [] for name in ("step", *METRICS, "seconds")}
    start = 0
    if checkpoint_dir is not None and resume:
        found = latest_checkpoint(checkpoint_dir)
        if found is not None:
            params, loaded_state, start, history = load_checkpoint(found, params, opt_state)
            opt_state = loaded_state if loaded_state is not None else opt_state

    def checkpoint(step, params, opt_state):
        if checkpoint_dir is not None:
            save_checkpoint(
                _checkpoint_path(checkpoint_dir, step), params, opt_state, step, history
            )

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, initial=start, desc=f"twist/{loss.name}", leave=False)
    began = time.perf_counter()
    try:
        for k in range(start, num_steps):
            new_params, new_opt_state, metrics = step_fn(
                params, opt_state, jax.random.fold_in(rng_key, k), model_params, arrays
            )
            metrics = {name: float(value) for name, value in jax.device_get(metrics).items()}
            if math.isnan(metrics["loss"]) or math.isnan(metrics["grad_norm"]):
                checkpoint(k, params, opt_state)
                raise TrainingDiverged(
                    f"twist training ({loss.name}) diverged at step {k}: loss={metrics['loss']}, "
                    f"grad_norm={metrics['grad_norm']} (NaN); lower the learning rate, or check "
                    "that the potentials are finite"
                )
            params, opt_state = new_params, new_opt_state
            history["step"].append(k + 1)
            for name in METRICS:
                history[name].append(metrics[name])
            history["seconds"].append(time.perf_counter() - began)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    loss=f"{metrics['loss']:.4g}",
                    ess=f"{metrics['ess']:.3f}",
                    log_z=f"{metrics['log_marginal']:.4g}",
                )
            if checkpoint_every and (k + 1) % checkpoint_every == 0 and k + 1 < num_steps:
                checkpoint(k + 1, params, opt_state)
    finally:
        if bar is not None:
            bar.close()
    if num_steps > start:
        checkpoint(num_steps, params, opt_state)
    return twist.with_params(params), history
