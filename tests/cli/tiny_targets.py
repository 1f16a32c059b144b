"""Tiny targets for the command-line tests: a table LM over ``<s> </s> a b c`` (vocab 5).

Every form of TARGET appears here: a plain program without arguments, a task factory, a
Task, a conditional (infilling-style) factory, and objects the CLI must refuse.
"""

import jax.numpy as jnp
import numpyro

import lmppl

LM = lmppl.table_lm(3, context_length=12, seed=1)
B = LM.tokenizer.encode("b", add_bos=False)[0]


def _likes_b(tokens, weight):
    return jnp.log(jnp.where(jnp.any(tokens == B), weight, 1.0 - weight))


def program():
    """σ(s) ∝ p0(s) · (0.9 if s contains "b" else 0.1), T = 3."""
    s = numpyro.sample("s", lmppl.LM(LM, prompt="a", max_new_tokens=3, stop_at_eos=False))
    numpyro.factor("likes_b", _likes_b(s, 0.9))


@lmppl.task_factory
def tiny(num_tokens: int = 3, weight: float = 0.9) -> lmppl.Task:
    """The same target with T and the weight as options; exact samples by enumeration."""

    def likes_b():
        s = numpyro.sample(
            "s", lmppl.LM(LM, prompt="a", max_new_tokens=num_tokens, stop_at_eos=False)
        )
        numpyro.factor("likes_b", _likes_b(s, weight))

    return lmppl.Task(
        name="tiny", program=likes_b, lm=LM, site="s", exact="enumerate", description="tiny"
    )


TASK = tiny(num_tokens=2)


def _ending(ending):
    return ending


@lmppl.task_factory
def tiny_infilling(ending: str = "ba") -> lmppl.Task:
    """Infilling: 2 latent tokens given an observed 2-token ending (a conditional twist)."""
    ending_ids = jnp.asarray(LM.tokenizer.encode(ending, add_bos=False), jnp.int32)

    def infill(ending):
        story = numpyro.sample("s", lmppl.LM(LM, prompt="a", max_new_tokens=2, stop_at_eos=False))
        numpyro.sample(
            "ending",
            lmppl.LM(LM, prompt=lmppl.concat("a", story), max_new_tokens=2, stop_at_eos=False),
            obs=ending,
        )

    return lmppl.Task(
        name="tiny_infilling",
        program=infill,
        lm=LM,
        site="s",
        args=(ending_ids,),
        exact="joint",
        observed="ending",
        twist_condition=_ending,
    )


def no_lm():
    numpyro.sample("x", numpyro.distributions.Normal(0.0, 1.0))


def needs_arguments(prompt):
    return prompt


NUMBER = 3
