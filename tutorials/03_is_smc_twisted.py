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
# # 3. Importance sampling, SMC and twisted SMC
#
# A program declares σ(s) ∝ p0(s) φ(s) (notebook 2); an *inference backend* turns it into
# weighted particles $\{(s^i, w^i)\}_{i=1}^N$ and an estimate $\hat Z$ of the normaliser.
# The program never changes: only the backend does.
#
# | backend | proposal | resampling |
# |---|---|---|
# | `ImportanceSampling(program, N)` | $p_0$ token by token | never |
# | `SMC(program, N)` | $p_0$ token by token | when ESS < N/2 (`ess_threshold`) |
# | `TwistedSMC(program, N, twists={site: ψ})` | $q_t(v) \propto p_0(v\mid s_{<t})\,\psi_t(s_{<t}, v)$ | every step |
#
# All three compute the same estimator. With incremental weights $w_t$ and resampling
# epochs $e$,
#
# $$
# \log \hat Z = \sum_{e} \log \frac{1}{N}\sum_{i=1}^{N} \prod_{t \in e} w_t^i ,
# \qquad \mathbb{E}[\hat Z] = Z, \qquad \mathbb{E}[\log \hat Z] \le \log Z .
# $$
#
# $\hat Z$ is unbiased, so by Jensen's inequality $\log \hat Z$ is biased *down*; the better
# the sampler, the smaller the spread of $\log\hat Z$ and the smaller that bias. On a tiny
# model we can compare against the exact $\log Z$ from `Exact`.

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
from lmppl.diagnostics import run_many  # noqa: E402

# %% [markdown]
# ## A tiny target with a rare event
#
# Five tokens from the tiny table model (`<s> </s> a b c`, so $5^5 = 3125$ sequences), and a
# classifier-like potential that likes many `c`'s:
# $\phi(s) = \operatorname{sigmoid}(2\cdot\#c(s) - 6) \in (0, 1)$.

# %%
tiny = lmppl.table_lm(3, context_length=12, seed=6)
C = tiny.tokenizer.encode("c", add_bos=False)[0]
T, N, RUNS = 5, 16, 100


def many_c():
    s = numpyro.sample("s", lmppl.LM(tiny, "a", T, stop_at_eos=False))
    numpyro.factor("classifier", jax.nn.log_sigmoid(2.0 * jnp.sum(s == C) - 6.0))


exact = lmppl.infer.Exact(many_c)
log_z = float(exact.run().log_marginal)
print(f"exact log Z = {log_z:.4f}   (Z = {np.exp(log_z):.4f})")

# %% [markdown]
# One run of each particle backend, with $N = 16$. `run` returns an `InferenceResult`:

# %%
backends = {
    "ImportanceSampling": lmppl.infer.ImportanceSampling(many_c, N),
    "SMC": lmppl.infer.SMC(many_c, N),
}
for name, backend in backends.items():
    result = backend.run(jax.random.key(0))
    print(
        f"{name:20s} log Ẑ = {float(result.log_marginal):.4f}  final ESS = {result.effective_sample_size:.1f}"
    )
    print("   ", result.text()[:4], "weights", np.asarray(result.weights[:4]).round(3))

# %% [markdown]
# ## The optimal twist
#
# Twisted SMC targets intermediate distributions $\pi_t(s_{1:t}) \propto p_0(s_{1:t})\,\psi_t(s_{1:t})$.
# The best possible twist is the expected future potential,
#
# $$
# \psi^*_t(s_{1:t}) \;=\; \mathbb{E}_{p_0}\!\left[\phi(s) \mid s_{1:t}\right],
# $$
#
# for which $\pi_t$ is exactly the marginal of σ on the first $t$ tokens, the twist-induced
# proposal $q_t \propto p_0\,\psi^*_t$ is σ's own conditional, and every incremental weight is a
# constant: **every run returns $\log \hat Z = \log Z$**. On a tiny model `Exact.optimal_twist()`
# computes ψ* by enumeration (for real models, notebook 4 *learns* an approximation).

# %%
optimal = exact.optimal_twist()
print(
    "log ψ*_1 for each first token:",
    {p: round(float(v), 3) for p, v in zip(tiny.tokenizer.pieces, optimal.log_psi[0], strict=True)},
)
print(
    "log ψ*_2(b, c) =",
    round(optimal.at([3, C]), 3),
    "  log ψ*_2(b, a) =",
    round(optimal.at([3, 2]), 3),
)

twisted = lmppl.infer.TwistedSMC(many_c, N, twists={"s": optimal})
result = twisted.run(jax.random.key(0))
print(
    f"TwistedSMC(ψ*)  log Ẑ = {float(result.log_marginal):.6f}  (exact {log_z:.6f}), ESS per step:",
    np.asarray(result.ess).round(2),
)

# %% [markdown]
# ## Repeated runs: the spread of log Ẑ
#
# `run_many` runs a backend with independent keys (one compile, then cheap calls). Between
# bootstrap SMC (ψ ≡ 1) and the optimal twist, we also try the *partial* twist
# $\psi_t = (\psi^*_t)^{1/2}$, a stand-in for an imperfect learned twist (`ExactTwist` takes any
# table of $\log\psi_t$).

# %%
half = lmppl.infer.ExactTwist([0.5 * table for table in optimal.log_psi], tiny.vocab_size)
samplers = {  # the samplers built above keep their compiled sweeps
    "IS": backends["ImportanceSampling"],
    "SMC": backends["SMC"],
    "twisted, ψ*^½": lmppl.infer.TwistedSMC(many_c, N, twists={"s": half}),
    "twisted, ψ*": twisted,
}
runs = {name: run_many(sampler, jax.random.key(1), RUNS) for name, sampler in samplers.items()}
errors = {name: np.array([float(r.log_marginal) for r in rs]) - log_z for name, rs in runs.items()}

