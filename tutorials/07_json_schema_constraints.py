# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 7. JSON schemas as potentials: SMC, a twist, word-level steps and what bounds can say
#
# A JSON schema defines a regular language L of documents (for the schemas used here). As a
# potential it gives the target
#
# $$
# \sigma(s) \propto p_0(s)\,\mathbb 1[\mathrm{text}(s) \in L], \qquad
# Z = P_{p_0}(\mathrm{text}(s) \in L),
# $$
#
# so $\log Z$ is how much probability the model puts on valid documents within
# `max_new_tokens`. `potentials.json_schema(schema, lm)` builds a token automaton over the
# model's vocabulary once; `potentials.constrain` puts it in the program. SMC carries each
# particle's automaton state, masks every step's proposal to the allowed tokens (the locally
# optimal proposal for the constraint) and weights by the allowed mass, so **every sample
# is valid** and $\hat Z$ is unbiased.
#
# The notebook runs on SmolLM2-135M-Instruct (`lmppl.load("smollm2-135m")`). The tests run
# it at tiny size (`LMPPL_TUTORIAL_SIZE=tiny`): a random table model (a bigram) over a
# character vocabulary, with fewer particles; the code is the same.

# %%
import json
import os
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro

import lmppl
from lmppl import potentials

warnings.simplefilter("ignore", FutureWarning)
TINY = os.environ.get("LMPPL_TUTORIAL_SIZE") == "tiny"

if TINY:
    characters = '{}":,-_ 0123456789abcdefghijklmnopqrstuvwxyz'
    lm = lmppl.table_lm(characters, context_length=64, scale=2.0, seed=0)
    PROMPT = jnp.asarray([lm.tokenizer.bos_token_id])  # token ids: BOS only
    MAX_NEW_TOKENS, NUM_PARTICLES, NUM_RUNS = 40, 16, 8
else:
    lm = lmppl.load("smollm2-135m")
    PROMPT = "A JSON record describing a person, with a name, an age and a favourite colour:\n"
    MAX_NEW_TOKENS, NUM_PARTICLES, NUM_RUNS = 40, 64, 16
print(lm.name, "vocabulary", lm.vocab_size)

# %% [markdown]
# ## The schema and its automaton
#
# An object with a string, an integer and an enum. outlines-core turns the schema into a
# regular expression, lmppl walks every token's text through its automaton (all tokens at
# once) and groups tokens that move alike from every state into classes.

# %%
schema = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer"},
        "colour": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "colour"],
}
start = time.perf_counter()
person = potentials.json_schema(schema, lm)
print(f"{person}  built in {time.perf_counter() - start:.2f} s")


def record():
    s = numpyro.sample("s", lmppl.LM(lm, PROMPT, MAX_NEW_TOKENS))
    potentials.constrain("person", s, person)


