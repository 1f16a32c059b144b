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
# # 4. Learning twists
#
# Notebook 3 showed that twisted SMC with the optimal twist
# $\psi^*_t(s_{1:t}) = \mathbb{E}_{p_0}[\phi(s)\mid s_{1:t}]$ has zero variance, but ψ* needs an
# enumeration. For real models we *learn* $\psi^\theta_t$: a small network on the frozen base
# model's hidden state $h_t$ that outputs $\log\psi_{t+1}(s_{1:t}, v)$ for every vocabulary
# entry $v$ at once, so the twist-induced proposal $q(v) \propto p_0(v\mid s_{1:t})\,\psi_{t+1}(s_{1:t}, v)$
# costs one small matmul per step.
#
# **Contrastive twist learning** (CTL, Zhao et al. 2024) fits the intermediate targets
# $\pi_t \propto p_0\,\psi_t$ to the marginals $\sigma_t$ of σ by minimising
# $\sum_t \mathrm{KL}(\sigma_t \,\|\, \pi_t)$, whose gradient is a difference of two expectations:
#
# $$
# \nabla_\theta \mathcal{L} = -\sum_t \Big( \mathbb{E}_{\sigma}\big[\nabla_\theta \log\psi^\theta_t(s_{1:t})\big]
#   - \mathbb{E}_{\pi_t}\big[\nabla_\theta \log\psi^\theta_t(s_{1:t})\big] \Big).
# $$
#
# Positive samples (σ) and negative samples (each $\pi_t$) both come from one batch of
# sequential importance sampling with the current twist, reweighted (or the positives from
# exact samples of σ). Its minimiser is $\psi_t = c_t\,\psi^*_t$. The baselines of the paper
# are available too: `"rl"` (soft-Q least squares), `"sixo"`, `"fudge"`, `"dpg"`.
#
# `lmppl.twists.fit(program, twist, method, ...)` returns the trained twist and a history of
# `loss`, `ess` (of the SIS batch, as a fraction of N) and `log_marginal` per step.

# %%
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # a notebook-only tqdm notice

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402

import lmppl  # noqa: E402

# %% [markdown]
# ## A tiny target, learned exactly
#
# The target of notebook 3: five tokens of the tiny table model, and
# $\phi(s) = \operatorname{sigmoid}(2\cdot\#c(s) - 6)$. With 3125 sequences, `Exact` gives $\log Z$, the
# optimal twist and exact samples of σ to measure against.

# %%
tiny = lmppl.table_lm(3, context_length=12, seed=6)
C = tiny.tokenizer.encode("c", add_bos=False)[0]
T = 5


def many_c():
    s = numpyro.sample("s", lmppl.LM(tiny, "a", T, stop_at_eos=False))
    numpyro.factor("classifier", jax.nn.log_sigmoid(2.0 * jnp.sum(s == C) - 6.0))


exact = lmppl.infer.Exact(many_c)
truth = exact.run()
log_z = float(truth.log_marginal)
optimal = exact.optimal_twist()
exact_samples = lmppl.evaluation.enumeration_sample(many_c, jax.random.key(0), 400)
print(f"log Z = {log_z:.4f};", exact_samples.num_samples, "exact samples of σ")

# %% [markdown]
# Before training, every twist here starts at $\log\psi \equiv 0$: the proposal is $p_0$
# itself, and both KL divergences follow from the enumeration:
# $\mathrm{KL}(p_0\|\sigma) = \log Z - \mathbb{E}_{p_0}[\log\phi]$ and
# $\mathrm{KL}(\sigma\|p_0) = \mathbb{E}_\sigma[\log\phi] - \log Z$.

# %%
log_phi = np.asarray(truth.log_potential)
p0 = np.exp(np.asarray(lmppl.LM(tiny, "a", T, stop_at_eos=False).log_prob(truth.samples["s"])))
kl_before = (log_z - np.sum(p0 * log_phi), np.sum(np.asarray(truth.weights) * log_phi) - log_z)
print(f"untrained (q = p0): KL(q‖σ) = {kl_before[0]:.3f}, KL(σ‖q) = {kl_before[1]:.3f}")

# %% [markdown]
# `TabularTwist` has one free parameter per prefix ($\sum_t V^t$ of them), so it can represent
# ψ* exactly. We train it with CTL and, as a baseline, with the RL (soft-Q) loss, with the
# same budget: 150 steps of 64 particles.

# %%
histories, trained = {}, {}
for method in ("ctl", "rl"):
    twist = lmppl.twists.TabularTwist(tiny.vocab_size, T)
    trained[method], histories[method] = lmppl.twists.fit(
        many_c,
        twist,
        method,
        num_steps=150,
        num_particles=64,
        learning_rate=0.05,
        rng_key=jax.random.key(1),
        progress=False,
    )

