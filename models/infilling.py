"""Infilling (Zhao et al. 2024, Sec. 7.3): a story prefix given its observed continuation.

``σ(s | y) ∝ p0(s) · p0(y | s)``: the latent story s (T tokens after the prompt) is followed
by an observed ending y of c tokens, ``numpyro.sample("ending", LM(prompt + s), obs=y)``.
Exact samples: draw (s, y) jointly from p0; s is then exact for σ(· | y). The twist is
conditional: it sees y (``twist_condition``). Settings: T = 15, c = 10 and the small
T = 2, c = 1. Offline p0 is stories260K; the paper's is ``"roneneldan/TinyStories-33M"``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpyro

import lmppl
from lmppl import evaluation
from lmppl.task import Task, task_factory
from models.common import resolve_model

__all__ = ["PROMPT", "infilling", "infilling_fixed", "infilling_small"]

PROMPT = "Once upon a time,"


def _ending_condition(ending):
    return ending


def _encode_ending(lm, ending: str):
    ids = jnp.asarray(lm.tokenizer.encode(ending, add_bos=False), jnp.int32)
    if ids.shape[0] == 0:
        raise ValueError("the ending text encodes to no tokens")
    return ids


def _story_then_ending(lm, prompt: str, num_tokens: int, num_observed: int, ending):
    """The infilling program's body: a latent story, then the ending observed after it."""
    story = numpyro.sample(
        "story", lmppl.LM(lm, prompt=prompt, max_new_tokens=num_tokens, stop_at_eos=False)
    )
    continuation = lmppl.LM(
        lm, prompt=lmppl.concat(prompt, story), max_new_tokens=num_observed, stop_at_eos=False
    )
    numpyro.sample("ending", continuation, obs=ending)


@task_factory
def infilling(
    model="stories260k",
    num_tokens: int = 15,
    num_observed: int = 10,
    ending: str | None = None,
    seed: int = 0,
    prompt: str = PROMPT,
) -> Task:
    """σ(s | y) for an ending y: given as text, or (default) drawn from p0 with ``seed``.

    A text ending is encoded without BOS and sets ``num_observed`` to its length.
    """
    lm = resolve_model(model)
    ending_ids = None
    if ending is not None:
        ending_ids = _encode_ending(lm, ending)
        num_observed = int(ending_ids.shape[0])

    def infill(ending):
        _story_then_ending(lm, prompt, num_tokens, num_observed, ending)

    if ending_ids is None:
        drawn = evaluation.joint_sample(infill, jax.random.key(seed), 1, observed="ending")
        ending_ids = jnp.asarray(drawn.conditions[0], jnp.int32)
    return Task(
        name=f"infilling_T{num_tokens}_c{num_observed}",
        program=infill,
        lm=lm,
        args=(ending_ids,),
        exact="joint",
        observed="ending",
        condition_argument=0,
        twist_condition=_ending_condition,
        description=f"p0({lm.name}) story of {num_tokens} tokens given a {num_observed}-token ending",
    )


@task_factory
def infilling_small(model="stories260k", ending: str | None = None, seed: int = 0) -> Task:
    """The small infilling setting: T = 2 latent tokens, c = 1 observed token."""
    return infilling(model, num_tokens=2, num_observed=1, ending=ending, seed=seed)


@task_factory
def infilling_fixed(
    model="stories260k",
    num_tokens: int = 4,
    ending: str = "a little g",
    prompt: str = "Once upon a time",
) -> Task:
    """A few free tokens before a fixed, known ending: ``σ(s) ∝ p0(s) p0(ending | s)``.

    The ending is part of the program (not a condition), so the target is one fixed
    distribution whose exact samples come by rejection from p0 (φ = p0(ending | s) ≤ 1).
    The default (4 tokens after "Once upon a time", ending " a little g") has
    log Z ≈ −6.3 and a multi-modal σ (", there lived", ",, there was", ...), on which
    CTL with SIS positives drops modes (issue #11).
    """
    lm = resolve_model(model)
    ending_ids = _encode_ending(lm, ending)

    def infill_fixed():
        _story_then_ending(lm, prompt, num_tokens, int(ending_ids.shape[0]), ending_ids)

    return Task(
        name=f"infilling_fixed_T{num_tokens}",
        program=infill_fixed,
        lm=lm,
        exact="rejection",
        description=f"p0({lm.name}) {num_tokens} tokens before the fixed ending {ending!r}",
    )