def valid(text: str) -> bool:
    """Checked with Python's json, independently of the automaton."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        return False
    return (
        set(document) == {"name", "age", "colour"}
        and isinstance(document["name"], str)
        and len(document["name"]) <= 8
        and isinstance(document["age"], int)
        and document["colour"] in ("red", "green", "blue")
    )


# %% [markdown]
# ## SMC: every sample is a valid document
#
# The automaton must be built on the model's own vocabulary (a tokenizer of another size is
# refused in one line). Each particle's text is checked with `json.loads`.

# %%
smc = lmppl.infer.SMC(record, NUM_PARTICLES, ess_threshold=0.5)
result = smc.run(jax.random.key(0))
texts = result.text("s")
print(f"log Ẑ = {float(result.log_marginal):.2f}")
print(f"valid: {sum(map(valid, texts))} / {len(texts)}")
for text in texts[:4]:
    print(" ", text)
assert all(valid(text) for text in texts)

# %% [markdown]
# ## Word-level steps
#
# `resample_at="word"` resamples only the particles whose next token starts a new word (a
# piece with a leading space, `Ġ` or `▁`, or EOS), among themselves: each step first draws
# whether the next token starts a word, so the weights stay exact. Particles in the middle
# of a word (here, of a key or a string) are left alone.

# %%
words = lmppl.infer.SMC(record, NUM_PARTICLES, ess_threshold=1.0, resample_at="word")
by_word = words.run(jax.random.key(1))
print(
    f"log Ẑ = {float(by_word.log_marginal):.2f}, resampled at {int(by_word.resampled.sum())} "
    f"of {MAX_NEW_TOKENS} steps (only the particles at a word start)"
)
assert all(valid(text) for text in by_word.text("s"))

# %% [markdown]
# ## A learned twist
#
# Twisted SMC proposes from $q_t \propto p_0\, m_t\, \psi_t$ (mask $m_t$ of the automaton,
# twist $\psi_t$). `lmppl.twists.fit` trains $\psi$ with contrastive twist learning on the
# constrained program as it is: its sweeps carry the automaton state like SMC's, and its
# default batch pools the twisted proposal with draws of the untwisted constrained proposal
# $q_0 \propto p_0 m_t$, weighted by the balance heuristic with the step factors included
# (so the learned $\psi_t$ targets $E[\prod_{k>t} m_k \mid s_{\le t}]$, the mass of
# valid completions). Any positive twist leaves the target and the unbiasedness of $\hat Z$
# unchanged; only the variance moves, which the spread of $\log \hat Z$ over runs shows.

# %%
steps = 40 if TINY else 200
twist, history = lmppl.twists.fit(
    record,
    lmppl.twists.MLPTwist(lm, hidden_size=32),
    "ctl",
    num_steps=steps,
    num_particles=NUM_PARTICLES,
    learning_rate=3e-3,
    rng_key=jax.random.key(2),
    progress=False,
)
print(
    f"training ESS/N: first 10 steps {np.mean(history['ess'][:10]):.2f}, last 10 "
    f"{np.mean(history['ess'][-10:]):.2f}"
)
twisted = lmppl.infer.TwistedSMC(record, NUM_PARTICLES, twists={"s": twist})
with_twist = twisted.run(jax.random.key(2))
for text in with_twist.text("s")[:3]:
    print(" ", text)
assert all(valid(text) for text in with_twist.text("s"))
for name, sampler in (("SMC", smc), ("twisted SMC", twisted)):
    runs = np.asarray(sampler.log_marginals(jax.random.key(4), NUM_RUNS), np.float64)
    print(f"{name:12s} log Ẑ over {NUM_RUNS} runs: mean {runs.mean():.2f}, spread {runs.std():.2f}")

# %% [markdown]
# ## How much mass does the schema keep? Bounds
#
# Repeated runs give independent $\log\hat Z$; their mean is a **lower bound** on $\log Z$
# in expectation (Jensen). The matching **upper bound** (conditional SMC with a reference
# that is an exact sample of σ, `lmppl.evaluation.log_z_bounds`) needs exact samples, and
# here they are out of reach: rejection from the masked proposal accepts with probability
# $Z$ itself, so it would take about $1/Z$ draws per sample (printed below). What the runs
# do show is the spread of $\log \hat Z$ across runs; a small spread alone does not prove a
# small bias (a mode the proposal never visits would be missed by every run alike).

# %%
estimates = np.asarray(smc.log_marginals(jax.random.key(3), NUM_RUNS), np.float64)
lower = estimates.mean()
error = estimates.std(ddof=1) / np.sqrt(NUM_RUNS)
print(f"log Z ≥ {lower:.2f} ± {error:.2f} (mean of {NUM_RUNS} SMC runs, ± its standard error)")
print(f"spread of log Ẑ across runs: {estimates.std(ddof=1):.2f} nats")
print(
    f"rejection sampling would need about e^{-lower:.0f} ≈ {np.exp(-lower):.1e} draws per "
    "exact sample: no upper bound from exact references"
)

# %% [markdown]
# ## Beyond regular languages: a grammar
#
# A JSON schema with bounded nesting is a regular language; arbitrarily nested objects are
# not (the braces must balance). `potentials.grammar` takes a context-free grammar in Lark
# syntax, compiled over the same vocabulary by llguidance. Its parser runs on the host: at
# each step one callback receives every particle's prefix and returns their masks (parse
# states are memoised by prefix, so resampling needs nothing from the host). The last step
# allows only tokens that complete a word of the grammar, so the target is still exactly
# $p_0 \cdot 1[\text{text} \in L]$; a particle that cannot close its braces in time gets
# weight zero there.

# %%
NESTED = r"""
start: obj
obj: "{" (pair ("," pair)*)? "}"
pair: KEY ":" (INT | obj)
KEY: /"[a-z]{1,4}"/
INT: /[0-9]{1,3}/
"""
start = time.perf_counter()
nested = potentials.grammar(NESTED, lm)
print(f"{nested}  compiled in {time.perf_counter() - start:.2f} s")


def nested_record():
    s = numpyro.sample("s", lmppl.LM(lm, PROMPT, MAX_NEW_TOKENS))
    potentials.constrain("nested", s, nested)


def nested_valid(text: str) -> bool:
    """Checked with Python's json: an object whose values are integers or such objects."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        return False

    def ok(value) -> bool:
        if isinstance(value, dict):
            return all(ok(v) for v in value.values())
        return isinstance(value, int)

    return isinstance(document, dict) and ok(document)


with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # a run whose particles all fail to finish
    by_grammar = lmppl.infer.SMC(nested_record, NUM_PARTICLES).run(jax.random.key(4))
alive = np.isfinite(np.asarray(by_grammar.log_weights))
texts = by_grammar.text("s")
print(
    f"log Ẑ = {float(by_grammar.log_marginal):.2f}; {int(alive.sum())} of {len(texts)} particles finished"
)
for text in [t for t, a in zip(texts, alive, strict=True) if a][:3]:
    print(" ", text)
assert all(nested_valid(t) for t, a in zip(texts, alive, strict=True) if a)
