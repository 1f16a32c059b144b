"""Composite programs on stories260K: an observed LM scored per step, and a draft proposal.

Two measurements, each against a baseline timed in the same run (issue #13, items 3-4):

1. **Prompt intersection.** ``s ~ LM(lm, prompt_a, T)`` and
   ``numpyro.sample("also", LM(lm, prompt_b, T), obs=s)``: σ(s) ∝ p(s | a) p(s | b).
   SMC with the observed site scored per step (the default: its own KV cache, proposal
   ∝ p_a · p_b) against the same SMC scoring it once at the end (``observed_lms="at_end"``),
   at equal N: the spread of log Ẑ over runs, its mean, and the time per sweep.
2. **A draft model as proposal.** The draft is ``lmppl.lm.truncated(lm, k)`` (the first k
   of the 5 blocks) distilled to p0 for a few hundred Adam steps (KL(p0 ‖ draft) on p0's
   own samples, all of the draft's parameters). Target: ``s ~ LM(lm, prompt, T)`` with a
   factor rewarding a few joyful words. Plain SMC (proposal p0) against
   ``SMC(proposal=draft)`` at equal N; both against an importance-sampling reference.
   Unbiasedness: the mean of Ẑ / Ẑ_ref (Ẑ_ref: the importance-sampling mean) is 1 for
   every proposal, while E[log Ẑ] sits below log Z by about half the variance of log Ẑ.
   Cost per effective sample: sweep time × variance of log Ẑ (work-normalised variance,
   lower is better) and sweep time / final ESS.

    python benchmarks/composite.py            # ~3 min on 2 cores
    python benchmarks/composite.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import optax
from common import environment_line, load_lm, markdown_table, median, say, time_once

import lmppl
from lmppl.lm import truncated

__all__ = ["distil", "main"]

PROMPT_A = "Once upon a time, there was a little girl"
PROMPT_B = "The dog was very happy. He"
JOY_WORDS = (" happy", " smiled", " fun", " laughed", " play", " friends")


def _log_marginals(sampler, runs: int, seed: int) -> np.ndarray:
    return np.asarray(sampler.log_marginals(jax.random.key(seed), runs), np.float64)


def _sweep_seconds(sampler, repeats: int) -> float:
    jax.block_until_ready(sampler.run(jax.random.key(0)).log_marginal)  # compile
    return median(
        [
            time_once(lambda r=r: sampler.run(jax.random.key(r + 1)).log_marginal)
            for r in range(repeats)
        ]
    )


def _mean_se(values: np.ndarray) -> str:
    return f"{values.mean():.3f} ± {values.std(ddof=1) / math.sqrt(len(values)):.3f}"


def intersection(lm, steps: int, particles: int, runs: int, repeats: int) -> str:
    def program():
        s = numpyro.sample("s", lmppl.LM(lm, PROMPT_A, steps))
        numpyro.sample("also", lmppl.LM(lm, PROMPT_B, steps), obs=s)

    rows = []
    for scoring in ("per_step", "at_end"):
        sampler = lmppl.infer.SMC(program, particles, observed_lms=scoring)
        estimates = _log_marginals(sampler, runs, seed=1)
        seconds = _sweep_seconds(sampler, repeats)
        rows.append(
            [
                scoring,
                particles,
                _mean_se(estimates),
                f"{estimates.std(ddof=1):.3f}",
                f"{seconds * 1e3:.0f}",
            ]
        )
        say(f"intersection {scoring}: {rows[-1]}")
    reference = lmppl.infer.ImportanceSampling(program, particles * 64, observed_lms="at_end")
    draws = _log_marginals(reference, max(runs // 4, 2), seed=2)
    rows.append(
        [
            f"IS, p0 proposal, scored at the end ({len(draws)} runs of {particles * 64})",
            particles * 64,
            _mean_se(draws),
            f"{draws.std(ddof=1):.3f}",
            "",
        ]
    )
    header = ["scoring of the observed LM", "N", "log Ẑ (mean ± se)", "sd of log Ẑ", "ms / sweep"]
    return markdown_table(header, rows)


def distil(lm, layers: int, *, steps: int, batch: int, length: int, seed: int = 0):
    """``truncated(lm, layers)`` with every parameter trained to minimise KL(p0 ‖ draft)
    on p0's own continuations of "Once upon a time"; returns it and the held-out
    per-token KL before and after."""
    draft = truncated(lm, layers)
    keys = jax.random.split(jax.random.key(seed), 3)  # 3: the stream RESULTS.md was made with
    prompt = lmppl.LM(lm, "Once upon a time", length)
    data = prompt.sample(keys[0], (batch * 8,))
    held_out = prompt.sample(keys[1], (batch,))
    width = int(prompt.prompt_length)

    def rows(tokens):
        head = jnp.broadcast_to(prompt.prompt_tokens[:width], (tokens.shape[0], width))
        return jnp.concatenate([head, tokens], axis=1)

    def log_probs(model, params, tokens):
        full = rows(tokens)
        cache = model.init_cache(full.shape[0], full.shape[1])
        logits = model.apply(params, full, cache).logits[:, width - 1 : -1]
        return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

    teacher = jax.jit(lambda tokens: log_probs(lm, lm.params, tokens))

    def kl(params, tokens, target):
        student = log_probs(draft, params, tokens)
        return jnp.mean(jnp.sum(jnp.exp(target) * (target - student), axis=-1))

    optimizer = optax.adam(3e-3)
    params = draft.params
    state = optimizer.init(params)

    @jax.jit
    def update(params, state, tokens, target):
        value, grads = jax.value_and_grad(kl)(params, tokens, target)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    held_target = teacher(held_out)
    before = float(jax.jit(kl)(params, held_out, held_target))
    for step in range(steps):
        tokens = data[(step * batch) % data.shape[0] :][:batch]
        params, state, _ = update(params, state, tokens, teacher(tokens))
    after = float(jax.jit(kl)(params, held_out, held_target))
    return draft.with_params(params, name=f"{draft.name} distilled"), before, after


def draft_proposal(lm, steps: int, particles: int, runs: int, repeats: int, distil_steps: int):
    joy = jnp.asarray([lm.tokenizer.encode(w, add_bos=False)[0] for w in JOY_WORDS])

    def program():
        s = numpyro.sample("s", lmppl.LM(lm, "Once upon a time", steps))
        numpyro.factor("joy", 1.5 * jnp.sum(jnp.isin(s, joy)))

    drafts = {}
    lines = []
    for layers in (2, 4):
        draft, before, after = distil(lm, layers, steps=distil_steps, batch=64, length=steps)
        drafts[layers] = draft
        lines.append(
            f"draft {layers}/5 blocks: held-out KL(p0 ‖ draft) per token {before:.3f} → "
            f"{after:.3f} nats after {distil_steps} distillation steps"
        )
        say(lines[-1])
    reference = lmppl.infer.ImportanceSampling(program, 4096)
    ref = _log_marginals(reference, max(runs // 4, 2), seed=3)
    rows = []
    samplers = {"p0 (plain SMC)": lmppl.infer.SMC(program, particles)}
    for layers, draft in drafts.items():
        samplers[f"draft, {layers}/5 blocks"] = lmppl.infer.SMC(program, particles, proposal=draft)
    base_cost = None
    for name, sampler in samplers.items():
        estimates = _log_marginals(sampler, runs, seed=4)
        seconds = _sweep_seconds(sampler, repeats)
        ess = float(sampler.run(jax.random.key(5)).ess[-1])
        ratios = np.exp(estimates - np.log(np.mean(np.exp(ref))))
        cost = seconds * estimates.var(ddof=1)
        base_cost = cost if base_cost is None else base_cost
        ratio = f"{cost / base_cost:.2f}" if base_cost > 0 else "— (p0's variance is 0)"
        rows.append(
            [
                name,
                particles,
                _mean_se(estimates),
                _mean_se(ratios),
                f"{estimates.std(ddof=1):.3f}",
                f"{seconds * 1e3:.0f}",
                f"{ess:.1f}",
                f"{seconds * 1e3 / ess:.2f}",
                ratio,
            ]
        )
        say(f"draft {name}: {rows[-1]}")
    rows.append(
        [f"IS reference ({4096 * len(ref)} draws)", 4096, _mean_se(ref), "1", "", "", "", "", ""]
    )
    header = [
        "proposal",
        "N",
        "log Ẑ (mean ± se)",
        "Ẑ / Ẑ_ref (mean ± se)",
        "sd of log Ẑ",
        "ms / sweep",
        "final ESS (one run)",
        "ms per effective sample",
        "work-normalised variance ratio (vs p0)",
    ]
    return "\n".join(lines) + "\n\n" + markdown_table(header, rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16, help="T, new tokens")
    parser.add_argument("--particles", type=int, default=64)
    parser.add_argument("--runs", type=int, default=64, help="runs per log Ẑ estimate")
    parser.add_argument("--repeats", type=int, default=5, help="timed sweeps (median)")
    parser.add_argument("--distil-steps", type=int, default=400)
    parser.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    options = parser.parse_args(argv)
    if options.quick:
        options.steps, options.particles, options.runs, options.repeats = 4, 8, 4, 1
        options.distil_steps = 5
    say(environment_line())
    lm = load_lm("stories260k")
    say("## Prompt intersection: per-step vs end-of-sequence scoring")
    say(intersection(lm, options.steps, options.particles, options.runs, options.repeats))
    say("## Draft proposal: ratio vs plain SMC")
    say(
        draft_proposal(
            lm,
            options.steps,
            options.particles,
            options.runs,
            options.repeats,
            options.distil_steps,
        )
    )


if __name__ == "__main__":
    main()
