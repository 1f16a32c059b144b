"""Particle Gibbs: iterated conditional SMC as an MCMC kernel over the LM site's sequence.

The state of a chain is one sequence ``s ∈ V^T`` of the LM site. One iteration
(Andrieu, Doucet & Holenstein 2010, "particle Gibbs")::

    run conditional SMC with particle 0 clamped to s (N particles, any twist)
        -> lineages x^1..N [N, T] (x^0 = s) and final log-weights log W^1..N
    j ~ Categorical(W)          # W^j ∝ final weights
    s <- x^j

Conditional SMC draws the other N − 1 particles given that the reference ``s`` is one of
them with its whole ancestry (``a^0 = 0`` at every resampling, ``a^i ~ iid Categorical(W)``
otherwise: multinomial resampling, or none). On the extended space of all particles,
ancestors and an index j, the law "x^j ~ σ, the rest by conditional SMC" has density

    π̃(x, j) = ψ(x) · (Ẑ(x) / Z) · W^j / Σ_i W^i        (ψ: the law of unconditional SMC)

(Andrieu, Doucet & Holenstein 2010, Thm. 5; with multinomial resampling the particles are
exchangeable, so clamping the reference at index 0 is the same kernel). One iteration is a
two-block Gibbs sampler of π̃: the rest given x^j (conditional SMC), then j given x, whose
conditional is ``W^j / Σ W``. Both steps leave π̃ invariant, hence its marginal σ:

    σ(s') = Σ_s σ(s) · P(s → s'),      σ(s) = p0(s) · φ(s) / Z.

It holds for any N ≥ 2 (N = 1 never moves) and every setting the conditional sweep
accepts (:mod:`lmppl.infer.kernel`): a twist ψ_t, adaptive (ESS-triggered), block-level or
word-level resampling, per-step potentials, EOS; they all enter only through the
conditional sweep and its final weights (tests/infer/test_gibbs.py checks σ-invariance by
a χ² test for resampling at every step, adaptive, word-level, and a twist with per-step
potentials and EOS). With N ≥ 2 and a proposal that covers σ's support (σ > 0 ⇒ q > 0),
one iteration can reach every sequence of the support, so the chain is ergodic: its draws
converge to σ from any initial sequence of the support.

Ancestor sampling (Lindsten, Jordan & Schön 2014) is not implemented: re-drawing the
reference's ancestor at step t needs ``p0(s_t:T | x_<t^i) · φ`` of the reference's suffix
after every other particle's prefix — a full re-scoring of the suffix by the LM for each
particle and step (O(N · T²) forward passes per sweep), with the twist's backward weights
as well. Without it, the early tokens of the reference mix slowly when the particles
degenerate (all lineages coalesce into the reference's);
:attr:`ParticleGibbsResult.update_rates` measures it (the fraction of iterations that
changed each position): more particles or a better twist raise it.

Not supported (one-line errors): latent sites sampled before the LM site (conditional SMC
clamps the LM site only) or after it (they would be drawn afresh for the reference at
every sweep: not a σ-invariant move), and resampling schemes other than multinomial
(their law given the reference's lineage is not implemented).
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lmppl.host_errors import reraising
from lmppl.infer.backends import SMC, explaining_out_of_memory, runs_per_call
from lmppl.infer.exact import token_log_probs
from lmppl.infer.program import ProgramError, ProgramStructure
from lmppl.infer.resampling import multinomial

__all__ = ["ParticleGibbs", "ParticleGibbsResult"]


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class _Draw(NamedTuple):
    """One iteration of one chain (stacked ``[iterations, chains, ...]`` by the scan)."""

    tokens: jax.Array  # [T] the new state
    log_marginal: jax.Array  # [] log Ẑ of the conditional sweep
    log_p0: jax.Array  # [] log p0 of the new state
    log_potential: jax.Array  # [] its log φ (final potential)
    site_log_probs: dict  # {site: []}
    deterministic: dict  # {site: [...]}
    ancestor: jax.Array  # [] j
    log_weight: jax.Array  # [] final log-weight of particle j
    reference_log_weight: jax.Array  # [] final log-weight of the clamped particle 0
    reference_log_target: jax.Array  # [] log σ̃ of particle 0 (log p0 + every site's value)
    nan: jax.Array  # [] bool: NaN weights or site values in the sweep


_BLOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""The jitted block of each compiled sweep (a sampler's cached ``CompiledProgram.sweep``),
shared by every :class:`ParticleGibbs` on that sampler; an entry lives as long as its sweep
(the block holds it only weakly)."""