fig, axes = plt.subplots(1, 2, figsize=(10, 3))
for method, history in histories.items():
    axes[0].plot(history["step"], history["loss"], label=method)
    axes[1].plot(history["step"], history["ess"], label=method)
axes[0].set(xlabel="step", ylabel="loss", title="training loss")
axes[1].set(
    xlabel="step", ylabel="ESS / N of the SIS batch", title="proposal quality during training"
)
axes[0].legend()
axes[1].legend()
plt.show()

# %% [markdown]
# `lmppl.evaluation.kl_estimates` measures a trained proposal in both directions (Zhao et al.
# 2024, Eq. 23): $\mathrm{KL}(q\|\sigma) = \log Z - \mathbb{E}_q[\log \tilde\sigma/q]$ from
# samples of $q$, and $\mathrm{KL}(\sigma\|q) = \mathbb{E}_\sigma[\log\tilde\sigma/q] - \log Z$
# from exact samples of σ, with 95% intervals over seeds.

# %%
print(f"{'twist':10s} {'KL(q‖σ)':>16s} {'KL(σ‖q)':>16s}")
print(f"{'none (p0)':10s} {kl_before[0]:16.3f} {kl_before[1]:16.3f}")
for method, twist in trained.items():
    kl = lmppl.evaluation.kl_estimates(
        many_c,
        lambda program, k, twist=twist: lmppl.infer.TwistedSMC(program, k, twists={"s": twist}),
        exact_samples,
        log_z,
        jax.random.key(2),
        num_samples=200,
        num_seeds=4,
    )
    print(f"{method:10s} {format(kl.kl_q_sigma, '.3f'):>16s} {format(kl.kl_sigma_q, '.3f'):>16s}")

# %% [markdown]
# CTL drives both divergences close to zero within the budget; RL moves more slowly on this
# target. Since CTL's minimiser is $c_t\,\psi^*_t$, the learned tables should match the optimal
# ones up to one constant per step. We compare them on the prefixes that σ actually visits
# (σ-marginal above 1%), after removing the mean difference per step:

# %%
sequences = np.asarray(truth.samples["s"])
sigma = np.asarray(truth.weights)
learned = [np.asarray(table) for table in trained["ctl"].log_psi()]
fig, ax = plt.subplots(figsize=(4.5, 4))
for t in range(1, T + 1):
    codes = (sequences[:, :t] * tiny.vocab_size ** np.arange(t)[::-1]).sum(axis=1)
    mass = np.bincount(codes, weights=sigma, minlength=tiny.vocab_size**t)
    seen = mass > 0.01
    difference = learned[t - 1][seen] - optimal.log_psi[t - 1][seen]
    shift = np.average(difference, weights=mass[seen])
    ax.scatter(optimal.log_psi[t - 1][seen], learned[t - 1][seen] - shift, s=12, label=f"t = {t}")
lims = ax.get_xlim()
ax.plot(lims, lims, color="black", linewidth=0.8)
ax.set(
    xlabel="log ψ*_t (exact)",
    ylabel="learned log ψ_t (shifted)",
    title="CTL learns ψ* up to a constant",
)
ax.legend(fontsize="small")
plt.show()

# %% [markdown]
# ## A real model: stories260K
#
# The same recipe on stories260K with an `MLPTwist` head (3 dense layers on the 64-wide
# hidden state; the last layer starts at zero, so the untrained twist is $p_0$). The target:
# six tokens after "Once upon a time, there was a", where a story with the word *happy*
# scores $\phi = \operatorname{sigmoid}(6\cdot\#\text{happy} - 6)$ (½ for one *happy*, 0.0025 for none).

# %%
lm = lmppl.load("stories260k")
HAPPY = lm.tokenizer.encode("happy", add_bos=False)[0]
PROMPT = "Once upon a time, there was a"


def happy_story():
    story = numpyro.sample(
        "story", lmppl.LM(lm, prompt=PROMPT, max_new_tokens=6, stop_at_eos=False)
    )
    numpyro.factor("happy", jax.nn.log_sigmoid(6.0 * jnp.sum(story == HAPPY) - 6.0))


def log_phi_of(tokens):
    return np.asarray(
        jax.nn.log_sigmoid(6.0 * jnp.sum(jnp.asarray(tokens) == HAPPY, axis=-1) - 6.0)
    )


# %% [markdown]
# For the KLs we need $\log Z$ and exact samples. φ ≤ 1, so rejection sampling from $p_0$ is
# exact (accept $s$ with probability φ(s)); its acceptance rate is $Z$ itself. A large
# importance-sampling run estimates $\log Z$ as well (notebook 5 brackets it with bounds).

