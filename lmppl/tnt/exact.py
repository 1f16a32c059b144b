"""The exact view of TNT: the minimal targeted update as an lmppl program.

TNT approximates, token by token, the old model conditioned on not producing unwanted
output (Zhang et al. 2024):

    σ(s) = p_o(s) 1[s has no unwanted token] / Z,      Z = P_o(no unwanted token).

Written as a program (:func:`minimal_update_program`), this target is what lmppl's
backends already sample: ``lmppl.infer.Exact`` enumerates it on tiny models,
``lmppl.infer.SMC`` samples it on real ones. Unwanted token ids become a per-step
``potentials.banned_tokens`` factor (SMC masks them out of its proposal and weights each
step by the remaining mass ``1 − p_o(banned | s_<t)``); a sequence-level detector becomes
a ``numpyro.factor`` ``log 1[no unwanted]``. SMC's ``Ẑ`` is unbiased for Z, so
``1 − Ẑ`` estimates the old model's prevalence of the behaviour without rejection
(:func:`estimate_minimal_update`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro

from lmppl import potentials
from lmppl.distribution import LM
from lmppl.infer.backends import SMC
from lmppl.lm.base import LanguageModel

__all__ = ["MinimalUpdate", "estimate_minimal_update", "minimal_update_program"]


def minimal_update_program(
    lm: LanguageModel,
    prompt: Any,
    max_new_tokens: int,
    unwanted: Collection[int] | Callable[[jax.Array], jax.Array],
    *,
    site: str = "story",
    stop_at_eos: bool = True,
    temperature: float = 1.0,
) -> Callable[[], jax.Array]:
    """``program()`` with ``σ(s) ∝ p_o(s) 1[no unwanted token in s]``.

    Args:
      lm: the old model p_o.
      prompt: text or token ids.
      max_new_tokens: T.
      unwanted: token ids (a per-step banned-token factor; after an EOS the padding is not
        checked), or a JAX function ``tokens [T] -> bool`` that is true when a sequence
        shows the behaviour (a sequence-level factor).
      site: the LM site's name.
    """
    if callable(unwanted):
        detector = unwanted

        def program():
            story = numpyro.sample(
                site,
                LM(lm, prompt, max_new_tokens, temperature=temperature, stop_at_eos=stop_at_eos),
            )
            numpyro.factor("no_unwanted", potentials.log_indicator(~detector(story)))
            return story

        return program

    ids = sorted({int(v) for v in unwanted})
    if not ids:
        raise ValueError("unwanted must name at least one token id (or be a detector)")
    if min(ids) < 0 or max(ids) >= lm.vocab_size:
        raise ValueError(f"unwanted token ids {ids} outside the vocabulary of {lm.vocab_size}")

    def program():
        dist = LM(lm, prompt, max_new_tokens, temperature=temperature, stop_at_eos=stop_at_eos)
        story = numpyro.sample(site, dist)
        potentials.banned_tokens(
            "no_unwanted", story, ids, lm.vocab_size, eos_token_id=dist.eos_token_id
        )
        return story

    return program


class MinimalUpdate(NamedTuple):
    """SMC estimates about the minimal targeted update.

    Fields:
      program: the program of :func:`minimal_update_program`.
      log_z: ``log mean_r Ẑ_r`` over the runs, estimating log P_o(no unwanted).
      log_z_runs: ``[R]`` the runs' log Ẑ.
      prevalence: ``1 − mean_r Ẑ_r``, the old model's prevalence of the behaviour.
      prevalence_se: the Monte Carlo standard error of ``prevalence`` across runs.
      samples: ``[num_samples, T]`` equally weighted draws from σ (one more run, resampled).
    """

    program: Callable[[], jax.Array]
    log_z: float
    log_z_runs: np.ndarray
    prevalence: float
    prevalence_se: float
    samples: jax.Array


def estimate_minimal_update(
    lm: LanguageModel,
    prompt: Any,
    max_new_tokens: int,
    unwanted: Collection[int] | Callable[[jax.Array], jax.Array],
    *,
    num_particles: int,
    rng_key: jax.Array,
    num_runs: int = 8,
    num_samples: int | None = None,
    stop_at_eos: bool = True,
    ess_threshold: float | None = 0.5,
) -> MinimalUpdate:
    """Estimate Z = P_o(no unwanted) and sample σ with bootstrap SMC.

    ``num_runs`` independent SMC runs of ``num_particles`` give unbiased ``Ẑ_r``; their
    mean and standard error give the prevalence ``1 − Z``. One more run, resampled to
    ``num_samples`` (default ``num_particles``) equally weighted draws, gives samples.
    """
    if num_runs < 1:
        raise ValueError(f"num_runs must be at least 1, got {num_runs}")
    program = minimal_update_program(lm, prompt, max_new_tokens, unwanted, stop_at_eos=stop_at_eos)
    smc = SMC(program, num_particles, ess_threshold=ess_threshold)
    runs_key, sample_key, resample_key = jax.random.split(rng_key, 3)
    log_z_runs = np.asarray(smc.log_marginals(runs_key, num_runs), np.float64)
    z = np.exp(log_z_runs)
    se = float(z.std(ddof=1) / np.sqrt(num_runs)) if num_runs > 1 else float("nan")
    result = smc.run(sample_key)
    samples = result.resample(resample_key, num_samples or num_particles)[result.site]
    return MinimalUpdate(
        program=program,
        log_z=float(np.log(z.mean())),
        log_z_runs=log_z_runs,
        prevalence=float(1.0 - z.mean()),
        prevalence_se=se,
        samples=jnp.asarray(samples),
    )
