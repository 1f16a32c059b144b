"""Fine-tuning a copy of a language model with a TNT loss: :func:`train`.

The data are the old model's own generations with their annotations. The frozen old
model's next-token laws ``log p_o`` ``[N, T, V]`` are computed once; every step draws
a batch of ``batch_size`` generations without replacement (key ``fold_in(rng_key, k)``),
runs one teacher-forced pass of the trained copy, and takes one optax step on the loss
of :mod:`lmppl.tnt.losses`, all in one ``jax.jit``.

Metrics per step: ``loss``, ``grad_norm``, ``negative_log_prob`` (mean ``log q(x_t)``
over the batch's annotated tokens: how far the negative tokens have been pushed down;
NaN for a batch without annotation) and ``seconds``. Checkpoints
(``step_XXXXXXX.npz`` in ``checkpoint_dir``, the format of
:mod:`lmppl.training.checkpoint`) are written every ``checkpoint_every`` steps and at the
end; with ``resume=True`` training continues from the latest one. A NaN loss or
gradient stops with :class:`~lmppl.twists.TrainingDiverged` naming the step (the last
good parameters are checkpointed first); so do updated parameters that are not finite.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmppl.lm.base import LanguageModel
from lmppl.prompt import resolve_model_prompt
from lmppl.tnt.annotations import Annotations, valid_mask
from lmppl.tnt.batch import TNTBatch, old_log_probs, sequence_log_probs
from lmppl.tnt.losses import TNTLoss, batch_loss, get_loss, term_weights
from lmppl.tnt.params import with_params
from lmppl.training.loop import run_training

__all__ = ["METRICS", "build_dataset", "build_train_step", "train"]

METRICS = ("loss", "grad_norm", "negative_log_prob")


def build_dataset(
    lm: LanguageModel,
    prompt: Any,
    generations: Any,
    annotations: Annotations | Any,
    *,
    weights: Any = None,
    stop_at_eos: bool = True,
    source: Any = None,
) -> TNTBatch:
    """All ``N`` annotated generations as one :class:`TNTBatch` (old log-probs included).

    Args:
      prompt: text or token ids ``[P]`` shared by all generations, or ``[N, P]``.
      generations: ``[N, T]`` token ids (or a :class:`lmppl.Generation`).
      annotations: an :class:`Annotations`, or a bool mask ``[N, T]`` (the padding mask
        then comes from the model's EOS when ``stop_at_eos``).
      weights: ``[N]`` sequence weights (default ones).
      source: for an encoder-decoder model (T5; ``prompt`` is then None): the source
        shared by all generations (text or ids ``[S]``), one per generation (ids
        ``[N, S]``, or a list of N texts / id lists of any lengths), stored as the packed
        prompts ``[N, 1 + S]`` (see :mod:`lmppl.lm.t5`).
    """
    tokens = np.asarray(getattr(generations, "tokens", generations), np.int32)
    if tokens.ndim != 2:
        raise ValueError(f"generations must be [N, T] token ids, got shape {tokens.shape}")
    if not isinstance(annotations, Annotations):
        mask = np.asarray(annotations, bool)
        valid = valid_mask(tokens, lm.eos_token_id if stop_at_eos else None)
        annotations = Annotations(mask & valid, valid)
    if annotations.mask.shape != tokens.shape:
        raise ValueError(
            f"annotations of shape {annotations.mask.shape} for generations {tokens.shape}"
        )
    prompt_tokens, prompt_length = resolve_model_prompt(lm, prompt, source, tokens.shape[1])
    rows = tokens.shape[0]
    prompt_tokens = jnp.broadcast_to(prompt_tokens, (rows, prompt_tokens.shape[-1]))
    prompt_length = jnp.broadcast_to(prompt_length, (rows,)).astype(jnp.int32)
    if prompt_tokens.shape[-1] + tokens.shape[1] > lm.context_length:
        raise ValueError(
            f"prompt ({prompt_tokens.shape[-1]}) plus generations ({tokens.shape[1]}) exceed "
            f"the context length {lm.context_length} of {lm.name}"
        )
    weights = np.ones(rows, np.float32) if weights is None else np.asarray(weights, np.float32)
    return TNTBatch(
        prompt_tokens=prompt_tokens,
        prompt_length=prompt_length,
        tokens=jnp.asarray(tokens),
        mask=jnp.asarray(annotations.mask, bool),
        valid=jnp.asarray(annotations.valid, bool),
        old_log_probs=jnp.asarray(old_log_probs(lm, prompt_tokens, prompt_length, tokens)),
        weights=jnp.asarray(weights),
    )


@functools.lru_cache(maxsize=64)
def _adam(learning_rate: float) -> optax.GradientTransformation:
    return optax.adam(learning_rate)


@functools.lru_cache(maxsize=32)
def build_train_step(
    lm: LanguageModel,
    optimizer: optax.GradientTransformation,
    batch_size: int,
    *,
    alpha: float,
    epsilon: float,
):
    """The jitted ``step(params, opt_state, rng_key, dataset, loss_weights) -> (params,
    opt_state, metrics)``; ``loss_weights`` are the loss's :func:`~lmppl.tnt.losses.term_weights`.

    Cached per (model, optimizer, batch size, α, ε): every loss, other data, more steps
    or a resumed run reuse the compiled step.
    """

    def step(params, opt_state, rng_key, dataset: TNTBatch, loss_weights):
        rows = dataset.tokens.shape[0]
        index = jax.random.choice(rng_key, rows, (batch_size,), replace=False)
        batch = jax.tree.map(lambda x: jnp.take(x, index, axis=0), dataset)

        def objective(params):
            log_q = sequence_log_probs(
                lm, params, batch.prompt_tokens, batch.prompt_length, batch.tokens
            )
            value = batch_loss(loss_weights, log_q, batch, alpha=alpha, epsilon=epsilon)
            picked = jnp.take_along_axis(log_q, batch.tokens[..., None], axis=-1)[..., 0]
            count = batch.mask.sum()
            negative = jnp.where(
                count > 0, jnp.sum(jnp.where(batch.mask, picked, 0.0)) / count, jnp.nan
            )
            return value, jax.lax.stop_gradient(negative)

        (value, negative), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new_params)]))
        metrics = {
            "loss": value,
            "grad_norm": optax.tree.norm(grads),
            "negative_log_prob": negative,
            "finite": finite,
        }
        return new_params, new_opt_state, metrics

    return jax.jit(step)


def train(
    lm: LanguageModel,
    prompt: Any,
    generations: Any,
    annotations: Annotations | Any,
    loss: str | TNTLoss = "tnff",
    *,
    num_steps: int,
    learning_rate: float = 1e-3,
    batch_size: int = 32,
    rng_key: jax.Array,
    alpha: float = 1e4,
    epsilon: float = 1e-6,
    weights: Any = None,
    optimizer: optax.GradientTransformation | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 100,
    resume: bool = True,
    progress: bool = True,
    dataset: TNTBatch | None = None,
    source: Any = None,
) -> tuple[LanguageModel, dict[str, list[float]]]:
    """Fine-tune a copy of ``lm``'s parameters with a TNT loss against the frozen ``lm``.

    Args:
      lm: the old model p_o (its parameters are never modified).
      prompt: the generations' prompt (text or ids ``[P]``), or ``[N, P]`` ids.
      generations: ``[N, T]`` the old model's generations (or a ``Generation``).
      annotations: :class:`Annotations` or a bool mask ``[N, T]`` of negative tokens.
      loss: ``"tnff"``, ``"tnrr"``, ``"tnrf"``, ``"tnfll"``, ``"tnrll"``, ``"nl"``,
        ``"ul"`` (see :mod:`lmppl.tnt.losses`) or a :class:`TNTLoss`.
      num_steps: gradient steps (in total, counting resumed ones).
      learning_rate: Adam's learning rate (ignored when ``optimizer`` is given).
      batch_size: generations per step (drawn without replacement; at most N).
      rng_key: the run's key; step k uses ``fold_in(rng_key, k)``.
      alpha: weight of the annotated tokens' terms.
      epsilon: smoothing of ``p_new`` in the reverse-KL terms.
      weights: ``[N]`` sequence weights (default ones).
      optimizer: an optax transformation (default ``optax.adam(learning_rate)``).
      checkpoint_dir: where to write ``step_*.npz`` (None: no checkpoints).
      checkpoint_every: steps between checkpoints.
      resume: continue from the latest checkpoint in ``checkpoint_dir``.
      progress: show a tqdm bar.
      dataset: a prebuilt :func:`build_dataset` (reuses the old log-probs across losses;
        ``prompt``, ``generations``, ``annotations`` and ``weights`` are then ignored).
      source: an encoder-decoder model's source(s) instead of ``prompt`` (see
        :func:`build_dataset`).

    Returns:
      ``(lm_new, history)``: a copy of ``lm`` with the trained parameters, and
      ``{"step", "loss", "grad_norm", "negative_log_prob", "seconds"}`` lists.
    """
    spec = get_loss(loss)
    if not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps must be a non-negative integer, got {num_steps!r}")
    if dataset is None:
        dataset = build_dataset(
            lm, prompt, generations, annotations, weights=weights, source=source
        )
    rows = int(dataset.tokens.shape[0])
    if not 1 <= batch_size <= rows:
        raise ValueError(
            f"batch_size must be between 1 and the {rows} generations, got {batch_size}"
        )
    optimizer = optimizer or _adam(float(learning_rate))
    loss_weights = term_weights(spec)
    step_fn = build_train_step(
        lm, optimizer, batch_size, alpha=float(alpha), epsilon=float(epsilon)
    )

    def step(k, params, opt_state):
        return step_fn(params, opt_state, jax.random.fold_in(rng_key, k), dataset, loss_weights)

    def diverged(k, metrics):
        bad = math.isnan(metrics["loss"]) or math.isnan(metrics["grad_norm"])
        if bad or not metrics["finite"]:
            return (
                f"TNT training ({spec.name}) diverged at step {k}: loss={metrics['loss']}, "
                f"grad_norm={metrics['grad_norm']}, updated parameters "
                f"{'finite' if metrics['finite'] else 'not finite'}; lower the learning "
                "rate or alpha"
            )
        return None

    params = jax.tree.map(jnp.array, lm.params)  # a copy: the old model stays frozen
    params, history, _ = run_training(
        step,
        params,
        optimizer.init(params),
        num_steps=num_steps,
        metric_names=METRICS,
        diverged=diverged,
        postfix=lambda m: {
            "loss": f"{m['loss']:.4g}",
            "neg_logq": f"{m['negative_log_prob']:.3g}",
        },
        description=f"tnt/{spec.name}",
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        resume=resume,
        progress=progress,
    )
    return with_params(lm, params, f"{lm.name}+tnt-{spec.name}"), history