# %%
reference = lmppl.evaluation.rejection_sample(happy_story, jax.random.key(0), 64, batch_size=512)
big = lmppl.infer.ImportanceSampling(happy_story, 4096).run(jax.random.key(5))
log_z = float(big.log_marginal)
print(
    f"acceptance rate {reference.acceptance_rate:.4f} (≈ Z);  IS with 4096 particles: log Ẑ = {log_z:.3f} (Z ≈ {np.exp(log_z):.4f})"
)
print("exact samples of σ:", [lm.tokenizer.decode(s) for s in reference.samples[:4]])

# KL of the untrained twist (q = p0): averages of log φ over p0 draws (the IS particles) and σ draws.
kl_before = (
    log_z - np.mean(log_phi_of(big.samples["story"])),
    np.mean(log_phi_of(reference.samples)) - log_z,
)

# %% [markdown]
# Not every exact sample says *happy*: φ = 0.0025 without it is small, but $p_0$ puts over
# 99% of its mass on such stories, so σ keeps about a third of its mass there.
#
# Train with CTL. Most SIS batches from $p_0$ contain no *happy* story at all, so we use 128
# particles per step to see a few positives early; as the twist improves, so does the batch.

# %%
twist = lmppl.twists.MLPTwist(lm, hidden_size=64)
happy_twist, history = lmppl.twists.fit(
    happy_story,
    twist,
    "ctl",
    num_steps=40,
    num_particles=128,
    learning_rate=1e-2,
    rng_key=jax.random.key(1),
    progress=False,
)

fig, axes = plt.subplots(1, 3, figsize=(13, 3))
axes[0].plot(history["step"], history["loss"])
axes[0].set(xlabel="step", title="CTL loss")
axes[1].plot(history["step"], history["ess"])
axes[1].set(xlabel="step", title="ESS / N of the SIS batch")
axes[2].plot(history["step"], history["log_marginal"], label="SIS log Ẑ (128 particles)")
axes[2].axhline(log_z, color="black", linewidth=0.8, label="IS log Ẑ (4096)")
axes[2].set(xlabel="step", title="log Ẑ")
axes[2].legend(fontsize="small")
plt.show()

# %%
kl = lmppl.evaluation.kl_estimates(
    happy_story,
    lambda program, k: lmppl.infer.TwistedSMC(program, k, twists={"story": happy_twist}),
    reference,
    log_z,
    jax.random.key(2),
    num_samples=64,
    num_seeds=4,
)
print(f"{'twist':10s} {'KL(q‖σ)':>16s} {'KL(σ‖q)':>16s}")
print(f"{'none (p0)':10s} {kl_before[0]:16.3f} {kl_before[1]:16.3f}")
print(f"{'CTL':10s} {format(kl.kl_q_sigma, '.3f'):>16s} {format(kl.kl_sigma_q, '.3f'):>16s}")

# %% [markdown]
# Forty steps already move the proposal a good part of the way towards σ (with $\log Z$ itself
# only estimated, these KLs carry its error too). Where did the mass go? The fraction of
# stories with *happy* under $p_0$, under σ (the exact samples), and under the learned
# proposal $q$ (draws of twisted SIS, i.e. `TwistedSMC` that never resamples):

# %%
proposal = lmppl.infer.TwistedSMC(
    happy_story, 256, twists={"story": happy_twist}, ess_threshold=None
)
draws = proposal.run(jax.random.key(3))


def share(tokens):
    return float(np.mean(np.any(np.asarray(tokens) == HAPPY, axis=-1)))


print(
    f"stories with 'happy':  p0 {share(big.samples['story']):.1%}   q {share(draws.samples['story']):.1%}"
    f"   σ {share(reference.samples):.1%}"
)
for text in [t for t in draws.text() if "happy" in t][:4]:
    print("   ", PROMPT + text)

# %% [markdown]
# A few dozen steps are a demonstration, not a converged twist: the recipes in `inference/`
# train for hundreds of steps (and `TransformerTwist` gives the twist its own copy of the
# network), and notebook 5 shows how to measure the resulting sampler.
#
# ## Summary
#
# * `lmppl.twists.fit(program, twist, "ctl" | "rl" | "sixo" | "fudge" | "dpg", ...)` trains a
#   `TabularTwist` (enumerable targets), `LinearTwist` / `MLPTwist` (heads on the frozen
#   model's hidden states) or `TransformerTwist`; pass `target_sampler=` to use exact σ
#   samples as CTL's positives, `checkpoint_dir=` to save and resume.
# * The trained twist goes straight into `TwistedSMC(program, N, twists={site: twist})`.
# * `kl_estimates` measures the proposal in both directions; notebook 5 adds bounds on
#   $\log Z$ that tell how good the whole sampler is.
