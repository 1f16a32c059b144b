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
# # 2. Declaring targets: σ ∝ p0 · φ
#
# Steering a language model, red-teaming it, infilling a story, or forbidding words are all
# the same problem: sample from an *unnormalised target*
#
# $$
# \sigma(s) \;=\; \frac{p_0(s)\,\phi(s)}{Z}, \qquad Z = \sum_s p_0(s)\,\phi(s) = \mathbb{E}_{p_0}[\phi(s)],
# $$
#
# where $p_0$ is the language model (notebook 1) and $\phi \ge 0$ a *potential*. In lmppl
# the program says what $\phi$ is, in NumPyro's own words:
#
# * `numpyro.factor(name, log_phi)` adds $\log\phi$ (any JAX expression of the tokens, or
#   a host scorer of the decoded text);
# * an *observed* site adds its log-likelihood: observing a continuation of the story is
#   infilling;
# * `potentials.banned_tokens` / `step_factor` are per-step constraints that samplers apply
#   at every decoding step.
#
# $\log \phi$ is the sum of every factor and observed site of the program. On a tiny model
# `lmppl.infer.Exact` enumerates all sequences and gives σ and $\log Z$ exactly, which is
# how we look at each target below.

# %%
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # a notebook-only tqdm notice

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402

import lmppl  # noqa: E402
from lmppl import potentials  # noqa: E402

# %% [markdown]
# ## A soft potential, exactly
#
# The tiny table model has the vocabulary `<s> </s> a b c`; we generate $T = 4$ tokens
# after the prompt `a`, so there are $5^4 = 625$ sequences. The target prefers the letter
# `c`: $\log\phi(s) = 1.5\cdot\#\{t : s_t = c\}$.

# %%
tiny = lmppl.table_lm(3, context_length=12, seed=6)
A, B, C = (tiny.tokenizer.encode(x, add_bos=False)[0] for x in "abc")
T = 4


def likes_c():
    s = numpyro.sample("s", lmppl.LM(tiny, "a", T, stop_at_eos=False))
    numpyro.factor("likes_c", 1.5 * jnp.sum(s == C))


exact = lmppl.infer.Exact(likes_c).run()
print(exact)
print("log Z =", float(exact.log_marginal))

# %% [markdown]
# The result is an `InferenceResult` whose "particles" are all 625 sequences:
# `log_weights` is $\log p_0(s) + \log\phi(s)$ (so `softmax(log_weights)` is σ),
# `log_potential` is $\log\phi(s)$ and `log_marginal` is $\log Z$ exactly.
# Let us put $p_0$ and σ side by side for the most likely sequences under σ. (The random
# table model treats `<s>` and `</s>` as ordinary letters here, since `stop_at_eos=False`.)

# %%
p0_dist = lmppl.LM(tiny, "a", T, stop_at_eos=False)


def table(result, top=10):
    """The `top` sequences under σ with p0, φ and σ."""
    log_phi = np.asarray(result.log_potential)
    log_p0 = np.asarray(p0_dist.log_prob(result.samples[result.site]))
    sigma = np.asarray(result.weights)
    order = np.argsort(-sigma)[:top]
    print(f"{'sequence':10s} {'p0':>8s} {'log φ':>7s} {'σ':>8s}")
    for i in order:
        text = tiny.tokenizer.decode(result.samples[result.site][i], skip_special_tokens=False)
        print(f"{text:10s} {np.exp(log_p0[i]):8.4f} {log_phi[i]:7.2f} {sigma[i]:8.4f}")
    return order


order = table(exact)

p0 = np.exp(np.asarray(p0_dist.log_prob(exact.samples["s"])))
sigma = np.asarray(exact.weights)
fig, ax = plt.subplots(figsize=(7, 3))
x = np.arange(len(order))
ax.bar(x - 0.2, p0[order], 0.4, label="$p_0(s)$")
ax.bar(x + 0.2, sigma[order], 0.4, label="$\\sigma(s)$")
labels = [tiny.tokenizer.decode(exact.samples["s"][i], skip_special_tokens=False) for i in order]
ax.set_xticks(x, labels, rotation=45, fontsize=8)
ax.set_title("The potential moves mass towards sequences with many c's")
ax.legend()
plt.show()

# %% [markdown]
# $Z = \mathbb{E}_{p_0}[\phi]$, so a plain Monte Carlo average over $p_0$ samples estimates it
# too (with high variance when φ is rare; that is what the samplers of notebook 3 fix):

# %%
draws = p0_dist.sample(jax.random.key(0), (50_000,))
print("Monte Carlo log E_p0[φ] =", float(jnp.log(jnp.mean(jnp.exp(1.5 * jnp.sum(draws == C, -1))))))
print("exact log Z             =", float(exact.log_marginal))

