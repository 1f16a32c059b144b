"""``log_z_bounds`` over four K: one padded compilation against one compilation per K.

The program is stories260K writing 16 tokens after "Once upon a time" with a cheap
potential ``log φ = log sigmoid(0.5 · #{t : s_t mod 5 = 0} − 2)``; the bounds use SMC
(multinomial, ESS threshold 0.5) at K = 4, 8, 16, 32 with 8 lower and 8 upper runs per K
and random token sequences as references (a timing run: the upper numbers are not bounds).
Both variants run in one process with JAX's persistent compilation cache off
(``LMPPL_COMPILATION_CACHE=0``); the padded one first, so any warm-up favours the other.
XLA compilations are counted with a ``jax.monitoring`` listener.

    LMPPL_STORIES260K=/path/to/stories260K python benchmarks/padded_bounds.py
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("LMPPL_COMPILATION_CACHE", "0")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpyro  # noqa: E402
from jax._src import monitoring  # noqa: E402

import lmppl  # noqa: E402
from lmppl import evaluation  # noqa: E402

STEPS = 16
KS = [4, 8, 16, 32]
RUNS = 8


def main() -> None:
    jax.config.update("jax_enable_compilation_cache", False)
    model = lmppl.load("stories260k")

    def program():
        s = numpyro.sample("s", lmppl.LM(model, "Once upon a time", STEPS, stop_at_eos=False))
        numpyro.factor("phi", jax.nn.log_sigmoid(0.5 * jnp.sum(s % 5 == 0) - 2.0))

    references = jax.random.randint(jax.random.key(0), (RUNS, STEPS), 3, model.vocab_size)
    compiled: list[tuple[str, float]] = []

    def listen(event, seconds, **details):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append((details.get("fun_name", ""), seconds))

    monitoring.register_event_duration_secs_listener(listen)
    for padded in (True, False):
        compiled.clear()
        start = time.perf_counter()
        table = evaluation.log_z_bounds(
            program, lmppl.infer.SMC, references, KS, RUNS, jax.random.key(1), padded=padded
        )
        wall = time.perf_counter() - start
        sweeps = sum("_advance" in name for name, _ in compiled)
        seconds = sum(s for _, s in compiled)
        print(
            f"padded={padded}: {wall:.1f} s, sweep compilations {sweeps}, "
            f"all XLA compilations {len(compiled)} ({seconds:.1f} s)"
        )
        print(table.to_markdown())
    monitoring.unregister_event_duration_listener(listen)


if __name__ == "__main__":
    main()