def _block_for(structure: ProgramStructure, sweep: Callable) -> Callable:
    block = _BLOCKS.get(sweep)
    if block is None:
        block = _BLOCKS[sweep] = _build_block(structure, weakref.ref(sweep))
    return block


def _build_block(structure: ProgramStructure, sweep_ref: weakref.ref) -> Callable:
    """``block(references [C, T], chain_keys [C], iterations [k], model_params,
    twist_params, arrays) -> (references, _Draw [k, C, ...])``, jitted: ``k`` iterations
    of every chain, a ``lax.scan`` over iterations of the sweep vmapped over chains.

    Iteration ``i`` of a chain uses ``fold_in(chain_key, i)``, so a chain's draws depend
    only on its key (not on how iterations and chains are split into calls). A reference of
    −1s clamps nothing: that iteration is an ordinary SMC run followed by ``j ∝ W``.
    """

    def one(reference, key, model_params, twist_params, arrays) -> tuple[jax.Array, _Draw]:
        sweep_key, pick_key = jax.random.split(key)
        sweep = sweep_ref()
        assert sweep is not None, "the compiled sweep outlives its jitted block"
        out = sweep(sweep_key, model_params, twist_params, arrays, reference)
        j = jax.random.categorical(pick_key, out.log_weights).astype(jnp.int32)
        new = out.tokens[j]
        lm_params = model_params[structure.lm_params_key]
        # log p0 of the reference (particle 0) and of the new state, in one forward pass.
        per_token = token_log_probs(
            structure,
            lm_params,
            out.prompt_tokens,
            out.prompt_length,
            out.tokens[jnp.stack([0, j])],
        ).sum(axis=1)
        nan = jnp.isnan(out.log_weights).any()
        for value in out.site_log_probs.values():
            nan = nan | jnp.isnan(value).any() | jnp.isposinf(value).any()
        draw = _Draw(
            tokens=new,
            log_marginal=out.log_marginal,
            log_p0=per_token[1],
            log_potential=out.log_potential[j],
            site_log_probs={k: v[j] for k, v in out.site_log_probs.items()},
            deterministic={k: v[j] for k, v in out.latent_values.items()},
            ancestor=j,
            log_weight=out.log_weights[j],
            reference_log_weight=out.log_weights[0],
            reference_log_target=per_token[0] + sum(v[0] for v in out.site_log_probs.values()),
            nan=nan,
        )
        return new, draw

    chains = jax.vmap(one, in_axes=(0, 0, None, None, None))

    def block(
        references, chain_keys, iterations, model_params, twist_params, arrays
    ) -> tuple[jax.Array, _Draw]:
        def body(references, i):
            keys = jax.vmap(lambda key: jax.random.fold_in(key, i))(chain_keys)
            return chains(references, keys, model_params, twist_params, arrays)

        return jax.lax.scan(body, references, iterations)

    return jax.jit(block)


