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
# # 1. A language model is a NumPyro distribution
#
# An autoregressive language model with next-token logits $h(\cdot)$ defines, for a prompt
# $c$ and a number of new tokens $T$, a distribution over token sequences
#
# $$
# p_0(s_{1:T} \mid c) \;=\; \prod_{t=1}^{T} \operatorname{softmax}\!\big(h(c, s_{<t}) / \tau\big)[s_t],
# $$
#
# with temperature $\tau$. In lmppl this is `lmppl.LM(lm, prompt, max_new_tokens)`: an
# ordinary NumPyro distribution with `sample` and `log_prob`, so it can be the first line of
# a probabilistic program, and every NumPyro handler (`seed`, `trace`, `condition`,
# `substitute`, `Predictive`, `log_density`) works on such programs.
#
# This notebook uses two models:
#
# * `lmppl.table_lm(3)`: a *tiny table model* whose vocabulary is `<s> </s> a b c` (5 tokens).
#   With 3 new tokens there are only $5^3 = 125$ sequences, so we can check everything
#   against exact enumeration;
# * `lmppl.load("stories260k")`: a real 260K-parameter Llama trained on TinyStories
#   (offline, loads in a second), for real text.

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
from numpyro import handlers  # noqa: E402
from numpyro.infer import Predictive  # noqa: E402
from numpyro.infer.util import log_density  # noqa: E402

import lmppl  # noqa: E402

# %% [markdown]
# ## A tiny model, exactly
#
# `table_lm` draws a random transition table: the next token depends on the previous token
# and the position only. Ids 0 and 1 are the beginning- and end-of-sequence tokens.

# %%
tiny = lmppl.table_lm(3, context_length=12, seed=1)
print(tiny)
print("pieces:", tiny.tokenizer.pieces)
print("'ab' encodes to", tiny.tokenizer.encode("ab"), "(BOS first)")

# %% [markdown]
# `lmppl.LM(tiny, prompt="a", max_new_tokens=3)` is the distribution of the next three tokens
# after the prompt `<s> a`. Its event shape is `(3,)`; `sample` returns int32 token ids and
# `log_prob` the teacher-forced log-probability. We first switch EOS handling off
# (`stop_at_eos=False`): `</s>` is then an ordinary token and every sequence has exactly
# three free tokens.

# %%
dist = lmppl.LM(tiny, prompt="a", max_new_tokens=3, stop_at_eos=False)
print("event shape", dist.event_shape, "batch shape", dist.batch_shape)

draws = dist.sample(jax.random.key(0), (6,))
for row, lp in zip(np.asarray(draws), np.asarray(dist.log_prob(draws)), strict=True):
    print(row, repr(tiny.tokenizer.decode(row, skip_special_tokens=False)), f"log p0 = {lp:.3f}")

# %% [markdown]
# Because $p_0$ is a normalised distribution over $V^T$, the probabilities of all
# $5^3 = 125$ sequences sum to one, and sample frequencies converge to them:

# %%
V, T = tiny.vocab_size, 3
every = jnp.asarray(list(itertools.product(range(V), repeat=T)), jnp.int32)
log_p = dist.log_prob(every)
print("log Σ_s p0(s) =", float(logsumexp(log_p)))

many = np.asarray(dist.sample(jax.random.key(1), (20_000,)))
codes = (many * V ** np.arange(T)[::-1]).sum(axis=1)
frequency = np.bincount(codes, minlength=V**T) / len(many)
probability = np.exp(np.asarray(log_p))

top = np.argsort(-probability)[:12]
labels = [tiny.tokenizer.decode(every[i], skip_special_tokens=False) for i in top]
fig, ax = plt.subplots(figsize=(8, 3))
x = np.arange(len(top))
ax.bar(x - 0.2, probability[top], width=0.4, label="exact $p_0(s)$")
ax.bar(x + 0.2, frequency[top], width=0.4, label="frequency in 20,000 samples")
ax.set_xticks(x, labels, rotation=45, fontsize=8)
ax.set_ylabel("probability")
ax.set_title("The 12 most likely sequences of the tiny model")
ax.legend()
plt.show()

