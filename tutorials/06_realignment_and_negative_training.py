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
# # 6. Decoding-time realignment and targeted negative training
#
# Two neighbouring methods change *which* distribution we sample, and both are targets
# lmppl's samplers can reach exactly.
#
# **DeRa** (Liu et al. 2024) mixes a reference model $\pi_{\text{ref}}$ and an aligned model
# $\pi_{\text{al}}$ (fine-tuned from it with a KL penalty of strength β) at a strength λ,
# without retraining. The aligned model at β/λ would be the sequence-level geometric mixture
#
# $$
# \sigma_\lambda(s) \;=\; \frac{\pi_{\text{ref}}(s)^{1-\lambda}\,\pi_{\text{al}}(s)^{\lambda}}{Z_\lambda},
# $$
#
# and the paper approximates it token by token:
# $\pi_\lambda(v \mid s_{<t}) = \operatorname{softmax}\big(\lambda h_{\text{al}} + (1-\lambda) h_{\text{ref}}\big)(v)$.
# `lmppl.realign(ref, aligned, λ)` is that token-level model, a drop-in language model;
# `mode="global"` is the exact $\sigma_\lambda$, an *unnormalised* target that SMC samples
# exactly (its per-step increment is $\log\sum_v e^{m_t(v)}$ with $m_t$ the mixed log-probabilities).
#
# **TNT** (Zhang et al. 2024) removes an unwanted behaviour with the *minimal* change of an old
# model $p_o$: $\;p_{\text{new}}(s) \propto p_o(s)\,1[s \text{ shows no unwanted behaviour}]$,
# learned token by token from annotated generations of $p_o$ (`lmppl.tnt`).

# %%
import itertools
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # a notebook-only tqdm notice

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
from jax.scipy.special import logsumexp  # noqa: E402

import lmppl  # noqa: E402
from lmppl import tnt  # noqa: E402

# %% [markdown]
# ## DeRa on two tiny models, exactly
#
# Two table models over the same vocabulary (`<s> </s> a b c`) play the reference and the
# aligned model. With four new tokens after the prompt `ab` there are $5^4 = 625$ sequences.

# %%
ref = lmppl.table_lm(3, context_length=12, seed=11)
aligned = lmppl.table_lm(3, context_length=12, seed=12, scale=1.5)
PROMPT, T = "ab", 4
every = jnp.asarray(list(itertools.product(range(ref.vocab_size), repeat=T)), jnp.int32)

token_mode = lmppl.realign(ref, aligned, 0.5)
global_mode = lmppl.realign(ref, aligned, 0.5, mode="global")
print(token_mode)
print(global_mode, " locally normalised:", global_mode.locally_normalised)

# %% [markdown]
# λ = 0 is the reference and λ = 1 the aligned model, in both modes:

# %%
for lam in (0.0, 1.0):
    r = lmppl.realign(ref, aligned, lam)
    same = lmppl.LM(r, PROMPT, T, stop_at_eos=False).log_prob(every)
    endpoint = lmppl.LM(ref if lam == 0 else aligned, PROMPT, T, stop_at_eos=False).log_prob(every)
    print(
        f"λ = {lam}: max |log π_λ − log π_endpoint| = {float(jnp.max(jnp.abs(same - endpoint))):.2e}"
    )

# %% [markdown]
# ### A λ sweep in one `vmap`
#
# λ is a float32 leaf of the realigned model's parameters, so `with_lam` swaps it without
# rebuilding anything, and a whole sweep of `log_prob` over all 625 sequences is one `vmap`.
# In global mode `log_prob` is the unnormalised $\log\tilde\sigma_\lambda(s) = (1-\lambda)\log\pi_{\text{ref}}(s) + \lambda\log\pi_{\text{al}}(s)$,
# so $\log Z_\lambda$ is its `logsumexp`.

# %%
lams = jnp.linspace(-0.5, 2.5, 13)


def sweep(model):
    def at(lam):
        params = model.with_lam(model.params, lam)
        return lmppl.LM(model, PROMPT, T, stop_at_eos=False, params=params).log_prob(every)

    return jax.vmap(at)(lams)  # [len(lams), 625]


