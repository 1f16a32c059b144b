"""The sequential-target compiler: read a NumPyro program as σ(s) ∝ p0(s) φ(s).

A program is run through NumPyro's effect handlers (never parsed):

1. :func:`discover` traces it abstractly (``jax.eval_shape``: no compute, no host calls)
   with a placeholder for the first latent ``lmppl.LM`` site, and records the structure:
   that site (the sequence s that inference samples token by token), the latent sites
   before it (sampled from their prior, carried by each particle), the per-step
   potentials, and every language model used (their parameters become jit arguments).
2. :func:`run_prefix` runs the program up to the LM site, per particle, and returns the
   latent values so far and the site's prompt.
3. :func:`run_suffix` reruns the program with s (and the prefix values) substituted and
   returns ``log φ(s)``: the sum of the log-probabilities of every observed site and factor
   other than s (per-step potentials excluded when SMC already applied them), with the
   value of each site kept for NaN reports and with the values of later latent sites.
4. :func:`step_potential_functions` runs one particle's program up to its last per-step
   potential, with that particle's prefix values substituted, and evaluates each
   potential (a :class:`~lmppl.types.StatefulStepPotential`): its initial state, its
   ``log m_t(state, s_<t, ·)`` and its state after a token (a potential may read the
   latent sites sampled before the LM site: each particle sees its own values).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from numpyro import handlers
from numpyro.primitives import Messenger

from lmppl.distribution import LM
from lmppl.lm.base import LanguageModel
from lmppl.potentials import STEP_POTENTIAL_KEY

__all__ = [
    "LMSite",
    "ModelParams",
    "ObservedLMPrompt",
    "ObservedLMSite",
    "ProgramError",
    "ProgramStructure",
    "StepPotential",
    "StepPotentialFunctions",
    "check_proposal",
    "combined_step_potential",
    "discover",
    "observed_lm_prompts",
    "per_particle_prompt",
    "prefix_supports",
    "run_prefix",
    "run_prefix_given",
    "run_suffix",
    "step_potential_functions",
]


class ProgramError(ValueError):
    """The program cannot be read as a sequential target (message says why)."""


@dataclasses.dataclass(frozen=True)
class LMSite:
    """Static description of the latent LM site that inference samples."""

    name: str
    model: LanguageModel
    max_new_tokens: int
    temperature: float
    eos_token_id: int | None
    prompt_width: int


@dataclasses.dataclass(frozen=True)
class StepPotential:
    """A per-step potential site (its :class:`~lmppl.types.StatefulStepPotential` is read
    per particle by :func:`step_potential_functions`)."""

    name: str
    eos_token_id: int | None


@dataclasses.dataclass(frozen=True)
class ObservedLMSite:
    """An observed LM site whose value is the latent LM site's sequence itself
    (``numpyro.sample(name, LM(other, prompt2, T), obs=s)``): a second prompt or model
    that must also find s likely (product of experts, prompt intersection). SMC scores it
    token by token, ``log m_t(v) = scale · log p_other(v | prompt2, s_<t)`` (``scale`` from
    ``numpyro.handlers.scale``, 1 without), instead of
    once at the end (``SMC(observed_lms="at_end")`` keeps the end-of-sequence scoring)."""

    name: str
    model: LanguageModel
    temperature: float
    scale: float = 1.0


ModelParams = dict[str, Any]
"""Parameters of a program's language models, keyed by :attr:`ProgramStructure.model_keys`."""


def _model_keys(models: tuple[LanguageModel, ...]) -> tuple[str, ...]:
    """One key per model: its name, with ``#2``, ``#3``, ... for distinct models sharing one."""
    keys: list[str] = []
    for model in models:
        key, count = model.name, 1
        while key in keys:
            count += 1
            key = f"{model.name}#{count}"
        keys.append(key)
    return tuple(keys)