# %% [markdown]
# ## Hard constraints: `threshold` and `log_indicator`
#
# An indicator $\phi(s) = 1[\text{condition}]$ has $\log\phi \in \{0, -\infty\}$;
# `potentials.threshold(score, limit)` is $\log 1[\text{score} < \text{limit}]$
# (`below=False` for $>$) and `log_indicator(condition)` the general form. Sequences with
# $\log\phi = -\infty$ get weight zero, and $Z$ is then the *probability of the event*
# under $p_0$. Here: "no `a` in the four new tokens".


# %%
def no_a():
    s = numpyro.sample("s", lmppl.LM(tiny, "a", T, stop_at_eos=False))
    numpyro.factor("no_a", potentials.threshold(jnp.sum(s == A), 1))


exact_no_a = lmppl.infer.Exact(no_a).run()
print(
    "log Z =",
    float(exact_no_a.log_marginal),
    "  Z = P_p0(no a) =",
    float(jnp.exp(exact_no_a.log_marginal)),
)
print("fraction of p0 samples without a:", float(jnp.mean(jnp.all(draws != A, axis=-1))))
_ = table(exact_no_a, 5)

# %% [markdown]
# `floor=` keeps a small weight on the excluded sequences (the paper's threshold task uses
# $10^{-16}$): $\log\phi \in \{0, \log \text{floor}\}$ keeps every sequence in the support.

# %%
print(
    potentials.threshold(jnp.array([0.0, 3.0]), 1.0),
    potentials.threshold(jnp.array([0.0, 3.0]), 1.0, floor=1e-16),
)

# %% [markdown]
# ## Per-step constraints: `banned_tokens`
#
# The same target can be written as a *per-step* potential,
# $\phi(s) = \prod_t m_t(s_{<t}, s_t)$ with $m_t(v) = 1[v \neq a]$. Plain NumPyro (and `Exact`)
# sees the same total factor, but SMC applies $m_t$ at every decoding step: it proposes from
# $p_0(v \mid s_{<t})\,m_t(v)$ (renormalised) and weights by the normaliser, so no particle is
# ever wasted on a banned token.


# %%
def no_a_per_step():
    s = numpyro.sample("s", lmppl.LM(tiny, "a", T, stop_at_eos=False))
    potentials.banned_tokens("no_a", s, [A], tiny.vocab_size)


print("Exact log Z, per-step form:", float(lmppl.infer.Exact(no_a_per_step).run().log_marginal))

for program in (no_a, no_a_per_step):
    result = lmppl.infer.SMC(program, num_particles=256).run(jax.random.key(1))
    zero = int(jnp.sum(~jnp.isfinite(result.log_weights)))
    print(
        f"SMC on {program.__name__:14s}: log Ẑ = {float(result.log_marginal):.4f}, "
        f"particles with weight 0: {zero:3d}/256, final ESS {result.effective_sample_size:.0f}"
    )

# %% [markdown]
# ## Infilling: observing a continuation
#
# For infilling, the potential is the likelihood of an observed ending $y$ given the
# latent story $s$: $\phi(s) = p_0(y \mid \text{prompt}, s)$, and σ is the posterior
# $p_0(s \mid y)$. In a program this is a second LM site whose prompt contains the sampled
# story (`lmppl.concat`), observed at `y`:


# %%
def infill(ending):
    s = numpyro.sample("s", lmppl.LM(tiny, "a", T, stop_at_eos=False))
    numpyro.sample("ending", lmppl.LM(tiny, lmppl.concat("a", s), 2, stop_at_eos=False), obs=ending)


ending = jnp.array([C, C])  # we observe "cc" after the story
posterior = lmppl.infer.Exact(infill).run(None, ending)
print("log Z = log p0(y) =", float(posterior.log_marginal))
_ = table(posterior, 6)

# %% [markdown]
# The table model's next token depends only on the previous token (and the position), so
# the ending `cc` depends on the story only through its *last* token: φ is a function of
# $s_4$ alone, and σ reweights the last token's marginal (and, through it, the rest):

# %%
last = np.asarray(posterior.samples["s"][:, -1])
prior_last = np.bincount(
    last, weights=np.exp(np.asarray(p0_dist.log_prob(posterior.samples["s"]))), minlength=5
)
post_last = np.bincount(last, weights=np.asarray(posterior.weights), minlength=5)
for token in range(tiny.vocab_size):
    print(
        f"{tiny.tokenizer.pieces[token]:5s} p0 {prior_last[token]:.3f}   σ {post_last[token]:.3f}"
    )