class ParticleGibbs:
    """Particle Gibbs (iterated conditional SMC) with ``num_chains`` chains.

    Args:
      sampler: an SMC-family backend (:class:`~lmppl.infer.SMC`,
        :class:`~lmppl.infer.TwistedSMC`, :class:`~lmppl.infer.ImportanceSampling`) with
        multinomial resampling or none (``ess_threshold=None``); its program, particles,
        twist and resampling settings define each iteration's conditional sweep.
        ``N >= 2`` particles (with one the chain never moves).
      num_iterations: iterations (draws) per chain.
      num_chains: independent chains, vmapped in one call (split into several calls of
        the same compiled function when they exceed the memory budget, see
        :func:`~lmppl.infer.backends.runs_per_call`).
      iterations_per_call: ``None`` (default): all iterations in one compiled call (a
        ``lax.scan``). An integer k: calls of k iterations each, with a progress bar; the
        last call runs to a multiple of k and drops the extra draws (one compilation).
      progress: show a tqdm progress bar when there is more than one call.

    ``run(rng_key, *args, **kwargs)`` starts each chain from one draw of an SMC run of the
    same sampler (``j ∝ W`` among its particles; the chain's :attr:`initial` state);
    ``run_from(rng_key, references, *args, **kwargs)`` from given sequences ``[C, T]``
    (or one ``[T]`` for all chains), e.g. the last draws of an earlier result to continue
    it. Either returns a :class:`ParticleGibbsResult`; see the module doc for the maths.

    Example::

        gibbs = lmppl.infer.ParticleGibbs(lmppl.infer.SMC(program, 16), num_iterations=500)
        result = gibbs.run(jax.random.key(0), *args)
        result.thinned(burn_in=100).summary()      # az.summary: R-hat and ESS over chains
    """

    name = "ParticleGibbs"

    def __init__(
        self,
        sampler: Any,
        num_iterations: int,
        *,
        num_chains: int = 4,
        iterations_per_call: int | None = None,
        progress: bool = True,
    ):
        if not isinstance(sampler, SMC):
            raise TypeError(
                "ParticleGibbs takes an SMC-family sampler (SMC, TwistedSMC or "
                f"ImportanceSampling), got {type(sampler).__name__}"
            )
        resampling = sampler.resampling
        if sampler.ess_threshold is not None and resampling not in ("multinomial", multinomial):
            name = resampling if isinstance(resampling, str) else "a custom resampler"
            raise ValueError(
                f"ParticleGibbs needs multinomial resampling (or ess_threshold=None): only its "
                f"law given the reference's lineage is implemented; got {name!r}"
            )
        if sampler.num_particles < 2:
            raise ValueError(
                "ParticleGibbs needs num_particles >= 2 (with one particle the chain never moves)"
            )
        self.sampler = sampler
        self.num_iterations = _positive_int("num_iterations", num_iterations)
        self.num_chains = _positive_int("num_chains", num_chains)
        if iterations_per_call is not None:
            iterations_per_call = _positive_int("iterations_per_call", iterations_per_call)
        self.iterations_per_call = iterations_per_call
        self.progress = progress

    def __repr__(self) -> str:
        return (
            f"ParticleGibbs({self.sampler.name}, num_particles={self.sampler.num_particles}, "
            f"num_iterations={self.num_iterations}, num_chains={self.num_chains})"
        )

    def run(self, rng_key: jax.Array, *args, **kwargs) -> ParticleGibbsResult:
        """Run the chains from SMC draws (see the class doc)."""
        return self._run(rng_key, None, args, kwargs)

    def run_from(self, rng_key: jax.Array, references: Any, *args, **kwargs) -> ParticleGibbsResult:
        """Run the chains from ``references`` ``[num_chains, T]`` (or ``[T]`` for all)."""
        return self._run(rng_key, references, args, kwargs)

    def _references(self, references: Any, structure: ProgramStructure) -> np.ndarray:
        site = structure.lm_site
        steps, vocab = site.max_new_tokens, site.model.vocab_size
        array = np.asarray(references)
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"references must be integer token ids, got dtype {array.dtype}")
        if array.ndim == 1:
            array = np.broadcast_to(array, (self.num_chains, array.shape[0]))
        if array.shape != (self.num_chains, steps):
            raise ValueError(
                f"references must be [num_chains, T] = [{self.num_chains}, {steps}] token ids "
                f"of site '{site.name}' (or one [{steps}]), got shape {array.shape}"
            )
        if (array < 0).any() or (array >= vocab).any():
            raise ValueError(
                f"references must be token ids in [0, {vocab}), got values from "
                f"{array.min()} to {array.max()}"
            )
        eos = site.eos_token_id
        if eos is not None:
            after_eos = np.cumsum(array == eos, axis=1) - (array == eos) > 0
            bad = np.flatnonzero((after_eos & (array != eos)).any(axis=1))
            if bad.size:
                raise ValueError(
                    f"reference {int(bad[0])} has a token other than EOS ({eos}) after its "
                    "first EOS; pad ended sequences with EOS"
                )
        return np.ascontiguousarray(array, np.int32)

    @reraising
    def _run(self, rng_key: Any, references: Any, args: tuple, kwargs: dict) -> ParticleGibbsResult:
        if not isinstance(rng_key, jax.Array):
            raise TypeError(
                "run() takes a JAX random key first (jax.random.key(0)), "
                f"got {type(rng_key).__name__}"
            )
        sampler = self.sampler
        structure, sweep, arrays, twist_params = sampler.compile(*args, conditional=True, **kwargs)
        structure.refuse_several_sites("ParticleGibbs")
        if structure.suffix_latent_sites:
            raise ProgramError(
                "ParticleGibbs clamps the LM site only; the program samples latent sites after "
                "it (they would be redrawn for the reference): "
                + ", ".join(structure.suffix_latent_sites)
            )
        site = structure.lm_site
        steps = site.max_new_tokens
        from_smc = references is None
        if from_smc:
            start = np.full((self.num_chains, steps), -1, np.int32)
        else:
            start = self._references(references, structure)
        block = _block_for(structure, sweep)
        # One extra first iteration draws the initial states from unconditional SMC.
        count = self.num_iterations + int(from_smc)
        per_call = min(self.iterations_per_call or count, count)
        num_calls = math.ceil(count / per_call)
        group = min(self.num_chains, runs_per_call(structure, sampler.num_particles))
        num_groups = math.ceil(self.num_chains / group)
        # Chain c's key is fold_in(rng_key, c): its draws do not depend on num_chains.
        chain_keys = jax.vmap(jax.random.fold_in, (None, 0))(
            rng_key, jnp.arange(self.num_chains, dtype=jnp.uint32)
        )
        model_params = structure.model_params()
        bar = None
        if self.progress and num_calls * num_groups > 1:
            from tqdm import tqdm

            bar = tqdm(total=num_calls * num_groups, desc=self.name, unit="call")
        pieces = []
        with explaining_out_of_memory(self.name, structure, sampler.num_particles, group):
            for g in range(num_groups):
                index = np.arange(g * group, (g + 1) * group) % self.num_chains  # wrap-pad
                state = jnp.asarray(start[index])
                keys = chain_keys[index]
                draws = []
                for c in range(num_calls):
                    iterations = jnp.arange(c * per_call, (c + 1) * per_call, dtype=jnp.int32)
                    state, draw = block(state, keys, iterations, model_params, twist_params, arrays)
                    draws.append(jax.device_get(draw))
                    if bar is not None:
                        bar.update(1)
                pieces.append(jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *draws))
        if bar is not None:
            bar.close()
        # [iterations, chains, ...] -> [chains, iterations, ...], padding dropped.
        stacked = jax.tree.map(
            lambda *xs: np.swapaxes(np.concatenate(xs, axis=1)[:count, : self.num_chains], 0, 1),
            *pieces,
        )
        self._check(stacked, from_smc)
        if from_smc:
            initial = stacked.tokens[:, 0]
            stacked = jax.tree.map(lambda x: x[:, 1:], stacked)
        else:
            initial = start
        return ParticleGibbsResult(
            samples={site.name: stacked.tokens, **stacked.deterministic},
            initial=initial,
            log_marginals=stacked.log_marginal,
            log_p0=stacked.log_p0,
            log_potential=stacked.log_potential,
            site_log_probs=stacked.site_log_probs,
            ancestors=stacked.ancestor,
            site=site.name,
            backend=f"{self.name}({sampler.name})",
            model_name=site.model.name,
            num_particles=sampler.num_particles,
            tokenizer=site.model.tokenizer,
            eos_token_id=site.eos_token_id,
        )

    def _check(self, draws: _Draw, from_smc: bool) -> None:
        if draws.nan.any():
            raise ValueError(
                f"{self.name}: NaN log-weights or site values in a conditional sweep (a twist "
                "or potential returned NaN or +inf)"
            )
        if from_smc:
            dead = np.flatnonzero(np.isneginf(draws.log_weight[:, 0]))
            if dead.size:
                raise ValueError(
                    f"{self.name}: the SMC run that starts chain {int(dead[0])} has every "
                    "particle of weight zero; use more particles or give references (run_from)"
                )
        else:
            # A per-step potential's increment does not depend on the clamped token, so the
            # reference's own weight can miss an m_t = 0: its log σ̃ is checked as well.
            outside = np.isneginf(draws.reference_log_weight[:, 0])
            outside |= ~(draws.reference_log_target[:, 0] > -np.inf)
            if outside.any():
                raise ValueError(
                    f"{self.name}: the reference of chain {int(np.flatnonzero(outside)[0])} has "
                    "weight zero (outside the support of σ, or its twist is zero there)"
                )


