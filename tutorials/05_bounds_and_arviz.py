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
# # 5. Measuring inference: bidirectional bounds, KL, and ArviZ
#
# How good is a sampler when $\log Z$ is unknown? Zhao et al. (2024, Sec. 5) bracket it.
# For any sampler with $K$ particles, $\hat Z_K$ is unbiased, so
#
# $$
# \underbrace{\mathbb{E}\big[\log \hat Z_K\big]}_{\text{lower bound}} \;\le\; \log Z \;\le\;
# \underbrace{\mathbb{E}\big[\log \hat Z_K^{\text{cond}}\big]}_{\text{upper bound}},
# $$
#
# where the *conditional* sweep clamps one particle to an exact sample of σ through every
# step (and resamples the other $K-1$). Without resampling these are the IWAE lower and
# upper bounds. Both tighten as $K$ grows, and the gap at $K = 1$ is
# $\mathrm{KL}(q\|\sigma) + \mathrm{KL}(\sigma\|q)$ for the sampler's proposal $q$.
# The only extra ingredient is exact samples of σ, which many targets allow:
# rejection for classifiers (φ ≤ 1), joint sampling for infilling, enumeration for tiny models
# (`lmppl.evaluation.rejection_sample`, `joint_sample`, `enumeration_sample`).

# %%
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # a notebook-only tqdm notice
warnings.filterwarnings("ignore", category=FutureWarning)  # arviz 0.x announces its 1.0 API

import arviz as az  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402

import lmppl  # noqa: E402

# %% [markdown]
# ## Bounds on a tiny target, against the truth
#
# The target of notebooks 3 and 4 (five tokens of the table model, φ = sigmoid(2·#c − 6)),
# now with a deterministic site that counts the `c`'s. We compare importance sampling
# with twisted SMC using the partial twist $(\psi^*)^{1/2}$ of notebook 3.

# %%
tiny = lmppl.table_lm(3, context_length=12, seed=6)
C = tiny.tokenizer.encode("c", add_bos=False)[0]
T = 5


def many_c():
    s = numpyro.sample("s", lmppl.LM(tiny, "a", T, stop_at_eos=False))
    numpyro.factor("classifier", jax.nn.log_sigmoid(2.0 * jnp.sum(s == C) - 6.0))
    numpyro.deterministic("num_c", jnp.sum(s == C))


exact = lmppl.infer.Exact(many_c)
truth = exact.run()
log_z = float(truth.log_marginal)
half = lmppl.infer.ExactTwist(
    [0.5 * table for table in exact.optimal_twist().log_psi], tiny.vocab_size
)
exact_samples = lmppl.evaluation.enumeration_sample(many_c, jax.random.key(0), 64)
print(f"log Z = {log_z:.4f}; exact samples: {exact_samples.samples.shape}")

# %% [markdown]
# `log_z_bounds(program, backend, exact_samples, num_particles=[...], num_runs, key)` takes a
# backend as a function `(program, K) -> sampler`, runs `num_runs` lower and upper estimates
# per K (each batch of runs is one vmapped, compiled call), and returns a `BoundsTable` with
# 95% intervals. Tables of several methods add up with `+`.

# %%
table = lmppl.evaluation.log_z_bounds(
    many_c,
    lmppl.infer.ImportanceSampling,
    exact_samples,
    [1, 8, 64],
    16,
    jax.random.key(1),
    log_z=log_z,
) + lmppl.evaluation.log_z_bounds(
    many_c,
    lambda program, k: lmppl.infer.TwistedSMC(program, k, twists={"s": half}),
    exact_samples,
    [1, 8],
    16,
    jax.random.key(1),
    name="twisted SMC, ψ*^½",
    log_z=log_z,
)
print(table.to_markdown())

# %%
fig, ax = plt.subplots(figsize=(6, 4))
lmppl.plots.plot_bounds(table, ax=ax, title="Bounds on log Z, tiny target")
plt.show()

# %% [markdown]
# The lower bounds (solid) rise and the upper bounds (dashed) fall towards the exact $\log Z$
# (black) as K grows, and the better proposal brackets it more tightly at the same K. On a real
# model there is no black line, but the bracket itself tells how far from $\log Z$ we can be:
# `table.log_z_estimate()` is the midpoint of the tightest pair.
#
# ## KL divergences of a proposal
#
# With one particle the two bounds become expectations of $\log\tilde\sigma/q$, which gives
# both KL divergences of the proposal (Eq. 23 of the paper):
# $\mathrm{KL}(q\|\sigma) = \log Z - \mathbb{E}_q[\log\tilde\sigma/q]$ and
# $\mathrm{KL}(\sigma\|q) = \mathbb{E}_\sigma[\log\tilde\sigma/q] - \log Z$.
# For importance sampling $q = p_0$, and on the tiny model we can check the estimate
# against the enumeration:

