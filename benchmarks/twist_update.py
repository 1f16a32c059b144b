"""One twist-training update against one twisted-SMC sweep (issue 16: "one CTL update
≤ 2× one twisted sweep").

Model: a TinyStories-33M-sized GPT-Neo (hidden 768, 4 layers, 16 heads, vocabulary 50257 by
default) with random weights, an MLP twist head (width 128, 3 layers, last layer
perturbed off zero) and an on-device potential (no host scorer, so the numbers are the
training step's own). Timed in one process, interleaved, medians over ``--repeats``:

* ``twisted sweep``: ``TwistedSMC`` with K particles, T tokens, resampling at every step
  (the paper's setting), the baseline;
* ``update (columns)``: one jitted ``fit`` step of CTL as ``fit`` runs it: the sweeps
  record the base LM's hidden states and log p0, and the gradient reaches the twist only
  through the drawn tokens' output columns;
* ``update (full table)``: the same step with a CTL loss that declares
  ``token_gradient=False``, so the backward pass runs through the whole ``[K, T, V]``
  table (what every update did before the columns shortcut).

``--batch mixture`` (``fit``'s default: the SIS batch pooled with K p0 rollouts, two
sweeps per update) or ``proposal`` (the SIS batch alone, one sweep).

Run: ``python benchmarks/twist_update.py`` (prints a markdown table; ``--quick`` for a
tiny smoke run).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpyro
import optax
from common import environment_line, markdown_table, median, say, time_once

import lmppl
from lmppl.lm.random_init import random_lm
from lmppl.twists.losses import TwistLoss, get_loss
from lmppl.twists.training import build_train_step

__all__ = ["main"]


def build_model(vocab: int, hidden: int, layers: int, heads: int):
    symbols = "".join(chr(0x4E00 + i) for i in range(vocab - 2))  # one character per token
    return random_lm(
        "gpt_neo",
        symbols=symbols,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        context_length=64,
        scale=0.05,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--particles", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", choices=("mixture", "proposal"), default="mixture")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    options = parser.parse_args()
    hidden, layers, heads = 768, 4, 16
    if options.quick:
        options.vocab, options.particles, options.steps, options.repeats = 64, 4, 3, 1
        hidden, layers, heads = 32, 1, 2
    lm = build_model(options.vocab, hidden, layers, heads)
    prompt = jnp.asarray([0, *range(2, 10)], jnp.int32)

    def program():
        s = numpyro.sample("s", lmppl.LM(lm, prompt, options.steps))
        numpyro.factor("sevens", 0.5 * jnp.sum(s % 7 == 0))

    twist = lmppl.twists.MLPTwist(lm, 128)
    last = twist.params["layers"][-1]
    last["weight"] = 0.01 * jax.random.normal(jax.random.key(1), last["weight"].shape)
    ctl = get_loss("ctl")
    full_table = TwistLoss("ctl", ctl.needs, ctl.loss, token_gradient=False)
    optimizer = optax.adam(1e-3)
    key = jax.random.key(0)
    say(environment_line())
    say(
        f"GPT-Neo random init: vocab {options.vocab}, hidden {hidden}, {layers} layers; "
        f"K = {options.particles}, T = {options.steps}, batch = {options.batch}"
    )

    def update_timer(loss):
        step, model_params, arrays = build_train_step(
            program, twist, loss, optimizer, options.particles, (), {}, batch=options.batch
        )
        state = optimizer.init(twist.params)
        counter = iter(range(10**6))
        return lambda: step(
            twist.params, state, jax.random.fold_in(key, next(counter)), model_params, arrays
        )

    sampler = lmppl.infer.TwistedSMC(program, options.particles, {"s": twist}, ess_threshold=1.0)
    contenders = {
        "twisted sweep": lambda: sampler.run(key).log_marginal,
        "update (columns)": update_timer(ctl),
        "update (full table)": update_timer(full_table),
    }
    for name, run in contenders.items():
        say(f"compiling {name}: {time_once(run):.1f} s")
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(options.repeats):
        for name, run in contenders.items():
            times[name].append(time_once(run))
    sweep = median(times["twisted sweep"])
    rows = [
        [name, f"{median(values):.3f}", f"{median(values) / sweep:.2f}"]
        for name, values in times.items()
    ]
    say(markdown_table(["contender", "median s", "ratio to the twisted sweep"], rows))


if __name__ == "__main__":
    main()
