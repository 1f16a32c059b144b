"""The README's Python snippets run (issue #15: a snippet that raised went unnoticed).

The first runs as written, after defining the names it leaves to the reader; the second runs
on a small program with fewer steps and particles (the only edits are those numbers).
"""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpyro
import pytest

import lmppl

matplotlib.use("Agg")
README = Path(__file__).resolve().parents[1] / "README.md"
SMALLER = {
    "num_steps=300": "num_steps=3",
    "num_particles=256": "num_particles=16",
    "eval_every=50": "eval_every=3",
    "num_particles=[1, 8, 64]": "num_particles=[2, 8]",
    "num_runs=16": "num_runs=4",
    "rejection_sample(program, key, 64)": "rejection_sample(program, key, 8)",
}


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


@pytest.mark.slow
def test_the_first_snippet_runs_as_written():
    lm = lmppl.load("stories260k")
    namespace = {
        "ending_ids": jnp.asarray(
            lm.tokenizer.encode(
                " a little girl named Lily. She loved to play outside.", add_bos=False
            )[:10]
        ),
        "twist": lmppl.twists.MLPTwist(lm, hidden_size=8),
        "tiny_program": None,
    }
    code = snippets()[0]
    exec(compile(code, "README.md", "exec"), namespace)
    result = namespace["result"]
    assert result.samples["story"].shape == (256, 15)
    assert len(result.text("story")) == 256


@pytest.mark.slow
def test_the_twist_and_bounds_snippet_runs(tmp_path, monkeypatch):
    lm = lmppl.load("stories260k")

    def program():
        story = numpyro.sample(
            "story", lmppl.LM(lm, "Once upon a time", max_new_tokens=4, stop_at_eos=False)
        )
        numpyro.factor("short_words", -0.3 * jnp.sum(story > 300))

    code = snippets()[1]
    for before, after in SMALLER.items():
        assert before in code, before
        code = code.replace(before, after)
    monkeypatch.chdir(tmp_path)
    namespace = {"program": program, "lm": lm, "key": jax.random.key(0), "jax": jax}
    namespace["lmppl"] = lmppl
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "bounds.png").stat().st_size > 0
    assert namespace["table"].rows and namespace["kl"] is not None


@pytest.mark.slow
def test_the_chat_prompt_snippet_runs_as_written():
    code = next(snippet for snippet in snippets() if "apply_chat_template" in snippet)
    namespace = {"lmppl": lmppl}
    exec(compile(code, "README.md", "exec"), namespace)
    lm, ids = namespace["lm"], namespace["ids"]
    assert lm.dtype == jnp.bfloat16
    expected = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nWrite a one-line review of a film you liked."
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert lm.tokenizer.decode(ids, skip_special_tokens=False) == expected
    assert ids == lm.tokenizer.encode(expected, add_bos=False)
    reply = lmppl.generate(lm, ids, max_new_tokens=8, temperature=0)
    assert reply.texts[0].strip()  # the bfloat16 model answers in words