@dataclasses.dataclass(frozen=True)
class ProgramStructure:
    """What :func:`discover` learns about a program (all static).

    The program's language models (every LM site's, latent or observed) are ``models``;
    inference takes their parameters as a :data:`ModelParams` dict keyed by
    ``model_keys`` (each model's name), so they enter jitted code as arguments and can be
    swapped (e.g. DeRa's λ) without recompiling.
    """

    lm_site: LMSite
    prefix_sites: tuple[str, ...]
    suffix_latent_sites: tuple[str, ...]
    observed_sites: tuple[str, ...]
    deterministic_sites: tuple[str, ...]
    step_potentials: tuple[StepPotential, ...]
    models: tuple[LanguageModel, ...]
    observed_lms: tuple[ObservedLMSite, ...] = ()
    proposal: LanguageModel | None = None
    earlier_lm_sites: tuple[str, ...] = ()
    continuations: tuple[ProgramStructure, ...] = ()

    @property
    def phases(self) -> tuple[ProgramStructure, ...]:
        """One structure per latent LM site, in program order (this one first).

        A program with several latent LM sites runs as one sweep over their concatenated
        steps: phase k samples site k token by token, with the earlier sites' tokens as
        prefix values (``earlier_lm_sites``) of every particle."""
        return (self, *self.continuations)

    @property
    def lm_sites(self) -> tuple[LMSite, ...]:
        """Every latent LM site, in program order."""
        return tuple(phase.lm_site for phase in self.phases)

    @property
    def total_steps(self) -> int:
        """Σ_k T_k: the tokens one sweep samples over all latent LM sites."""
        return sum(site.max_new_tokens for site in self.lm_sites)

    def refuse_several_sites(self, what: str) -> None:
        """One-line :class:`ProgramError` when the program has more than one latent LM site
        and ``what`` (a feature) supports only one."""
        if self.continuations:
            names = ", ".join(f"'{site.name}'" for site in self.lm_sites)
            raise ProgramError(
                f"{what} supports programs with one latent LM site; this one samples "
                f"{len(self.lm_sites)}: {names}"
            )

    @property
    def model_keys(self) -> tuple[str, ...]:
        """The key of each of ``models`` in a :data:`ModelParams` dict."""
        return _model_keys(self.models)

    def model_params(self, replace: dict[str, Any] | None = None) -> ModelParams:
        """The models' own parameters keyed by model; ``replace`` maps keys to others."""
        replace = replace or {}
        unknown = set(replace) - set(self.model_keys)
        if unknown:
            raise KeyError(f"no model {sorted(unknown)} in this program: {list(self.model_keys)}")
        return {
            k: replace.get(k, m.params) for k, m in zip(self.model_keys, self.models, strict=True)
        }

    def params_of(self, model_params: ModelParams, model: LanguageModel) -> Any:
        """The entry of ``model_params`` that belongs to ``model``."""
        for key, known in zip(self.model_keys, self.models, strict=True):
            if known is model:
                return model_params[key]
        raise KeyError(f"{model.name} is not a model of this program")

    def with_proposal(self, proposal: LanguageModel | None) -> ProgramStructure:
        """This structure with a second language model proposing the LM site's tokens (its
        parameters join :meth:`model_params`; see :func:`check_proposal`)."""
        if proposal is None:
            return self
        self.refuse_several_sites("a proposal model")
        check_proposal(self.lm_site, proposal)
        models = self.models if proposal in self.models else (*self.models, proposal)
        return dataclasses.replace(self, models=models, proposal=proposal)

    @property
    def lm_params_key(self) -> str:
        """The key of the latent LM site's model."""
        return self.model_keys[self.models.index(self.lm_site.model)]


def check_proposal(site: LMSite, proposal: Any) -> None:
    """Refuse a proposal model that cannot propose the site's tokens (one-line error)."""
    if not hasattr(proposal, "apply") or not hasattr(proposal, "init_cache"):
        raise TypeError(
            f"proposal must be a loaded language model (lmppl.load), got {type(proposal).__name__}"
        )
    target = site.model
    if proposal.vocab_size != target.vocab_size:
        raise ProgramError(
            f"the proposal {proposal.name} has a vocabulary of {proposal.vocab_size} tokens but "
            f"the LM site '{site.name}' samples from {target.name} with {target.vocab_size}: "
            "a proposal must share the target's vocabulary"
        )
    if proposal.eos_token_id != target.eos_token_id:
        raise ProgramError(
            f"the proposal {proposal.name} ends at token {proposal.eos_token_id} but "
            f"{target.name} at {target.eos_token_id}: a proposal must share the target's "
            "vocabulary"
        )
    if not proposal.locally_normalised:
        raise ProgramError(
            f"the proposal {proposal.name} has unnormalised logits; a proposal must be a "
            "normalised next-token distribution"
        )
    width = site.prompt_width + site.max_new_tokens
    if width > proposal.context_length:
        raise ProgramError(
            f"the prompt plus max_new_tokens ({width}) exceeds the proposal's context length "
            f"{proposal.context_length}"
        )