log_token = sweep(token_mode)  # log π_λ(s), normalised
log_global = sweep(global_mode)  # log σ̃_λ(s)
log_z = logsumexp(log_global, axis=1)
sigma = jnp.exp(log_global - log_z[:, None])
tv = 0.5 * jnp.sum(jnp.abs(sigma - jnp.exp(log_token)), axis=1)
num_c = jnp.sum(every == 4, axis=1)

fig, axes = plt.subplots(1, 3, figsize=(13, 3))
axes[0].plot(lams, log_z, marker="o")
axes[0].set(xlabel="λ", title="log Z_λ of the geometric mixture")
axes[1].plot(lams, tv, marker="o")
axes[1].set(xlabel="λ", title="TV(token-level π_λ, exact σ_λ)")
axes[2].plot(lams, jnp.exp(log_token) @ num_c, marker="o", label="token mode")
axes[2].plot(lams, sigma @ num_c, marker="s", label="global (exact)")
axes[2].set(xlabel="λ", title="expected number of c's")
axes[2].legend()
for ax in axes:
    ax.axvline(0, color="grey", linewidth=0.6)
    ax.axvline(1, color="grey", linewidth=0.6)
plt.show()

# %% [markdown]
# * $\log Z_\lambda \le 0$ between the endpoints (Hölder's inequality) and grows when λ
#   extrapolates beyond them;
# * the token-level approximation is exact at λ ∈ {0, 1} and departs from $\sigma_\lambda$ in
#   between and, increasingly, outside;
# * in this example the two disagree most about the behaviour itself when λ extrapolates.
#
# ### The global mode by SMC, against `Exact`
#
# A program over the global-mode model is an ordinary program: `Exact` enumerates
# $\tilde\sigma_\lambda$, and SMC proposes from the token-level law and weights by the
# per-step normaliser, so $\hat Z$ is unbiased for $Z_\lambda$. At λ = 2 (extrapolation):

# %%
extrapolated = lmppl.realign(ref, aligned, 2.0, mode="global")


def dera():
    numpyro.sample("s", lmppl.LM(extrapolated, PROMPT, T, stop_at_eos=False))


exact = lmppl.infer.Exact(dera).run()
log_z_2 = float(exact.log_marginal)
estimates = np.asarray(lmppl.infer.SMC(dera, 16).log_marginals(jax.random.key(0), 200))
print(f"exact log Z_2 = {log_z_2:.4f}")
print(
    f"SMC, N = 16, 200 runs: mean log Ẑ = {estimates.mean():.4f} (± {estimates.std():.3f}),"
    f" log mean Ẑ = {np.log(np.mean(np.exp(estimates))):.4f}"
)

result = lmppl.infer.SMC(dera, 2048).run(jax.random.key(1))
smc_mass = {}
for row, w in zip(
    np.asarray(result.samples["s"]).tolist(), np.asarray(result.weights), strict=True
):
    smc_mass[tuple(row)] = smc_mass.get(tuple(row), 0.0) + float(w)
token_2 = lmppl.LM(lmppl.realign(ref, aligned, 2.0), PROMPT, T, stop_at_eos=False)
print(f"\n{'sequence':10s} {'token π_2':>10s} {'exact σ_2':>10s} {'SMC (N=2048)':>13s}")
for i in np.argsort(-np.asarray(exact.weights))[:6]:
    s = exact.samples["s"][i]
    text = ref.tokenizer.decode(s, skip_special_tokens=False)
    p_token = float(jnp.exp(token_2.log_prob(s)))
    print(
        f"{text:10s} {p_token:10.3f} {float(exact.weights[i]):10.3f} {smc_mass.get(tuple(np.asarray(s).tolist()), 0.0):13.3f}"
    )