print(f"{'backend':14s} {'E[log Ẑ]-log Z':>15s} {'std':>7s} {'log mean Ẑ - log Z':>19s}")
for name, e in errors.items():
    log_mean = np.log(np.mean(np.exp(e)))
    print(f"{name:14s} {e.mean():15.4f} {e.std():7.4f} {log_mean:19.4f}")

fig, ax = plt.subplots(figsize=(7, 3))
ax.boxplot(list(errors.values()), orientation="horizontal")
ax.set_yticks(range(1, len(errors) + 1), list(errors))
ax.axvline(0.0, color="black", linewidth=0.8)
ax.set_xlabel("log Ẑ − log Z")
ax.set_title(f"{RUNS} runs with N = {N} particles")
plt.show()

# %% [markdown]
# Three things to read off:
#
# * **IS and bootstrap SMC are identical here.** The potential is only known at the end, so
#   every intermediate weight is 1, the ESS never drops and SMC never resamples: it *is*
#   importance sampling with $p_0$ as proposal. Bootstrap SMC only helps when intermediate
#   weights carry information (per-step potentials, or a twist).
# * $\mathbb{E}[\log\hat Z] < \log Z$ (Jensen) while $\log \operatorname{mean}(\hat Z) \approx \log Z$
#   ($\hat Z$ is unbiased).
# * A better twist shrinks the spread; the optimal one removes it.
#
# ## ESS per decoding step
#
# The effective sample size $\text{ESS} = (\sum_i w^i)^2 / \sum_i (w^i)^2$ of the particle
# weights, recorded before each step's resampling (and of the final weights), shows *where*
# a sampler loses particles. `lmppl.plots.plot_ess` draws it for a few runs:

# %%
fig, axes = plt.subplots(1, 3, figsize=(12, 3), sharey=True)
for ax, name in zip(axes, ["SMC", "twisted, ψ*^½", "twisted, ψ*"], strict=True):
    lmppl.plots.plot_ess(runs[name][:4], ax=ax)
    ax.set_title(name)
plt.show()

# %% [markdown]
# Bootstrap SMC keeps all 16 particles until the last step, where the potential arrives and
# the ESS collapses. With the partial twist the information arrives gradually (and is
# resampled away at every step); with ψ* no particle is ever lost.
#
# ## A real model: swap the backend, keep the program
#
# On stories260K a per-step potential gives bootstrap SMC something to work with: reward
# a few cheerful words by $\log m_t(v) = 3$ at every step (`potentials.step_factor`). The
# samplers apply it as a locally optimal proposal, $q_t(v) \propto p_0(v \mid s_{<t})\,m_t(v)$,
# with incremental weight $\sum_v p_0(v \mid s_{<t})\,m_t(v)$: the weights now change along the
# way, and SMC resamples whenever the ESS falls below N/2.

# %%
lm = lmppl.load("stories260k")
PROMPT = "Once upon a time, there was a"
words = ["happy", "fun", "love", "friend", "play", "laugh", "smile", "friends"]
encoded = [lm.tokenizer.encode(w, add_bos=False) for w in words]
cheerful = [ids[0] for ids in encoded if len(ids) == 1]  # words that are a single token
print("rewarded tokens:", [lm.tokenizer.decode([i]) for i in cheerful])
bonus = jnp.zeros(lm.vocab_size).at[jnp.array(cheerful)].set(3.0)  # log m_t(v)


def cheerful_story():
    story = numpyro.sample("story", lmppl.LM(lm, prompt=PROMPT, max_new_tokens=16))
    potentials.step_factor(
        "cheerful", story, lambda prefix, t: bonus, eos_token_id=lm.tokenizer.eos_token_id
    )


real = {
    "IS": run_many(lmppl.infer.ImportanceSampling(cheerful_story, 32), jax.random.key(2), 6),
    "SMC": run_many(lmppl.infer.SMC(cheerful_story, 32), jax.random.key(2), 6),
}
for name, rs in real.items():
    log_zs = np.array([float(r.log_marginal) for r in rs])
    steps = [int(np.sum(r.resampled)) for r in rs]
    print(f"{name:4s} log Ẑ over 6 runs: {log_zs.round(2)}  resampling steps per run: {steps}")

fig, axes = plt.subplots(1, 2, figsize=(10, 3), sharey=True)
for ax, (name, rs) in zip(axes, real.items(), strict=True):
    lmppl.plots.plot_ess(rs[:4], ax=ax)
    ax.set_title(f"{name} on stories260K (N = 32)")
plt.show()

# %% [markdown]
# IS lets the ESS decay for good once a few particles have collected rewarded words; SMC
# resets it to N each time it resamples. The highest-weight stories of one SMC run:

# %%
result = real["SMC"][0]
for i in np.argsort(-np.asarray(result.weights))[:5]:
    print(f"w = {float(result.weights[i]):.3f}  {PROMPT}{result.text()[i]}")

# %% [markdown]
# ## Summary
#
# * One program, three backends: `ImportanceSampling`, `SMC`, `TwistedSMC`; `Exact` for tiny
#   models gives the truth to compare with.
# * $\hat Z$ is unbiased and $\log \hat Z$ is a stochastic lower bound on $\log Z$; its spread
#   measures the sampler. Notebook 5 turns this into *bidirectional* bounds.
# * Bootstrap SMC needs intermediate information; twists provide it, and the optimal twist
#   $\psi^*_t = \mathbb{E}_{p_0}[\phi \mid s_{1:t}]$ gives zero variance. Notebook 4 learns twists.
