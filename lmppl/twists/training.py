"""Training a twist: ``fit(program, twist, method="ctl", ...) -> (trained_twist, history)``.

One training step is one ``jax.jit``:

1. sample without gradient: SIS from the current twist-induced proposal (the sweep of
   :mod:`lmppl.infer.sweep` with no resampling) and, if the loss needs them, p0 rollouts
   (the same sweep without twist) and exact target samples (``target_sampler``);
2. one teacher-forced pass of the frozen base LM over each batch (log p0 and hidden
   states; its parameters are jit arguments, never trained) and of the twist (the only
   place gradients flow);
3. the loss of :mod:`lmppl.twists.losses`, its gradient, one optax update.

Fresh program arguments per step (conditional targets such as infilling, where the
twist must see many conditions): ``args_sampler(step_key)`` returns the step's arguments,
either a tuple ``args`` or a :class:`StepArguments` ``(args, kwargs, targets)`` whose
``targets`` ``[m, T]`` are exact samples of σ given those arguments (the positives of
CTL / SIXO / DPG for that step, e.g. the latent half of a joint (sequence, condition)
draw). The arrays must keep their shapes and dtypes (and the static arguments their
values), so the jitted step is compiled once: they enter it as arguments.

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
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lmppl.host_errors import reraising
from lmppl.infer.arguments import split_arguments
from lmppl.infer.program import (
    ProgramError,
    discover,
    per_particle_prompt,
    step_potential_functions,
)
from lmppl.infer.resampling import effective_sample_size
from lmppl.infer.sweep import SweepOptions, build_sweep
from lmppl.training.loop import TrainingDiverged, run_training
from lmppl.twists.losses import TwistLoss, get_loss
from lmppl.twists.mixture import defensive_mixture
from lmppl.twists.monitor import BoundsMonitor, TwistGapWarning
from lmppl.twists.samples import (
    Samples,
    base_pass,
    recorded_pass,
    step_log_weights,
    twist_sequence,
)

__all__ = [
    "BATCHES",
    "StepArguments",
    "TrainingDiverged",
    "TwistGapWarning",
    "build_train_step",
    "fit",
]

METRICS = ("loss", "ess", "log_marginal", "grad_norm", "param_norm")
#: A step whose parameter norm exceeds this multiple of max(1, the initial norm) diverged.
BLOW_UP = 1e4

#: Training batches: ``"mixture"`` pools the SIS batch of the twisted proposal with p0
#: rollouts (balance-heuristic weights, :mod:`lmppl.twists.mixture`); ``"proposal"`` is
#: the SIS batch alone (the paper's recipe, which can drop modes of σ).
BATCHES = ("mixture", "proposal")
#: The losses whose σ / π_t expectations use the (pooled) importance-weighted batch.
MIXTURE_LOSSES = ("ctl", "sixo", "dpg")
#: The losses exact with per-step potentials m_t: every density they read is the sweep's,
#: ``p0 m ψ`` (CTL, RL's soft-Bellman targets, DPG's q); SIXO's p0-rollout negatives and
#: FUDGE's labels of p0 rollouts estimate a ratio to p0, which the untwisted sweep's
#: rollouts (drawn from ``q0 ∝ p0 m``) do not sample.
STEP_POTENTIAL_LOSSES = ("ctl", "rl", "dpg")
#: What ``fit(eval_every=...)`` records (as ``bound_<name>``).
BOUND_NAMES = ("lower", "lower_error", "upper", "upper_error", "gap")


class StepArguments(NamedTuple):
    """One training step's program arguments (what ``fit(args_sampler=...)`` may return).

    Fields:
      args: the program's positional arguments (same shapes and dtypes at every step).
      kwargs: its keyword arguments (None: ``fit``'s own ``kwargs``).
      targets: ``[m, T]`` int token ids, exact samples of σ for these arguments (e.g. the
        sequence drawn jointly with an infilling condition), used as the positives of
        CTL / SIXO / DPG instead of the reweighted SIS batch; None: no exact positives.
    """

    args: tuple
    kwargs: dict | None = None
    targets: Any = None


def _check_step_potentials(structure: Any, loss: TwistLoss, mixture: bool) -> bool:
    """Whether the step needs the per-step potentials' ``log m_t`` along the sampled
    sequences (``Samples.log_step``); a one-line :class:`ProgramError` for the losses and
    programs that cannot train exactly with them."""
    if not structure.step_potentials:
        return False
    names = ", ".join(s.name for s in structure.step_potentials)
    if loss.name not in STEP_POTENTIAL_LOSSES:
        raise ProgramError(
            f"twist training with per-step potentials ({names}) does not support method="
            f"'{loss.name}': its p0-rollout negatives or labels target ψ relative to p0, but "
            "the untwisted sweep draws from p0·m_t normalised per step; use method='ctl', "
            "'rl' or 'dpg'"
        )
    needed = mixture or loss.name != "ctl"  # CTL on the SIS batch reads only the weights
    if needed and structure.prefix_sites:
        raise ProgramError(
            f"twist training with per-step potentials ({names}) and latent sites before the "
            f"LM site ({', '.join(structure.prefix_sites)}) supports method='ctl' with "
            f"batch='proposal' only; got method='{loss.name}', "
            f"batch='{'mixture' if mixture else 'proposal'}'"
        )
    return needed


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
    batch: str = "mixture",
):
    """``(step, model_params, arrays)``: the jitted ``step(params, opt_state, rng_key,
    model_params, arrays, targets=None) -> (params, opt_state, metrics)`` and its data
    arguments. ``arrays`` are the program's array arguments (replace them with those of
    other arguments of the same shapes: no recompilation); ``targets`` ``[m, T]`` are
    exact σ samples for them (the positives; exclusive with ``target_sampler``)."""
    structure = discover(program, args, kwargs)
    structure.refuse_several_sites("twist training")
    arrays, _, rebuild = split_arguments(args, kwargs)
    site = structure.lm_site
    model = site.model
    num_base = num_base_particles or num_particles
    if batch not in BATCHES:
        raise ValueError(f"batch must be one of {BATCHES}, got {batch!r}")
    mixture = batch == "mixture" and loss.name in MIXTURE_LOSSES
    needs_base = "base" in loss.needs or mixture
    step_factors = _check_step_potentials(structure, loss, mixture)
    proposal_sweep = build_sweep(
        structure,
        program,
        SweepOptions(
            num_particles=num_particles,
            ess_threshold=None,
            observed_lms="at_end",
            record_steps=True,
        ),
        twist.apply,
        twist_condition,
    )
    base_sweep = build_sweep(
        structure,
        program,
        SweepOptions(
            num_particles=num_base, ess_threshold=None, observed_lms="at_end", record_steps=True
        ),
        None,
    )

    def step(params, opt_state, rng_key, model_params, arrays, targets=None):
        call_args, call_kwargs = rebuild(arrays)
        proposal_key, base_key, target_key = jax.random.split(rng_key, 3)
        frozen = jax.lax.stop_gradient(params)
        lm_params = model_params[structure.lm_params_key]
        condition = twist_condition(*call_args, **call_kwargs) if twist_condition else None

        drawn = {}
        passes = {}  # the base LM along the drawn sequences: recorded by the sweeps
        proposal = proposal_sweep(proposal_key, model_params, frozen, call_args, call_kwargs)
        passes["proposal"] = recorded_pass(proposal, site.eos_token_id)
        prompt_tokens, prompt_length = proposal.prompt_tokens, proposal.prompt_length
        if per_particle_prompt(prompt_tokens):
            raise ProgramError(
                f"the prompt of the LM site '{site.name}' depends on a latent site sampled "
                "before it; twist training needs one prompt shared by all particles"
            )
        drawn["proposal"] = (
            proposal.tokens,
            proposal.log_potential,
            proposal.log_weights,
            proposal.log_weight_history,
        )
        if needs_base:
            base = base_sweep(base_key, model_params, None, call_args, call_kwargs)
            passes["base"] = recorded_pass(base, site.eos_token_id)
            zeros = jnp.zeros_like(base.log_weights)
            drawn["base"] = (base.tokens, base.log_potential, zeros, base.log_weight_history * 0)
        if targets is not None or target_sampler is not None:
            if targets is not None:
                tokens = jnp.asarray(targets, jnp.int32)
            else:
                tokens = jnp.asarray(target_sampler(target_key, num_particles), jnp.int32)
            zeros = jnp.zeros((tokens.shape[0],), jnp.float32)
            drawn["target"] = (tokens, zeros, zeros, jnp.zeros(tokens.shape[::-1], jnp.float32))
        step_logs: dict[str, Any] = dict.fromkeys(drawn)
        if step_factors:  # log m_t of every candidate, the potentials' states teacher-forced
            functions = step_potential_functions(
                structure, program, call_args, call_kwargs, model_params
            )
            step_logs = {
                kind: step_log_weights(functions, d[0], site.eos_token_id)
                for kind, d in drawn.items()
            }
        for kind, d in drawn.items():  # exact positives: teacher-forced through the LM
            if kind not in passes:
                passes[kind] = base_pass(
                    model,
                    lm_params,
                    prompt_tokens,
                    prompt_length,
                    d[0],
                    site.temperature,
                    site.eos_token_id,
                )

        def objective(params):
            samples = {}
            for kind, (tokens, log_potential, log_weights, history) in drawn.items():
                log_psi = twist_sequence(
                    twist,
                    params,
                    passes[kind],
                    tokens,
                    condition,
                    prompt_tokens,
                    prompt_length,
                    columns=loss.token_gradient,
                )
                columns = None
                if loss.token_gradient:
                    log_psi, columns = log_psi
                samples[kind] = Samples(
                    tokens,
                    log_potential,
                    log_weights,
                    history,
                    passes[kind].log_p0,
                    passes[kind].valid,
                    log_psi,
                    step_logs[kind],
                    columns,
                )
            if mixture:
                samples["proposal"] = defensive_mixture(samples["proposal"], samples["base"])
            return loss.loss(samples)

        (value, extra), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        metrics = {
            "loss": value,
            "ess": effective_sample_size(proposal.log_weights) / num_particles,
            "log_marginal": proposal.log_marginal,
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(new_params),
            "finite": jnp.all(
                jnp.stack(
                    [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves((new_params, new_opt_state))]
                )
            ),
            **extra,
        }
        return new_params, new_opt_state, metrics

    model_params = structure.model_params()
    return jax.jit(step), model_params, arrays


@reraising
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
    args_sampler: Callable[[jax.Array], tuple | StepArguments] | None = None,
    batch: str = "mixture",
    eval_every: int | None = None,
    exact_samples: Any = None,
    eval_particles: int = 256,
    eval_runs: int = 8,
    gap_tolerance: float = 0.2,
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
      args_sampler: ``f(step_key) -> args`` or ``-> StepArguments(args, kwargs, targets)``:
        fresh program arguments for every step (e.g. a new infilling condition), with the
        shapes and dtypes of ``args`` / ``kwargs`` (which then serve to compile the step
        only). ``StepArguments.targets`` ``[m, T]``, exact σ samples for those arguments,
        are that step's positives (exclusive with ``target_sampler``); ``step_key`` is
        ``fold_in(fold_in(rng_key, k), 1)``, so resumed runs see the same arguments.
        One exact positive per step is unbiased but noisy: average several conditions per
        update with ``optimizer=optax.MultiSteps(optax.adam(lr), every_k_schedule=C)``.
      batch: the importance-weighted batch behind the σ and π_t expectations of CTL,
        SIXO and DPG (when no exact positives are given): ``"mixture"`` (default) pools
        the SIS batch of the twisted proposal with ``num_base_particles`` p0 rollouts and
        weights both by the balance heuristic (:mod:`lmppl.twists.mixture`), so modes of
        σ that the proposal misses are still seen through p0; ``"proposal"`` is the SIS
        batch alone (the paper's recipe; it can drop modes of σ and then return a twist
        whose log Ẑ is precise and wrong). With per-step potentials m_t (``banned_tokens``,
        ``constrain``, grammars) both batches are exact for CTL, RL and DPG: the rollouts
        are the untwisted sweep's (``q0 ∝ p0 m_t`` per step) and every weight reads
        ``p0 Π m``; SIXO and FUDGE are refused there (as is a mixture batch, or RL / DPG,
        for a program with latent sites before the LM site).
      eval_every: evaluate the twist every ``eval_every`` steps and after the last one:
        the twisted-SMC lower bound on log Z at K = ``eval_particles`` and, with
        ``exact_samples``, the conditional-SMC upper bound (``eval_runs`` runs each;
        :class:`~lmppl.twists.monitor.BoundsMonitor`). The history gets ``bound_lower``,
        ``bound_upper`` and ``bound_gap`` (NaN at steps not evaluated) and
        ``best_step``, and ``fit`` returns the **best evaluated** parameters: the
        smallest gap (with exact samples), else the highest lower bound. None: no
        evaluation, the last parameters are returned.
      exact_samples: ``[M, T]`` exact samples of σ for ``args`` / ``kwargs`` (e.g.
        ``lmppl.evaluation.rejection_sample(...)``) for the upper bound.
      eval_particles, eval_runs: K and the number of runs of each evaluation.
      gap_tolerance: warn (:class:`~lmppl.twists.monitor.TwistGapWarning`) when the best
        evaluated gap is larger than this (nats): the twist's estimates of log Z (and its
        samples) cannot be trusted.
      checkpoint_dir: where to write ``step_*.npz`` checkpoints (None: none) and, with
        ``eval_every``, ``best.npz``.
      checkpoint_every: steps between checkpoints.
      resume: continue from the latest checkpoint in ``checkpoint_dir``.
      progress: show a tqdm bar with loss, ESS and log Ẑ.

    Returns:
      ``(trained_twist, history)``: a copy of ``twist`` with the trained (or, with
      ``eval_every``, the best evaluated) parameters, and ``{"step", "loss", "ess",
      "log_marginal", "grad_norm", "seconds"}`` lists (one entry per step), plus
      ``bound_*`` lists and the int ``best_step`` with ``eval_every``.
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
        batch=batch,
    )
    _, static_key, _ = split_arguments(args, kwargs)
    target_rows: list[int] = []

    def step_data(step_key: jax.Array, k: int) -> tuple[list, Any]:
        """The step's array arguments and exact positives (None: the fixed ones)."""
        if args_sampler is None:
            return arrays, None
        drawn = args_sampler(jax.random.fold_in(step_key, 1))
        if not isinstance(drawn, StepArguments):
            drawn = StepArguments(tuple(drawn))
        step_arrays, step_static, _ = split_arguments(
            tuple(drawn.args), kwargs if drawn.kwargs is None else dict(drawn.kwargs)
        )
        if step_static != static_key:
            raise ValueError(
                f"args_sampler returned arguments at step {k} whose structure, shapes, dtypes "
                "or static values differ from args/kwargs given to fit (they must match, so "
                "the training step compiles once)"
            )
        targets = drawn.targets
        if targets is not None:
            if target_sampler is not None:
                raise ValueError("give exact positives by target_sampler or args_sampler, not both")
            targets = jnp.asarray(targets, jnp.int32)
            if targets.ndim != 2:
                raise ValueError(f"StepArguments.targets must be [m, T], got {targets.shape}")
            if not target_rows:
                target_rows.append(targets.shape[0])
            elif target_rows[0] != targets.shape[0]:
                raise ValueError(
                    f"StepArguments.targets has {targets.shape[0]} rows at step {k}, "
                    f"{target_rows[0]} before (keep it fixed: no recompilation)"
                )
        return step_arrays, targets

    def step(k, params, opt_state):
        step_key = jax.random.fold_in(rng_key, k)
        step_arrays, targets = step_data(step_key, k)
        return step_fn(params, opt_state, step_key, model_params, step_arrays, targets)

    initial_norm = float(optax.tree.norm(twist.params))
    limit = BLOW_UP * max(1.0, initial_norm)

    def diverged(k, metrics):
        finite = all(math.isfinite(metrics[n]) for n in ("loss", "grad_norm", "param_norm"))
        if not finite or not metrics["finite"]:
            return (
                f"twist training ({loss.name}) diverged at step {k}: loss={metrics['loss']}, "
                f"grad_norm={metrics['grad_norm']}, parameters or optimiser state not finite; "
                "the last finite parameters are kept; lower the learning rate, or check that "
                "the potentials are finite"
            )
        if metrics["param_norm"] > limit:
            return (
                f"twist training ({loss.name}) diverged at step {k}: the parameter norm "
                f"{metrics['param_norm']:.3g} is over {BLOW_UP:g}× its initial value "
                f"{initial_norm:.3g} (a twist this large makes float32 weights meaningless); "
                "the last parameters below that are kept; lower the learning rate"
            )
        return None

    evaluate = None
    if eval_every is not None:
        if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1:
            raise ValueError(f"eval_every must be a positive integer or None, got {eval_every!r}")
        site_name = discover(program, args, kwargs).lm_site.name
        monitor = BoundsMonitor(
            program,
            site_name,
            args=args,
            kwargs=kwargs,
            exact_samples=exact_samples,
            num_particles=eval_particles,
            num_runs=eval_runs,
            twist_condition=twist_condition,
        )
        eval_key = jax.random.fold_in(rng_key, 2**31 - 1)  # apart from the step keys

        def evaluate(k, params):
            values = monitor(twist.with_params(params), jax.random.fold_in(eval_key, k))
            return {f"bound_{name}": value for name, value in values.items()}

    elif exact_samples is not None:
        raise ValueError("exact_samples are used by the evaluation: pass eval_every too")

    def score(values):
        gap = values["bound_gap"]
        return abs(gap) if math.isfinite(gap) else -values["bound_lower"]

    def postfix(m):
        shown = {
            "loss": f"{m['loss']:.4g}",
            "ess": f"{m['ess']:.3f}",
            "log_z": f"{m['log_marginal']:.4g}",
        }
        if "bound_lower" in m:
            shown["lower"] = f"{m['bound_lower']:.3f}"
            if math.isfinite(m["bound_gap"]):
                shown["gap"] = f"{m['bound_gap']:.3f}"
        return shown

    params, history, best = run_training(
        step,
        twist.params,
        optimizer.init(twist.params),
        num_steps=num_steps,
        metric_names=METRICS,
        diverged=diverged,
        postfix=postfix,
        description=f"twist/{loss.name}",
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        resume=resume,
        progress=progress,
        evaluate=evaluate,
        eval_every=eval_every,
        eval_names=tuple(f"bound_{n}" for n in BOUND_NAMES),
        score=score,
    )
    if best is not None:
        params = best.params
        history["best_step"] = best.step
        gap = best.evaluation["bound_gap"]
        if math.isfinite(gap) and abs(gap) > gap_tolerance:
            warnings.warn(
                f"the trained twist's bounds on log Z stay {gap:.3g} nats apart at K="
                f"{eval_particles} (lower {best.evaluation['bound_lower']:.4g}, upper "
                f"{best.evaluation['bound_upper']:.4g}, best of the evaluations, step "
                f"{best.step}): twisted SMC with it is biased for this target (a mode of σ "
                "is likely missed). Train longer, use batch='mixture' or exact positives, "
                "or use more particles.",
                TwistGapWarning,
                stacklevel=2,
            )
    return twist.with_params(params), history