@dataclasses.dataclass
class ParticleGibbsResult:
    """Draws of particle Gibbs chains (numpy arrays, chains first).

    Attributes:
      samples: ``{site: [C, D, T]}`` the LM site's sequence after each iteration (EOS
        padding after EOS), and ``{site: [C, D, ...]}`` deterministic sites.
      initial: ``[C, T]`` each chain's initial state (before the first iteration).
      log_marginals: ``[C, D]`` log Ẑ of each iteration's conditional sweep (with the
        reference an exact draw of σ, ``E[log Ẑ] >= log Z``; after burn-in their mean is
        an estimate of that upper bound).
      log_p0: ``[C, D]`` ``log p0(s)`` of each draw (at the site's temperature).
      log_potential: ``[C, D]`` ``log φ(s)`` (the final potential; per-step potentials
        are in ``site_log_probs``).
      site_log_probs: ``{site: [C, D]}`` each factor / observed site's value.
      ancestors: ``[C, D]`` the index j drawn among the particles (0: the reference's
        lineage was kept, although another particle may hold the same sequence).
      site, backend, model_name, num_particles, tokenizer, eos_token_id: as in
        :class:`~lmppl.infer.InferenceResult`.
    """

    samples: dict[str, np.ndarray]
    initial: np.ndarray
    log_marginals: np.ndarray
    log_p0: np.ndarray
    log_potential: np.ndarray
    site_log_probs: dict[str, np.ndarray]
    ancestors: np.ndarray
    site: str
    backend: str
    model_name: str
    num_particles: int
    tokenizer: Any = None
    eos_token_id: int | None = None

    @property
    def sequences(self) -> np.ndarray:
        """``[C, D, T]`` the LM site's draws."""
        return self.samples[self.site]

    @property
    def num_chains(self) -> int:
        return int(self.sequences.shape[0])

    @property
    def num_draws(self) -> int:
        return int(self.sequences.shape[1])

    @property
    def log_target(self) -> np.ndarray:
        """``[C, D]`` ``log σ̃(s) = log p0(s) + Σ_sites log φ_site(s)`` (per-step too)."""
        total = self.log_p0.astype(np.float64)
        for value in self.site_log_probs.values():
            total = total + value
        return total

    @property
    def lengths(self) -> np.ndarray:
        """``[C, D]`` tokens before the first EOS (T without one)."""
        sequences = self.sequences
        steps = sequences.shape[-1]
        if self.eos_token_id is None:
            return np.full(sequences.shape[:2], steps, np.int32)
        is_eos = sequences == self.eos_token_id
        return np.where(is_eos.any(-1), is_eos.argmax(-1), steps).astype(np.int32)

    @property
    def update_rates(self) -> np.ndarray:
        """``[T]`` the fraction of iterations that changed each position (all chains):
        particle Gibbs without ancestor sampling updates early positions less often when
        the particles' lineages coalesce; a rate near 0 means that position barely mixes."""
        previous = np.concatenate([self.initial[:, None], self.sequences[:, :-1]], axis=1)
        return (self.sequences != previous).mean(axis=(0, 1))

    def __repr__(self) -> str:
        return (
            f"ParticleGibbsResult(backend={self.backend}, site={self.site!r}, "
            f"num_chains={self.num_chains}, num_draws={self.num_draws}, "
            f"num_particles={self.num_particles})"
        )

    def thinned(self, burn_in: int = 0, every: int = 1) -> ParticleGibbsResult:
        """The draws after the first ``burn_in`` iterations, every ``every``-th one."""
        if isinstance(burn_in, bool) or not isinstance(burn_in, int | np.integer) or burn_in < 0:
            raise ValueError(f"burn_in must be a non-negative integer, got {burn_in!r}")
        every = _positive_int("every", every)
        if burn_in >= self.num_draws:
            raise ValueError(f"burn_in={burn_in} leaves none of the {self.num_draws} draws")
        cut = lambda x: x[:, burn_in::every]
        initial = self.initial if burn_in == 0 else self.sequences[:, burn_in - 1]
        return dataclasses.replace(
            self,
            samples={k: cut(v) for k, v in self.samples.items()},
            initial=initial,
            log_marginals=cut(self.log_marginals),
            log_p0=cut(self.log_p0),
            log_potential=cut(self.log_potential),
            site_log_probs={k: cut(v) for k, v in self.site_log_probs.items()},
            ancestors=cut(self.ancestors),
        )

    def text(self, chain: int = 0) -> list[str]:
        """Decode one chain's draws (up to the first EOS)."""
        from lmppl.decoding import trim_at_eos

        if self.tokenizer is None:
            raise ValueError("this result's model has no tokenizer; read result.sequences instead")
        rows = self.sequences[chain].tolist()
        return [self.tokenizer.decode(trim_at_eos(row, self.eos_token_id)) for row in rows]

    def scalar_names(self) -> list[str]:
        """The posterior's scalar summaries of the sequence (for ``az.summary``)."""
        names = ["log_target", "log_p0", "log_potential", "length"]
        names += [f"{name}_log_prob" for name in self.site_log_probs]
        return names

    def to_arviz(self) -> Any:
        """``arviz.InferenceData`` with ``chain`` and ``draw`` dims.

        ``posterior``: the LM site's tokens (dim ``position``), deterministic sites, and the
        scalar summaries ``log_target`` (log σ̃), ``log_p0``, ``log_potential`` (log φ),
        ``length`` and ``<site>_log_prob`` for each factor; ``sample_stats``:
        ``log_marginal`` (each sweep's log Ẑ), ``ancestor`` (j) and ``moved`` (the draw
        differs from the previous state). ``arviz.rhat`` / ``arviz.ess`` apply as usual (a
        variable that never changes, e.g. a token fixed by the target, gives NaN).
        """
        import xarray as xr

        from lmppl.infer.arviz import import_arviz

        az = import_arviz()
        dims = ("chain", "draw")
        coords = {"chain": np.arange(self.num_chains), "draw": np.arange(self.num_draws)}
        variables: dict[str, Any] = {}
        for name, value in self.samples.items():
            extra = [
                "position" if name == self.site and axis == 0 else f"{name}_dim_{axis}"
                for axis in range(value.ndim - 2)
            ]
            variables[name] = ((*dims, *extra), value)
        variables["log_target"] = (dims, self.log_target)
        variables["log_p0"] = (dims, np.asarray(self.log_p0, np.float64))
        variables["log_potential"] = (dims, np.asarray(self.log_potential, np.float64))
        variables["length"] = (dims, self.lengths)
        for name, value in self.site_log_probs.items():
            variables[f"{name}_log_prob"] = (dims, np.asarray(value, np.float64))
        previous = np.concatenate([self.initial[:, None], self.sequences[:, :-1]], axis=1)
        stats = {
            "log_marginal": (dims, np.asarray(self.log_marginals, np.float64)),
            "ancestor": (dims, self.ancestors),
            "moved": (dims, (self.sequences != previous).any(-1)),
        }
        attrs = {
            "backend": self.backend,
            "site": self.site,
            "model": self.model_name,
            "num_particles": self.num_particles,
            "num_chains": self.num_chains,
        }
        posterior = xr.Dataset(variables, coords=coords, attrs=attrs)
        sample_stats = xr.Dataset(stats, coords=coords, attrs=attrs)
        return az.InferenceData(posterior=posterior, sample_stats=sample_stats)

    def summary(self, **kwargs) -> Any:
        """``arviz.summary`` (means, R-hat, bulk / tail ESS over chains) of the scalar
        summaries (:meth:`scalar_names`) that vary across draws (a constant has no R-hat,
        e.g. ``length`` without EOS); ``kwargs`` go to ``arviz.summary``."""
        from lmppl.infer.arviz import import_arviz

        az = import_arviz()
        data = self.to_arviz()
        if "var_names" not in kwargs:
            posterior = data.posterior
            kwargs["var_names"] = [
                name
                for name in self.scalar_names()
                if float(posterior[name].max()) > float(posterior[name].min())
            ]
        return az.summary(data, **kwargs)