class _Stop(Exception):
    pass


class _FirstLatentLM(Messenger):
    """Placeholder values (zeros) at the latent LM sites whose value is not already given
    (by an inner ``substitute``); records the first such site, or the one named ``site``,
    and stops there when ``stop``. ``messages`` lists every latent LM site it saw."""

    def __init__(self, fn=None, stop: bool = False, site: str | None = None):
        self.stop = stop
        self.site = site
        self.site_message: dict | None = None
        self.messages: list[dict] = []
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] != "sample" or not isinstance(msg["fn"], LM) or msg["is_observed"]:
            return
        if msg["value"] is not None:  # an earlier LM site whose tokens are given
            return
        self.messages.append(msg)
        if self.site_message is None and (self.site is None or msg["name"] == self.site):
            self.site_message = msg
            if self.stop:
                raise _Stop
        fn = msg["fn"]
        msg["value"] = jnp.zeros((*fn.batch_shape, fn.max_new_tokens), jnp.int32)


class _SwapParams(Messenger):
    """Evaluate every LM site with parameters handed in as (traced) arguments."""

    def __init__(self, fn, params_by_model: dict[int, Any]):
        self.params_by_model = params_by_model
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] == "sample" and isinstance(msg["fn"], LM):
            params = self.params_by_model.get(id(msg["fn"].model))
            if params is not None:
                msg["fn"] = msg["fn"].with_params(params)


def _with_params(program, structure: ProgramStructure, model_params: ModelParams):
    if not isinstance(model_params, dict) or set(model_params) != set(structure.model_keys):
        raise TypeError(
            "model_params must be a dict keyed by model, {name: params} for "
            f"{list(structure.model_keys)} (structure.model_params() builds it); got "
            f"{type(model_params).__name__}"
            + (f" with keys {sorted(model_params)}" if isinstance(model_params, dict) else "")
        )
    by_model = {
        id(m): model_params[k] for m, k in zip(structure.models, structure.model_keys, strict=True)
    }
    return _SwapParams(program, by_model)


def _observed_lm_site(
    name: str, msg: dict, lm_site: LMSite, suffix_latent: list[str]
) -> ObservedLMSite | None:
    """The :class:`ObservedLMSite` of an observed LM site over the latent sequence, or
    None when it can only be scored at the end (a batched site, another EOS rule, or a
    latent site sampled between the two). Refuses a model with another vocabulary."""
    fn: LM = msg["fn"]
    if fn.model.vocab_size != lm_site.model.vocab_size:
        raise ProgramError(
            f"the observed LM site '{name}' scores the tokens of '{lm_site.name}' with "
            f"{fn.model.name} (vocabulary {fn.model.vocab_size}), but they are drawn from "
            f"{lm_site.model.name} (vocabulary {lm_site.model.vocab_size}): the two models "
            "must share one vocabulary"
        )
    if fn.max_new_tokens != lm_site.max_new_tokens:
        raise ProgramError(
            f"the observed LM site '{name}' has max_new_tokens={fn.max_new_tokens} but "
            f"observes '{lm_site.name}', which has {lm_site.max_new_tokens}"
        )
    scale = 1.0 if msg.get("scale") is None else msg["scale"]
    if not isinstance(scale, int | float):  # a traced scale: scored with φ at the end
        return None
    if fn.batch_shape or fn.eos_token_id != lm_site.eos_token_id or suffix_latent:
        return None
    return ObservedLMSite(name=name, model=fn.model, temperature=fn.temperature, scale=float(scale))