# %% [markdown]
# The weighted SMC particles reproduce $\sigma_2$, which the token-level model (the proposal
# alone) does not.
#
# ## TNT on stories260K: no more "Lily"
#
# stories260K names its heroine *Lily* (a single token) in a large share of its stories.
# Suppose that is the unwanted behaviour. TNT's recipe:
#
# 1. sample the old model's own stories and **annotate** the negative tokens (here every
#    *Lily* token: `tnt.from_detector`; `tnt.from_pairs` annotates from corrected versions);
# 2. at an annotated position $t$, the per-token target is the old next-token law with the
#    negative token removed, $p_{\text{new}}(v) \propto p_o(v)\,1[v \ne x_t]$ (`tnt.log_p_new`),
#    and $p_{\text{new}} = p_o$ everywhere else;
# 3. **train** a copy of the model towards $p_{\text{new}}$ with a per-token KL. TNFF uses the
#    forward KL $\mathrm{KL}(p_{\text{new}} \| p_\theta)$ at annotated tokens (weighted by α) and
#    $\mathrm{KL}(p_o \| p_\theta)$ at all others; TNRR, TNRF, TNFLL, TNRLL and the baselines UL
#    (unlikelihood) and NL are the other `loss=` choices.

# %%
lm = lmppl.load("stories260k")
STORY_PROMPT, STORY_T = "Once upon a time,", 16
EOS = lm.tokenizer.eos_token_id
LILY = lm.tokenizer.encode("Lily", add_bos=False)
old = lmppl.LM(lm, STORY_PROMPT, STORY_T)

stories = old.sample(jax.random.key(0), (64,))
annotations = tnt.from_detector(stories, LILY, eos_token_id=EOS)
print(
    f"{int(annotations.negative_rows.sum())}/64 stories say Lily "
    f"({annotations.num_annotated} annotated tokens)"
)
row = int(np.argmax(annotations.negative_rows))
position = int(np.argmax(annotations.mask[row]))
pieces = [lm.tokenizer.decode([int(v)]) for v in stories[row]]
print("".join(f"[{p}]" if t == position else p for t, p in enumerate(pieces)))

# %% [markdown]
# The old law and $p_{\text{new}}$ at that annotated position: *Lily*'s mass is removed and
# the rest renormalised, nothing else changes.

# %%
dataset = tnt.build_dataset(lm, STORY_PROMPT, stories, annotations)
old_lp = dataset.old_log_probs[row, position]  # log p_o(· | prefix), [V]
new_lp = tnt.log_p_new(old_lp, stories[row, position], True)
print(f"{'token':10s} {'p_o':>7s} {'p_new':>7s}")
for v in np.argsort(-np.asarray(old_lp))[:6]:
    name = repr(lm.tokenizer.decode([int(v)]))
    print(f"{name:10s} {float(jnp.exp(old_lp[v])):7.3f} {float(jnp.exp(new_lp[v])):7.3f}")

# %% [markdown]
# Train a copy with TNFF for a few steps (the old model stays frozen; `tnt.train` returns the
# new model and a history), then compare fresh stories of the old and the new model drawn
# with the same key: the prevalence of *Lily*, and BLEU against the old stories (100 means
# unchanged).

# %%
lm_new, history = tnt.train(
    lm,
    None,
    None,
    None,
    "tnff",
    dataset=dataset,
    num_steps=25,
    learning_rate=1e-4,
    alpha=10.0,
    batch_size=16,
    rng_key=jax.random.key(1),
    progress=False,
)
print(f"loss {history['loss'][0]:.3f} → {history['loss'][-1]:.3f}")

key = jax.random.key(2)
old_stories = old.sample(key, (128,))
new_stories = old.with_params(lm_new.params).sample(key, (128,))  # same compiled sampler
for name, tokens in (("old", old_stories), ("TNFF", new_stories)):
    print(
        f"{name:5s} prevalence of Lily {tnt.prevalence(tokens, LILY, eos_token_id=EOS):.3f}, "
        f"BLEU vs old {tnt.bleu_to_old(tokens, old_stories, eos_token_id=EOS):5.1f}"
    )
for a, b in list(zip(old_stories.tolist(), new_stories.tolist(), strict=True))[:3]:
    print("old: ", STORY_PROMPT + lm.tokenizer.decode(tnt.metrics.trim([a], EOS)[0]))
    print("new: ", STORY_PROMPT + lm.tokenizer.decode(tnt.metrics.trim([b], EOS)[0]))

