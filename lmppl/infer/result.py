"""The result of running an inference backend on a program."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lmppl.decoding import trim_at_eos
from lmppl.infer.resampling import effective_sample_size, normalized_weights, systematic

__all__ = ["InferenceResult"]


@dataclasses.dataclass
class InferenceResult:
    """Weighted particles approximating σ, with the estimate of log Z and diagnostics.

    Attributes:
      samples: ``{site: [N, ...]}``; the LM site holds ``[N, T]`` int32 token ids (EOS
        padding after a sequence ends), other latent and deterministic sites their values.
      log_weights: ``[N]`` final log-weights; ``softmax`` gives the particle weights.
      log_marginal: ``[]`` the estimate log Ẑ (unbiased Ẑ; ``E[log Ẑ] <= log Z``).
      log_potential: ``[N]`` log φ of each particle's sequence.
      site_log_probs: ``{site: [N]}`` log-probability of each observed site and factor.
      ess: ``[T + 1]`` effective sample size before each step's resampling, and final.
      resampled: ``[T]`` bool, which steps resampled (None for exact enumeration).
      ancestors: ``[T, N]`` ancestor indices chosen at each step.
      site: name of the LM site.
      backend: the backend's name.
      model_name: the LM's name.
      tokenizer: decodes the LM site (may be None).
      eos_token_id: the LM site's end-of-sequence token (None without stop_at_eos).
    """

    samples: dict[str, Any]
    log_weights: jax.Array
    log_marginal: jax.Array
    log_potential: jax.Array
    site_log_probs: dict[str, Any]
    ess: jax.Array | None
    resampled: jax.Array | None
    ancestors: jax.Array | None
    site: str
    backend: str
    model_name: str
    tokenizer: Any = None
    eos_token_id: int | None = None

    @property
    def num_particles(self) -> int:
        return int(self.log_weights.shape[0])

    @property
    def weights(self) -> jax.Array:
        """Normalised particle weights ``[N]``."""
        return normalized_weights(self.log_weights)

    @property
    def effective_sample_size(self) -> float:
        """ESS of the final weights."""
        return float(effective_sample_size(self.log_weights))

    def __repr__(self) -> str:
        return (
            f"InferenceResult(backend={self.backend}, site={self.site!r}, "
            f"num_particles={self.num_particles}, log_marginal={float(self.log_marginal):.4f}, "
            f"ess={self.effective_sample_size:.1f})"
        )

    def text(self, site: str | None = None) -> list[str]:
        """Decode each particle's sequence of an LM site (up to its first EOS)."""
        site = site or self.site
        if self.tokenizer is None:
            raise ValueError("this result's model has no tokenizer; read result.samples instead")
        if site not in self.samples:
            raise KeyError(f"no site {site!r}; sites: {sorted(self.samples)}")
        rows = np.asarray(self.samples[site]).tolist()
        return [self.tokenizer.decode(trim_at_eos(row, self.eos_token_id)) for row in rows]

    def resample(self, rng_key: jax.Array, num_samples: int | None = None) -> dict[str, jax.Array]:
        """Equally weighted draws ``{site: [num_samples, ...]}`` (systematic resampling)."""
        num_samples = num_samples or self.num_particles
        if not bool(jnp.any(jnp.isfinite(self.log_weights))):
            raise ValueError("every particle has weight zero: there is nothing to resample")
        indices = systematic(rng_key, self.log_weights, num_samples)
        return jax.tree.map(lambda x: jnp.take(jnp.asarray(x), indices, axis=0), self.samples)

    def to_arviz(self, resample_key: jax.Array | None = None):
        """An ``arviz.InferenceData`` view (one chain; draws are the particles).

        ``posterior`` holds the samples, each particle's ``log_potential`` and factor
        values; ``sample_stats`` the log-weights and normalised weights (draws are
        weighted: use ``weight``, or ``resample_key`` for equally weighted draws),
        ``log_marginal``, the per-step ``ess`` and ``resampled``. Attributes name the
        backend, site, model and number of particles. Several runs as chains:
        :func:`lmppl.diagnostics.runs_to_arviz`.
        """
        from lmppl.infer.arviz import result_to_arviz

        return result_to_arviz(self, resample_key=resample_key)