def discover(program: Callable, args: tuple, kwargs: dict) -> ProgramStructure:
    """Trace ``program(*args, **kwargs)`` abstractly and describe its sequential target.

    A program with several latent LM sites (a title, then a story conditioned on it) is
    described phase by phase: the returned structure is the first site's, and
    :attr:`ProgramStructure.continuations` holds one structure per later site, whose
    prefix sites include the earlier LM sites (their tokens are given when it runs).
    """
    found: dict[str, Any] = {}

    def run(rng_key):
        marker = _FirstLatentLM(program)
        with handlers.trace() as trace:
            handlers.seed(marker, rng_key)(*args, **kwargs)
        found["trace"] = trace
        found["sites"] = marker.messages
        return 0

    try:
        jax.eval_shape(run, jax.random.key(0))
    except jax.errors.ConcretizationTypeError as error:
        raise ProgramError(
            "the program uses the value of a latent site in Python control flow or shapes "
            f"({type(error).__name__}); inference runs all particles at once, so a choice "
            "made from a latent must be an array expression: e.g. a prompt per value padded "
            "to one width and indexed by it (lmppl.concat(PROMPTS[z])), or jnp.where"
        ) from None
    site_messages: list[dict] = found["sites"]
    trace = found["trace"]
    if not site_messages:
        raise ProgramError(
            "the program has no latent lmppl.LM site: sample one with "
            "numpyro.sample(name, lmppl.LM(...)) (observed LM sites only score data)"
        )
    phases = [_describe_phase(trace, site_messages, k) for k in range(len(site_messages))]
    return dataclasses.replace(phases[0], continuations=tuple(phases[1:]))


def _describe_phase(trace: dict, site_messages: list[dict], k: int) -> ProgramStructure:
    """The :class:`ProgramStructure` of the ``k``-th latent LM site of a traced program."""
    site_message = site_messages[k]
    fn: LM = site_message["fn"]
    if fn.batch_shape:
        raise ProgramError(
            f"the LM site '{site_message['name']}' has batch shape {fn.batch_shape}; "
            "inference runs its own particle batch: give one prompt per site"
        )
    lm_site = LMSite(
        name=site_message["name"],
        model=fn.model,
        max_new_tokens=fn.max_new_tokens,
        temperature=fn.temperature,
        eos_token_id=fn.eos_token_id,
        prompt_width=int(fn.prompt_tokens.shape[-1]),
    )
    lm_values = {id(m["value"]): m["name"] for m in site_messages}
    earlier = tuple(m["name"] for m in site_messages[:k])
    names = list(trace)
    position = names.index(lm_site.name)
    prefix: list[str] = []
    suffix_latent: list[str] = []
    observed: list[str] = []
    deterministic: list[str] = []
    steps: list[StepPotential] = []
    observed_lms: list[ObservedLMSite] = []
    models: list[LanguageModel] = []
    for index, (name, msg) in enumerate(trace.items()):
        if msg["type"] == "deterministic":
            deterministic.append(name)
            continue
        if msg["type"] != "sample":
            continue
        if isinstance(msg["fn"], LM) and msg["fn"].model not in models:
            models.append(msg["fn"].model)
        if name == lm_site.name:
            continue
        if msg["is_observed"]:
            observed.append(name)
            if isinstance(msg["fn"], LM) and msg["value"] is site_message["value"]:
                scored = _observed_lm_site(name, msg, lm_site, suffix_latent)
                if scored is not None:
                    observed_lms.append(scored)
            step = msg.get("infer", {}).get(STEP_POTENTIAL_KEY)
            if step is not None:
                _, eos, sequence = step
                if sequence is not site_message["value"]:
                    if id(sequence) in lm_values:
                        continue  # a potential of another LM site's phase
                    raise ProgramError(
                        f"the per-step potential '{name}' must be applied to a latent LM "
                        f"site itself ('{lm_site.name}')"
                    )
                if eos != lm_site.eos_token_id:
                    raise ProgramError(
                        f"the per-step potential '{name}' has eos_token_id={eos} but the LM "
                        f"site '{lm_site.name}' ends at {lm_site.eos_token_id}"
                    )
                if suffix_latent:
                    raise ProgramError(
                        f"the per-step potential '{name}' follows the latent site "
                        f"'{suffix_latent[0]}' sampled after the LM site '{lm_site.name}'; "
                        "SMC applies it while the sequence is generated, before that site "
                        "exists: sample it before the LM site"
                    )
                steps.append(StepPotential(name, eos))
        elif index < position:
            prefix.append(name)
        else:
            suffix_latent.append(name)
    return ProgramStructure(
        lm_site=lm_site,
        prefix_sites=tuple(prefix),
        suffix_latent_sites=tuple(suffix_latent),
        observed_sites=tuple(observed),
        deterministic_sites=tuple(deterministic),
        step_potentials=tuple(steps),
        models=tuple(models),
        observed_lms=tuple(observed_lms),
        earlier_lm_sites=earlier,
    )