# %% [markdown]
# ### The exact view: the minimal update by SMC
#
# The target TNT approximates, $\sigma(s) \propto p_o(s)\,1[\text{no Lily}]$, is an lmppl program
# (`tnt.minimal_update_program`: a `banned_tokens` factor). SMC samples it exactly, and its
# $\hat Z$ estimates $P_o(\text{no Lily})$, hence the old model's prevalence, without rejection:

# %%
minimal = tnt.estimate_minimal_update(
    lm, STORY_PROMPT, STORY_T, LILY, num_particles=64, num_runs=4, rng_key=jax.random.key(3)
)
print(f"prevalence of Lily under p_o: {minimal.prevalence:.3f} ± {minimal.prevalence_se:.3f} (SMC)")
print("prevalence in σ's samples:", tnt.prevalence(minimal.samples, LILY, eos_token_id=EOS))
for tokens in minimal.samples[:3]:
    print("   ", STORY_PROMPT + lm.tokenizer.decode(tnt.metrics.trim([tokens], EOS)[0]))

# %% [markdown]
# $\mathrm{KL}(\sigma\,\|\,p_\theta) = \mathbb{E}_\sigma[\log p_o(s) - \log p_\theta(s)] - \log Z$ measures
# how close a model is to the minimal update; we use the SMC draws as (approximately) exact
# σ samples. For the old model it is exactly $-\log Z$: σ is $p_o$ restricted to the
# Lily-free stories, and the old model's only fault is the mass $1 - Z$ it gives to Lily.

# %%
sigma_samples = minimal.samples
log_old = old.log_prob(sigma_samples)
for name, params in (("old", lm.params), ("TNFF", lm_new.params)):
    log_model = old.with_params(params).log_prob(sigma_samples)
    print(f"{name:5s} KL(σ ‖ p) ≈ {float(jnp.mean(log_old - log_model)) - minimal.log_z:.3f}")
print(f"−log Z = {-minimal.log_z:.3f}")

# %% [markdown]
# Twenty-five steps on 64 stories remove *Lily* but also perturb the other stories (paired
# BLEU ≈ 60), so the quick TNFF model is not yet closer to σ than the old one: the
# minimal update is about *how* the freed mass is redistributed. Comparing the losses on
# this axis takes more stories and steps: `python inference/tnt_stories260k.py --small`.

# %% [markdown]
# ## DeRa between the old and the TNT model
#
# The two methods compose: realign the old model (reference) with the TNT model
# ("aligned") and λ dials the removal of *Lily* up, or past the trained model by
# extrapolation. One realigned model and `with_lam` give every λ with one compiled sampler:

# %%
mixed = lmppl.realign(lm, lm_new, 0.0)
mixed_dist = lmppl.LM(mixed, STORY_PROMPT, STORY_T)
for lam in (0.0, 0.5, 1.0, 2.0):
    tokens = mixed_dist.with_params(mixed.with_lam(mixed.params, lam)).sample(key, (128,))
    print(
        f"λ = {lam:3.1f}: prevalence of Lily {tnt.prevalence(tokens, LILY, eos_token_id=EOS):.3f}, "
        f"BLEU vs old {tnt.bleu_to_old(tokens, old_stories, eos_token_id=EOS):5.1f}"
    )

# %% [markdown]
# ## Summary
#
# * `lmppl.realign(ref, aligned, λ)` is DeRa's token-level model, usable anywhere a model is;
#   `mode="global"` is the exact geometric mixture, sampled exactly (and its $Z_\lambda$
#   estimated) by the weighted backends; λ sweeps are a `with_lam` + `vmap` away.
# * `lmppl.tnt` annotates generations (`from_detector`, `from_pairs`), builds the per-token
#   target (`log_p_new`), trains (`train` with TNFF/TNRR/TNRF/TNFLL/TNRLL/UL/NL) and measures
#   (`prevalence`, `bleu_to_old`); its exact target is an ordinary lmppl program
#   (`minimal_update_program`, `estimate_minimal_update`).
# * `python inference/tnt_stories260k.py --small` runs the full comparison of TNT losses.