# %%
kl = lmppl.evaluation.kl_estimates(
    many_c,
    lmppl.infer.ImportanceSampling,
    exact_samples,
    log_z,
    jax.random.key(2),
    num_samples=256,
    num_seeds=4,
)
print(kl.to_markdown("p0 (estimated)"))

log_phi = np.asarray(truth.log_potential)
p0 = np.exp(np.asarray(lmppl.LM(tiny, "a", T, stop_at_eos=False).log_prob(truth.samples["s"])))
print(
    f"exact: KL(p0‖σ) = {log_z - np.sum(p0 * log_phi):.3f}, "
    f"KL(σ‖p0) = {np.sum(np.asarray(truth.weights) * log_phi) - log_z:.3f}"
)

# %% [markdown]
# ## On a real model
#
# The same two calls measure samplers on real targets. `inference/bounds.py` does it for the
# paper's toxicity task on stories260K (`models/toxicity.py`: φ = p(offensive | s) from an
# offline classifier, exact samples by rejection) for SIS, SMC and twisted SMC up to K = 512;
# its table and figure are in
# [`inference/results/bounds_stories260k_small.md`](../inference/results/bounds_stories260k_small.md)
# (`python inference/bounds.py --small`, a few minutes on a laptop CPU). In outline:
#
# ```python
# from models import toxicity
# task = toxicity.classifier(num_tokens=10)              # program + its exact sampler
# exact = task.exact_samples(key, 64)                    # rejection from p0
# table = lmppl.evaluation.log_z_bounds(task.program, lmppl.infer.SMC, exact, [1, 8, 64, 512], 8, key)
# lmppl.plots.plot_bounds(table, path="bounds.png")
# ```
#
# ## ArviZ: particles as draws, runs as chains
#
# `result.to_arviz()` turns one run into an `arviz.InferenceData`: the `posterior` group holds
# every latent and deterministic site (the token ids with a `position` dimension),
# `log_potential` and each factor's value; `sample_stats` holds the log-weights, normalised
# `weight`s, `log_marginal`, and the ESS per step.

# %%
smc = lmppl.infer.SMC(many_c, num_particles=64)
idata = smc.run(jax.random.key(3)).to_arviz()
print(idata.posterior)
print(idata.sample_stats[["log_weight", "weight", "log_marginal", "ess"]])

# %% [markdown]
# The draws of one run are *weighted*, while ArviZ's summaries treat draws as equally
# weighted. `resample_key=` replaces them by equally weighted resamples, and
# `lmppl.diagnostics.runs_to_arviz` stacks independent runs as chains, so ArviZ's
# between-chain diagnostics ($\hat R$, ESS) compare runs:

# %%
runs = lmppl.diagnostics.run_many(smc, jax.random.key(4), 4)
idata = lmppl.diagnostics.runs_to_arviz(runs, resample_key=jax.random.key(5))
print(az.summary(idata, var_names=["num_c", "log_potential"], kind="stats"))
print(az.summary(idata, var_names=["num_c", "log_potential"], kind="diagnostics"))

exact_num_c = float(
    np.sum(np.asarray(truth.weights) * np.sum(np.asarray(truth.samples["s"]) == C, axis=1))
)
print(f"exact E_σ[num_c] = {exact_num_c:.3f}")

# %% [markdown]
# Any ArviZ plot works on it. The posterior of the number of `c`'s (all runs pooled),
# with the exact σ-expectation from the enumeration as the reference value:

# %%
ax = az.plot_posterior(
    idata, var_names=["num_c"], kind="hist", ref_val=round(exact_num_c, 3), figsize=(6, 3)
)
ax.set_title("num_c under σ: SMC draws (4 runs × 64) vs exact mean")
plt.show()

# %% [markdown]
# lmppl's own plots read the same object: the ESS per step of each run (from
# `sample_stats.ess`) and, for a single result, the weight histogram.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3))
lmppl.plots.plot_ess(idata, ax=axes[0])
lmppl.plots.plot_weights(runs[0], ax=axes[1])
plt.show()

# %% [markdown]
# ## Summary
#
# * `log_z_bounds` brackets $\log Z$ from both sides for any backend, given exact samples
#   of σ; `plot_bounds` draws the paper's bounds-vs-K figure; a tight bracket certifies the
#   sampler, a loose one says how much to distrust it.
# * `kl_estimates` gives both KL divergences of a proposal from the same ingredients.
# * `to_arviz` / `runs_to_arviz` expose results to the whole ArviZ toolbox.