def run_prefix(
    structure: ProgramStructure,
    program: Callable,
    args: tuple,
    kwargs: dict,
    model_params: ModelParams,
    rng_keys: jax.Array,
    given: dict[str, jax.Array] | None = None,
) -> tuple[dict[str, jax.Array], jax.Array, jax.Array]:
    """Run every particle's program up to the LM site.

    Returns the prefix latent values ``{site: [N, ...]}`` and the LM site's prompt:
    ``tokens [P]`` and ``length []`` when it is shared by all particles, or ``[N, P]`` and
    ``[N]`` when it depends on a latent site sampled before it (a persona, a topic: each
    particle then prefills its own prompt, see :func:`lmppl.decoding.prefill`).
    ``given``: ``{site: [N, ...]}`` values substituted instead of sampled (the earlier
    phases of a program with several latent LM sites: their tokens and latents).
    """
    swapped = _with_params(program, structure, model_params)
    site = structure.lm_site.name

    def one(rng_key, given_row):
        marker = _FirstLatentLM(handlers.substitute(swapped, data=given_row), True, site)
        with handlers.trace() as trace:
            try:
                handlers.seed(marker, rng_key)(*args, **kwargs)
            except _Stop:
                pass
        fn = marker.site_message["fn"]
        values = {name: trace[name]["value"] for name in structure.prefix_sites}
        return values, fn.prompt_tokens, fn.prompt_length

    given = {} if given is None else given
    try:
        return jax.vmap(one, out_axes=(0, None, None))(rng_keys, given)
    except ValueError as error:
        if "out_axes" not in str(error):
            raise
    # The prompt depends on a prefix latent: one prompt per particle.
    return jax.vmap(one)(rng_keys, given)


def per_particle_prompt(prompt_tokens: jax.Array) -> bool:
    """Whether a prompt from :func:`run_prefix` is one per particle (``[N, P]``)."""
    return prompt_tokens.ndim == 2


def prefix_supports(
    structure: ProgramStructure, program: Callable, args: tuple, kwargs: dict
) -> dict[str, jax.Array]:
    """``{site: values [K, ...]}``: the finite support of every latent site before the LM
    site (for enumeration), read from one concrete run of the program up to that site.

    Raises :class:`ProgramError` for a site without a finite support (``enumerate_support``).
    """
    marker = _FirstLatentLM(program, stop=True, site=structure.lm_site.name)
    with handlers.trace() as trace:
        try:
            handlers.seed(marker, jax.random.key(0))(*args, **kwargs)
        except _Stop:
            pass
    supports = {}
    for name in structure.prefix_sites:
        fn = trace[name]["fn"]
        if name in structure.earlier_lm_sites:  # every token sequence (invalid ones score -inf)
            supports[name] = jnp.asarray(
                list(itertools.product(range(fn.model.vocab_size), repeat=fn.max_new_tokens)),
                jnp.int32,
            )
            continue
        if not getattr(fn, "has_enumerate_support", False):
            raise ProgramError(
                f"the latent site '{name}' ({type(fn).__name__}) has no finite support to "
                "enumerate; Exact enumerates discrete sites (Categorical, Bernoulli, ...) only"
            )
        if fn.batch_shape:
            raise ProgramError(
                f"the latent site '{name}' has batch shape {fn.batch_shape}; Exact enumerates "
                "scalar discrete sites only"
            )
        supports[name] = fn.enumerate_support(expand=False)
    return supports