# %% [markdown]
# The table model is not a toy of the interface: `lmppl.random_lm` builds a real tiny
# transformer (Llama, GPT-2 or GPT-Neo, random weights, KV cache) over the same vocabulary,
# and everything in these notebooks runs on it unchanged, e.g. the normalisation check:

# %%
llama = lmppl.random_lm("llama", symbols=3, seed=0)
print(llama)
print(
    "log Σ_s p0(s) =", float(logsumexp(lmppl.LM(llama, "a", T, stop_at_eos=False).log_prob(every)))
)

# %% [markdown]
# ## Prompts: text, token ids, batches, and `lmppl.concat`
#
# A text prompt is encoded with the model's own BOS convention; a list or array of token ids
# is used *exactly as given* (no BOS added). These two are the same distribution:

# %%
by_text = lmppl.LM(tiny, "ab", 2, stop_at_eos=False)
by_ids = lmppl.LM(tiny, [0, 2, 3], 2, stop_at_eos=False)
value = jnp.array([4, 2])
print("text prompt:", by_text.prompt_tokens, " ids prompt:", by_ids.prompt_tokens)
print("log p0 equal:", float(by_text.log_prob(value)), float(by_ids.log_prob(value)))

# %% [markdown]
# A batch of prompts `[B, P]` gives a batched distribution (batch shape `(B,)`):

# %%
batched = lmppl.LM(tiny, jnp.array([[0, 2], [0, 4]]), 2, stop_at_eos=False)
print(
    "batch shape", batched.batch_shape, "→ samples", batched.sample(jax.random.key(2), (3,)).shape
)

# %% [markdown]
# `lmppl.concat(...)` joins text, ids and *sampled* sequences into a prompt. This is how a
# second LM site continues the first one inside a program (see infilling in notebook 2).
# Everything from the first EOS of a sampled part on is padding and is dropped.

# %%
eos = tiny.tokenizer.eos_token_id
story = jnp.array([2, eos, eos])  # "a" then EOS padding
joined = lmppl.LM(tiny, lmppl.concat("a", story, "b"), 1)
print(lmppl.concat("a", story, "b"))
print("resolved prompt:", joined.prompt_tokens[: int(joined.prompt_length)], "= <s> a a b")

# %% [markdown]
# ## End of sequence
#
# With the default `stop_at_eos=True` a sequence *ends* at its first EOS: the positions after
# it are padding (EOS again), they contribute nothing to `log_prob`, and a sequence with
# any other token after its first EOS has probability zero. So `[a, </s>, </s>]` with
# `max_new_tokens=3` has the probability of `[a, </s>]` with `max_new_tokens=2`.

# %%
eos_dist = lmppl.LM(tiny, "a", 3)  # stop_at_eos=True
print("log p0(a </s> </s>) =", float(eos_dist.log_prob(jnp.array([2, eos, eos]))))
print("log p0(a </s>)      =", float(lmppl.LM(tiny, "a", 2).log_prob(jnp.array([2, eos]))))
print("log p0(a </s> b)    =", float(eos_dist.log_prob(jnp.array([2, eos, 3]))))
print("samples (rows stop at </s>):")
print(np.asarray(eos_dist.sample(jax.random.key(3), (6,))))
print("still normalised: log Σ p0 =", float(logsumexp(eos_dist.log_prob(every))))

# %% [markdown]
# ## A real model: stories260K
#
# `lmppl.load` reads a checkpoint (here llama2.c's stories260K and its 512-piece tokenizer).
# `lmppl.generate` is plain batched sampling: the prompt is prefilled once into a KV cache
# and all rows decode together in one compiled scan. `temperature=0` is greedy decoding.

# %%
lm = lmppl.load("stories260k")
print(lm)

