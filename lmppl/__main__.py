"""``python -m lmppl``: the main job on the embedded default model (SmolLM2-135M).

Samples a few plain continuations of a prompt, then runs SMC on a small program whose
target σ(s) ∝ p0(s) · p(positive | s) steers the continuation towards a positive
sentiment (VADER, a host scorer that ships its lexicon), and prints the weighted
particles with the log-marginal estimate.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import numpyro

import lmppl
from lmppl import potentials

__all__ = ["main"]


def positive_sentiment_log_prob():
    """``texts -> log p(positive | text)`` from VADER's compound score (a logistic link)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()

    def score(texts: list[str]) -> np.ndarray:
        compound = np.array([analyzer.polarity_scores(t)["compound"] for t in texts])
        return -np.logaddexp(0.0, -6.0 * compound)  # log sigmoid(6 · compound)

    return score


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lmppl", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompt", default="My review of the new phone:")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--num-particles", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(argv)

    start = time.perf_counter()
    lm = lmppl.load(options.model)
    print(f"loaded {lm} in {time.perf_counter() - start:.1f}s")

    key_plain, key_smc = jax.random.split(jax.random.key(options.seed))
    plain = lmppl.generate(
        lm,
        options.prompt,
        num_samples=4,
        max_new_tokens=options.max_new_tokens,
        rng_key=key_plain,
    )
    print(f"\nplain samples from p0 after {options.prompt!r}:")
    for text in plain.texts:
        print(f"  {text!r}")

    score = positive_sentiment_log_prob()

    def positive_review():
        review = numpyro.sample(
            "review", lmppl.LM(lm, options.prompt, max_new_tokens=options.max_new_tokens)
        )
        numpyro.factor("positive", potentials.text(score, lm.tokenizer)(review))

    start = time.perf_counter()
    smc = lmppl.infer.SMC(positive_review, num_particles=options.num_particles)
    result = smc.run(key_smc)
    elapsed = time.perf_counter() - start
    print(
        f"\nSMC, {options.num_particles} particles, target p0(s)·p(positive|s): "
        f"log Ẑ = {float(result.log_marginal):.3f}, final ESS = {result.effective_sample_size:.1f} "
        f"({elapsed:.1f}s incl. compilation)"
    )
    order = np.argsort(-np.asarray(result.weights))
    texts = result.text()
    for i in order[:5]:
        print(f"  w={float(result.weights[i]):.3f}  {texts[i]!r}")


if __name__ == "__main__":
    main()
