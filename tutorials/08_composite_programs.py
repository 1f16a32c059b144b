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
# # 8. Composite programs: a latent prompt, a second prompt to satisfy, a draft proposal, particle Gibbs
#
# A probabilistic program can do more than generate once and score. This notebook builds
# one program step by step, checks every backend against enumeration on a tiny model, then
# runs it on stories260K:
#
# 1. **a prompt that depends on a latent** — a persona $z$ picks the prompt, so each particle
#    prefills its own prompt: $\sigma(z, s) \propto p(z)\, p_0(s \mid \text{prompt}_z)\,\phi(z, s)$;
# 2. **prompt intersection** — the story must also be likely after a second prompt $b$:
#    `numpyro.sample("also", LM(lm, b, T), obs=s)` multiplies the target by $p(s \mid b)$,
#    and SMC scores it token by token with its own KV cache (the proposal is
#    $\propto p(\cdot \mid a, s_{<t})\, p(\cdot \mid b, s_{<t})$);
# 3. **a second model as proposal** — `SMC(..., proposal=draft)` draws tokens from a draft
#    and weights each by $p_0 / p_\text{draft}$, so $\sigma$ and $\hat Z$ are unchanged;
# 4. **particle Gibbs** — iterated conditional SMC as an MCMC kernel, with R-hat and ESS
#    over chains;
# 5. **several LM sites** — a title, then a story conditioned on it, sampled by one sweep
#    over their concatenated steps: $\sigma(t, s) \propto p_0(t)\, p_0(s \mid t)\, \phi(t, s)$.

# %%
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

import lmppl

warnings.simplefilter("ignore", FutureWarning)

# %% [markdown]
# ## A tiny model first, where every answer is known
#
# A table model over `<s> </s> a b c d` (its next token depends on the previous token and
# the position), 3 new tokens: $3 \times 6^3$ joint values of $(z, s)$ can be enumerated,
# so `Exact` gives $\log Z$ and the posterior of the persona exactly.

# %%
tiny = lmppl.table_lm(4, context_length=12, seed=2, scale=1.5)
other = lmppl.table_lm(4, context_length=12, seed=7, scale=1.5)  # same vocabulary
PERSONAS = jnp.array([[2, 1, 1], [3, 5, 4], [5, 2, 1]])  # ids cut at EOS (1): "a", "bdc", "da"
LIKES = jnp.array([0.0, 0.5, -1.0, 1.2, 0.3, -0.4])


def persona_story(lm, second_prompt, steps):
    def program():
        z = numpyro.sample("persona", dist.Categorical(probs=jnp.array([0.2, 0.5, 0.3])))
        s = numpyro.sample("story", lmppl.LM(lm, lmppl.concat([0], PERSONAS[z]), steps))
        numpyro.sample("also", lmppl.LM(lm, second_prompt, steps), obs=s)  # prompt intersection
        numpyro.factor("likes", jnp.sum(LIKES[s]) if lm is tiny else 0.0)

    return program


program = persona_story(tiny, "dd", 3)
exact = lmppl.infer.Exact(program).run(None)
weights = np.asarray(exact.weights)
personas = np.asarray(exact.samples["persona"])
print(f"log Z = {float(exact.log_marginal):.4f}")
print(
    "P(persona | story fits both prompts) =",
    [round(float(weights[personas == k].sum()), 3) for k in range(3)],
)

# %% [markdown]
# Every backend runs the same program unchanged. Over 1000 independent runs, the mean of
# $\hat Z / Z$ should be 1 within its standard error: importance sampling and SMC with the
# second prompt scored per step (default) or at the end, and SMC whose tokens come from
# another model of the same vocabulary.

# %%
log_z = float(exact.log_marginal)
samplers = {
    "IS": lmppl.infer.ImportanceSampling(program, 16),
    "SMC, per step": lmppl.infer.SMC(program, 16),
    "SMC, at end": lmppl.infer.SMC(program, 16, observed_lms="at_end"),
    "SMC, draft proposal": lmppl.infer.SMC(program, 16, proposal=other),
}
for name, sampler in samplers.items():
    estimates = np.asarray(sampler.log_marginals(jax.random.key(1), 1000), np.float64)
    ratio = np.exp(estimates - log_z)
    print(
        f"{name:22s} E[Ẑ/Z] = {ratio.mean():.3f} ± {ratio.std() / np.sqrt(len(ratio)):.3f}   "
        f"sd of log Ẑ {estimates.std():.3f}"
    )

# %% [markdown]
# Scoring the second prompt per step gives the smaller spread of $\log \hat Z$ at the same
# N: the proposal already knows what the second prompt wants, where the end-of-sequence
# scoring discovers it only after all tokens are drawn.
#
# ## Particle Gibbs
#
# Particle Gibbs needs the LM site to be the only latent site (it clamps the sequence), so
# fix the persona and keep the intersection. Each iteration is one conditional SMC sweep;
# the chain's sequences are draws of σ after burn-in.


# %%
def fixed_persona():
    s = numpyro.sample("story", lmppl.LM(tiny, lmppl.concat([0], PERSONAS[1]), 3))
    numpyro.sample("also", lmppl.LM(tiny, "dd", 3), obs=s)