# %% [markdown]
# ## Real text: host scorers on stories260K
#
# Potentials on decoded text are Python functions run on the host. `potentials.text(score_fn,
# tokenizer)` wraps `score_fn(list_of_strings) -> log φ per string` as a JAX function of token
# ids: it decodes all particles and calls `score_fn` *once per sweep* (one
# `jax.pure_callback`), never per token. Here a story scores $\log\phi = 2$ per animal word.

# %%
lm = lmppl.load("stories260k")
PROMPT = "Once upon a time, there was a"
ANIMALS = ("dog", "cat", "bird", "fish", "bunny", "bear", "duck", "frog", "lion")


def animal_words(texts):
    return [2.0 * sum(text.lower().count(word) for word in ANIMALS) for text in texts]


animals = potentials.text(animal_words, lm.tokenizer)


def animal_story():
    story = numpyro.sample("story", lmppl.LM(lm, prompt=PROMPT, max_new_tokens=12))
    numpyro.factor("animals", animals(story))


result = lmppl.infer.SMC(animal_story, num_particles=64).run(jax.random.key(0))
print(result)
weights = np.asarray(result.weights)
for i in np.argsort(-weights)[:5]:
    print(
        f"w = {weights[i]:.3f}  log φ = {float(result.log_potential[i]):.0f}  {PROMPT}{result.text()[i]}"
    )

# %% [markdown]
# `potentials.text_classifier(predict_proba, tokenizer, target_class)` is the common case
# $\phi(s) = p(\text{class} \mid s)$ for any classifier with a scikit-learn-style
# `predict_proba`. `lmppl.scorers` ships offline ones: `offensive_language()` (a linear
# offensive-language model, used by the toxicity tasks in `models/toxicity.py`) and
# `vader_sentiment()` (5 ordered classes from VADER's lexicon); `hf_text_classifier` runs
# any Hugging Face classifier. Here: stories that VADER rates "5 stars".

# %%
vader = lmppl.scorers.vader_sentiment()
positive = potentials.text_classifier(vader, lm.tokenizer, target_class=4)


def positive_story():
    story = numpyro.sample("story", lmppl.LM(lm, prompt=PROMPT, max_new_tokens=12))
    numpyro.factor("positive", positive(story))


result = lmppl.infer.SMC(positive_story, num_particles=64).run(jax.random.key(1))
weights = np.asarray(result.weights)
p5_target = float(np.sum(weights * np.exp(np.asarray(result.log_potential))))
print(f"E_p0[p(5 stars | s)] = Z ≈ exp(log Ẑ) = {float(jnp.exp(result.log_marginal)):.3f}")
print(f"E_σ[p(5 stars | s)]  ≈ Σ_i w_i φ(s_i) = {p5_target:.3f}")
for i in np.argsort(-weights)[:4]:
    print(f"p(5 stars) = {np.exp(float(result.log_potential[i])):.2f}  {PROMPT}{result.text()[i]}")

# %% [markdown]
# Note the first line: for a classifier potential, $Z = \mathbb{E}_{p_0}[p(\text{class}\mid s)]$
# is the probability that a story from $p_0$ is in the class, and the sampler's $\hat Z$
# estimates it.
#
# ## Banning tokens in real text
#
# `banned_tokens` works on any model. stories260K loves the name *Lily* (a single token);
# forbid it, and every particle is a story without her, while the ESS stays at N:

# %%
LILY = lm.tokenizer.encode("Lily", add_bos=False)
print("banned ids:", LILY, [lm.tokenizer.decode([i]) for i in LILY])


def no_lily():
    story = numpyro.sample("story", lmppl.LM(lm, prompt=PROMPT, max_new_tokens=12))
    potentials.banned_tokens(
        "no_lily", story, LILY, lm.vocab_size, eos_token_id=lm.tokenizer.eos_token_id
    )


result = lmppl.infer.SMC(no_lily, num_particles=16).run(jax.random.key(2))
print(result, " P_p0(no Lily) ≈", float(jnp.exp(result.log_marginal)))
for text in result.text()[:5]:
    print("   ", PROMPT + text)
assert not any("Lily" in text for text in result.text())

# %% [markdown]
# ## Summary
#
# | what you want | how the program says it |
# |---|---|
# | reweight by a JAX score | `numpyro.factor("f", log_phi(s))` |
# | a hard constraint | `numpyro.factor("f", potentials.threshold(score, limit))` / `log_indicator(cond)` |
# | a text scorer / classifier | `potentials.text(score_fn, tok)` / `potentials.text_classifier(predict_proba, tok, k)` |
# | forbid tokens at every step | `potentials.banned_tokens(name, s, ids, V)` / `step_factor` |
# | infill before an ending y | `numpyro.sample("ending", lmppl.LM(lm, lmppl.concat(prompt, s), c), obs=y)` |
#
# `Exact` gives σ and $\log Z$ for tiny models. For real models we need samplers that are
# accurate with few particles: notebook 3.