def run_prefix_given(
    structure: ProgramStructure,
    program: Callable,
    args: tuple,
    kwargs: dict,
    model_params: ModelParams,
    values: dict[str, jax.Array],
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The program up to the LM site with its prefix latents set to ``values`` (one value
    per site): ``(log p(values), prompt tokens [P], prompt length [])``. An earlier LM site's
    ``log p`` is its teacher-forced ``log p0`` (−inf for a sequence outside its support)."""
    swapped = _with_params(program, structure, model_params)
    marker = _FirstLatentLM(
        handlers.substitute(swapped, data=values), stop=True, site=structure.lm_site.name
    )
    with handlers.trace() as trace:
        try:
            handlers.seed(marker, jax.random.key(0))(*args, **kwargs)
        except _Stop:
            pass
    log_prior = jnp.zeros((), jnp.float32)
    for name in structure.prefix_sites:
        msg = trace[name]
        log_prior = log_prior + jnp.sum(msg["fn"].log_prob(msg["value"]))
    assert marker.site_message is not None, "discover() found the LM site"
    fn = marker.site_message["fn"]
    return log_prior, fn.prompt_tokens, fn.prompt_length


def run_suffix(
    structure: ProgramStructure,
    program: Callable,
    args: tuple,
    kwargs: dict,
    model_params: ModelParams,
    rng_keys: jax.Array,
    prefix_values: dict[str, jax.Array],
    sequences: jax.Array,
    include_step_potentials: bool,
    scored: frozenset[str] = frozenset(),
    applied: frozenset[str] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array]]:
    """``log φ`` for each particle's sequence.

    Args:
      rng_keys: ``[N]`` keys for latent sites after the LM site.
      prefix_values: ``{site: [N, ...]}`` from :func:`run_prefix`.
      sequences: ``[N, T]`` sampled tokens of the LM site.
      include_step_potentials: add per-step potentials (``False`` when SMC applied them).
      scored: observed sites SMC already scored token by token (:class:`ObservedLMSite`):
        neither evaluated nor added (their log-probabilities come from the sweep).
      applied: the per-step potentials SMC applied (evaluated, reported, not added) when
        ``include_step_potentials`` is False; default: this structure's own (a program
        with several LM sites passes every phase's).

    Returns:
      ``log_phi [N]``, ``{site: [N]}`` summed log-probability of every observed site and
      factor, and ``{site: [N, ...]}`` values of later latent and deterministic sites.
    """
    swapped = _with_params(program, structure, model_params)
    if applied is None:
        applied = frozenset(s.name for s in structure.step_potentials)
    skip = set() if include_step_potentials else set(applied)
    lm_name = structure.lm_site.name

    def one(rng_key, values, sequence):
        data = {**values, lm_name: sequence}
        with handlers.trace() as trace:
            handlers.seed(handlers.substitute(swapped, data=data), rng_key)(*args, **kwargs)
        site_log_probs = {}
        for name in structure.observed_sites:
            if name in scored:
                continue
            msg = trace[name]
            log_prob = jnp.sum(msg["fn"].log_prob(msg["value"]))
            if msg.get("scale") is not None:
                log_prob = msg["scale"] * log_prob
            site_log_probs[name] = log_prob.astype(jnp.float32)
        log_phi = sum(
            (v for k, v in site_log_probs.items() if k not in skip), jnp.zeros((), jnp.float32)
        )
        later = {
            name: trace[name]["value"]
            for name in (*structure.suffix_latent_sites, *structure.deterministic_sites)
        }
        return log_phi, site_log_probs, later

    return jax.vmap(one)(rng_keys, prefix_values, sequences)


class ObservedLMPrompt(NamedTuple):
    """The prompt of an :class:`ObservedLMSite`: ``tokens [P]`` and ``length []`` shared
    by all particles, or ``[N, P]`` and ``[N]``."""

    tokens: jax.Array
    length: jax.Array


def observed_lm_prompts(
    structure: ProgramStructure,
    program: Callable,
    args: tuple,
    kwargs: dict,
    model_params: ModelParams,
    prefix_values: dict[str, jax.Array],
    num_particles: int,
) -> tuple[ObservedLMPrompt, ...]:
    """Each :class:`ObservedLMSite`'s prompt, read from every particle's program (with its
    prefix values substituted and a placeholder for the LM site, up to the last such site;
    :func:`discover` left sites after later latent sites to the end-of-sequence scoring)."""
    if not structure.observed_lms:
        return ()
    swapped = _with_params(program, structure, model_params)
    last = structure.observed_lms[-1].name

    def one(values, _):
        trace = _trace_through(swapped, values, last, args, kwargs)
        return tuple(
            ObservedLMPrompt(
                trace[site.name]["fn"].prompt_tokens, trace[site.name]["fn"].prompt_length
            )
            for site in structure.observed_lms
        )

    index = jnp.arange(num_particles)
    try:
        return jax.vmap(one, out_axes=None)(prefix_values, index)
    except ValueError as error:
        if "out_axes" not in str(error):
            raise
    return jax.vmap(one)(prefix_values, index)  # prompts that depend on a prefix latent


class _StopAfter(Messenger):
    """Stop the program once the site ``name`` has been recorded."""

    def __init__(self, fn, name: str):
        self.name = name
        super().__init__(fn)

    def postprocess_message(self, msg):
        if msg["name"] == self.name:
            raise _Stop


def _trace_through(
    program: Callable, prefix_values: dict, last: str, args: tuple, kwargs: dict
) -> dict:
    """The trace of one particle's program (its prefix values substituted, a placeholder
    at the LM site) up to and including the site ``last``."""
    marker = _FirstLatentLM(handlers.substitute(program, data=prefix_values))
    with handlers.trace() as trace:
        try:
            _StopAfter(marker, last)(*args, **kwargs)
        except _Stop:
            pass
    return trace


class StepPotentialFunctions(NamedTuple):
    """One particle's per-step potentials, all of them at once (map over particles with vmap).

    ``states`` is a tuple with one state pytree per potential (``()`` for a stateless one).

    Fields:
      init: ``init(prefix_values) -> states``, before the first token.
      log_weights: ``log_weights(prefix_values, states, prefix [T], t) -> ([V], ...)``, each
        potential's ``log m_t`` of every candidate token.
      update: ``update(prefix_values, states, token [], t) -> states``, after token t.
    """

    init: Callable[[dict[str, jax.Array]], tuple]
    log_weights: Callable[[dict[str, jax.Array], tuple, jax.Array, jax.Array], tuple]
    update: Callable[[dict[str, jax.Array], tuple, jax.Array, jax.Array], tuple]


def step_potential_functions(
    structure: ProgramStructure,
    program: Callable,
    args: tuple,
    kwargs: dict,
    model_params: ModelParams,
) -> StepPotentialFunctions | None:
    """The per-step potentials of one particle, read from its program.

    Each function runs the program with the particle's prefix values substituted and a
    placeholder for the LM site, up to its last per-step potential (so no later site runs,
    and no random key is needed: :func:`discover` refused latent sites between the LM site
    and a per-step potential), and calls the potentials collected in that trace. Returns
    None when the program has no per-step potential.
    """
    if not structure.step_potentials:
        return None
    swapped = _with_params(program, structure, model_params)
    last = structure.step_potentials[-1].name

    def potentials(prefix_values) -> tuple:
        trace = _trace_through(swapped, prefix_values, last, args, kwargs)
        return tuple(
            trace[s.name]["infer"][STEP_POTENTIAL_KEY][0] for s in structure.step_potentials
        )

    def init(prefix_values):
        return tuple(potential.init() for potential in potentials(prefix_values))

    def log_weights(prefix_values, states, prefix, t):
        return tuple(
            potential.log_weights(state, prefix, t)
            for potential, state in zip(potentials(prefix_values), states, strict=True)
        )

    def update(prefix_values, states, token, t):
        return tuple(
            potential.update(state, token, t)
            for potential, state in zip(potentials(prefix_values), states, strict=True)
        )

    return StepPotentialFunctions(init, log_weights, update)


class _CombinedStepPotential:
    """Per-step potentials (no prefix latents) as one stateful potential:
    ``log m_t = Σ_i log m_t^i``, the state the tuple of theirs."""

    def __init__(self, functions: StepPotentialFunctions):
        self.functions = functions

    def init(self) -> tuple:
        return self.functions.init({})

    def log_weights(self, state: tuple, prefix: jax.Array, t: jax.Array) -> jax.Array:
        return sum(self.functions.log_weights({}, state, prefix, t))

    def update(self, state: tuple, token: jax.Array, t: jax.Array) -> tuple:
        return self.functions.update({}, state, token, t)


def combined_step_potential(functions: StepPotentialFunctions) -> Any:
    """A program's per-step potentials (from :func:`step_potential_functions`, for a program
    without latent sites before the LM site) as one
    :class:`~lmppl.types.StatefulStepPotential` whose ``log m_t`` is their sum."""
    return _CombinedStepPotential(functions)