out = lmppl.generate(
    lm, "Once upon a time", num_samples=4, max_new_tokens=24, rng_key=jax.random.key(0)
)
for text, lp in zip(out.texts, np.asarray(out.log_probs), strict=True):
    print(f"[{lp:7.2f}] Once upon a time{text}")

greedy = lmppl.generate(lm, "Once upon a time", max_new_tokens=24, temperature=0)
print("greedy:   Once upon a time" + greedy.texts[0])

# %% [markdown]
# The temperature reshapes $p_0$: $\tau < 1$ concentrates the mass on likely continuations,
# $\tau > 1$ flattens it. On the tiny model we can see the whole distribution: the 125
# sequence probabilities, sorted, at three temperatures, and their entropy.

# %%
fig, ax = plt.subplots(figsize=(6, 3))
for tau in (0.5, 1.0, 2.0):
    log_p_tau = np.asarray(
        lmppl.LM(tiny, "a", 3, temperature=tau, stop_at_eos=False).log_prob(every)
    )
    entropy = -np.sum(np.exp(log_p_tau) * log_p_tau)
    ax.plot(
        np.sort(np.exp(log_p_tau))[::-1], marker=".", label=f"τ = {tau}: entropy {entropy:.2f} nats"
    )
ax.set_yscale("log")
ax.set_xlabel("sequence rank")
ax.set_ylabel("p0(s)")
ax.legend()
plt.show()

# %% [markdown]
# ## Programs: plain NumPyro works
#
# A program is a Python function with `numpyro.sample` sites. Here a story, and a
# deterministic site that counts its tokens before EOS.


# %%
def story_program(prompt="Once upon a time"):
    story = numpyro.sample("story", lmppl.LM(lm, prompt=prompt, max_new_tokens=16))
    numpyro.deterministic("length", jnp.sum(jnp.cumsum(story == lm.tokenizer.eos_token_id) == 0))
    return story


# %% [markdown]
# `handlers.seed` + `handlers.trace` run it once and record every site:

# %%
trace = handlers.trace(handlers.seed(story_program, 0)).get_trace()
for name, site in trace.items():
    print(f"{name:7s} {site['type']:13s} value shape {tuple(np.shape(site['value']))}")
print(lm.tokenizer.decode(trace["story"]["value"]))

# %% [markdown]
# `Predictive` draws forward samples of the whole program (vectorised over samples):

# %%
draws = Predictive(story_program, num_samples=5)(jax.random.key(5))
for tokens, length in zip(np.asarray(draws["story"]), np.asarray(draws["length"]), strict=True):
    print(f"{length:2d} tokens:", lm.tokenizer.decode(tokens[:length]))

# %% [markdown]
# `log_density` evaluates the joint log-density of a program at given site values, which
# here is just $\log p_0(s)$; `handlers.condition` fixes a site to a value.

# %%
fixed = draws["story"][0]
joint, _ = log_density(story_program, (), {}, {"story": fixed})
print("log_density:", float(joint))
print("LM.log_prob: ", float(lmppl.LM(lm, "Once upon a time", 16).log_prob(fixed)))

conditioned = handlers.trace(handlers.seed(handlers.condition(story_program, {"story": fixed}), 1))
print(
    "conditioned value is fixed:", bool(jnp.all(conditioned.get_trace()["story"]["value"] == fixed))
)

# %% [markdown]
# ## Summary
#
# * `lmppl.LM(lm, prompt, T)` is $p_0(s_{1:T}\mid \text{prompt})$: `sample`, `log_prob`,
#   batch shapes, temperature, EOS as the end of a sequence (or an ordinary token).
# * Prompts are text, ids, batches of ids, or `lmppl.concat(...)` of those and sampled
#   sequences.
# * `lmppl.generate` is fast batched (or greedy) sampling.
# * Programs are ordinary NumPyro models. Notebook 2 adds potentials to them, and the
#   inference backends of notebook 3 sample the resulting targets.