gibbs = lmppl.infer.ParticleGibbs(
    lmppl.infer.SMC(fixed_persona, 4, ess_threshold=1.0),
    num_iterations=400,
    num_chains=4,
    progress=False,
)
chains = gibbs.run(jax.random.key(2))
kept = chains.thinned(burn_in=50)
sigma = lmppl.infer.Exact(fixed_persona).run(None)
support = np.asarray(sigma.samples["story"])
draws = np.asarray(kept.samples["story"]).reshape(-1, 3)
index = {tuple(row): i for i, row in enumerate(support.tolist())}
frequency = np.bincount([index[tuple(row)] for row in draws.tolist()], minlength=len(support))
top = np.argsort(-np.asarray(sigma.weights))[:5]
for i in top:
    print(
        f"{tiny.tokenizer.decode(support[i].tolist())!r:10s} σ = {float(sigma.weights[i]):.3f}   "
        f"Gibbs frequency = {frequency[i] / len(draws):.3f}"
    )
print(kept.summary())

# %% [markdown]
# ## Several LM sites: a title, then a story
#
# A program may sample more than one sequence. Each latent LM site is a phase of one sweep:
# the particles generate the title token by token (resampling as usual), then each one
# prefills its own story prompt, which contains its title, and continues with the story;
# the weights, the twists' values and $\hat Z$ carry across the boundary, so $\hat Z$ stays
# unbiased and `Exact` enumerates both sites jointly ($6^2 \times 6^2$ pairs here).
# `TwistedSMC` takes a twist per site (`{"title": ..., "story": ...}`; a site without one
# is untwisted), and conditional SMC clamps the concatenation of the sites' tokens.


# %%
def title_then_story():
    title = numpyro.sample("title", lmppl.LM(tiny, [0], 2))
    story = numpyro.sample("story", lmppl.LM(tiny, lmppl.concat([0, 4], title), 2))
    numpyro.factor("likes", jnp.sum(LIKES[title]) - jnp.sum(LIKES[story]))


two_sites = lmppl.infer.Exact(title_then_story).run(None)
log_z2 = float(two_sites.log_marginal)
estimates = np.asarray(
    lmppl.infer.SMC(title_then_story, 16).log_marginals(jax.random.key(3), 1000), np.float64
)
ratio = np.exp(estimates - log_z2)
print(f"log Z = {log_z2:.4f};  SMC E[Ẑ/Z] = {ratio.mean():.3f} ± {ratio.std() / np.sqrt(1000):.3f}")

# %% [markdown]
# ## On stories260K
#
# The same program on a real model: a persona picks the opening, and the story must also
# be likely after a second prompt. (`benchmarks/composite.py` compares per-step and
# end-of-sequence scoring on stories260K, and a draft proposal made of its first blocks,
# `lmppl.lm.truncated(lm, k)`, distilled to p0, by the cost per effective sample.)

# %%
stories = lmppl.load("stories260k")
openings = ["Once upon a time, there was a girl", "One day, a boy", "The cat"]
encoded = [stories.tokenizer.encode(text) for text in openings]
width = max(map(len, encoded))
EOS = stories.eos_token_id
OPENINGS = jnp.array([ids + [EOS] * (width - len(ids)) for ids in encoded])


def real_program():
    z = numpyro.sample("persona", dist.Categorical(probs=jnp.ones(3) / 3))
    s = numpyro.sample("story", lmppl.LM(stories, lmppl.concat(OPENINGS[z]), 10))
    numpyro.sample(
        "also", lmppl.LM(stories, "The sun was shining and everyone was happy.", 10), obs=s
    )


result = lmppl.infer.SMC(real_program, 64).run(jax.random.key(4))
print(f"log Ẑ = {float(result.log_marginal):.2f}, final ESS {float(result.ess[-1]):.1f} of 64")
weights = np.asarray(result.weights)
chosen = np.asarray(result.samples["persona"])
for k, opening in enumerate(openings):
    print(f"P(persona = {opening!r} | ·) ≈ {weights[chosen == k].sum():.2f}")
best = int(np.argmax(weights))
print("a story:", openings[int(chosen[best])] + result.text("story")[best])

# %% [markdown]
# And two sites on stories260K: a short opening line, then a story that starts from it and
# is steered toward the word "dog" (a factor on the story's tokens).

# %%
DOG = jnp.asarray(stories.tokenizer.encode(" dog", add_bos=False))


def opening_then_story():
    line = numpyro.sample("line", lmppl.LM(stories, "Once upon a time,", 6))
    story = numpyro.sample("story", lmppl.LM(stories, lmppl.concat("Once upon a time,", line), 12))
    numpyro.factor("dog", 2.0 * jnp.sum(jnp.isin(story, DOG)))


result = lmppl.infer.SMC(opening_then_story, 64).run(jax.random.key(5))
best = int(np.argmax(np.asarray(result.weights)))
line = result.text("line")[best]
print(f"log Ẑ = {float(result.log_marginal):.2f}")
print("Once upon a time," + line + " |" + result.text("story")[best])
