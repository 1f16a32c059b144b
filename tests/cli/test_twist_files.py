"""Twist files that rebuild themselves (``lmppl.twists.save_twist`` / ``load_twist``),
what ``lmppl train-twist`` writes and ``--twist`` reads."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import lmppl
from lmppl import twists
from tests.fixtures import small_lm, table_lm

LM = small_lm()  # vocab 5, hidden 8


def randomised(twist, seed: int = 0):
    """The twist with every parameter redrawn (so a load that keeps the initial, zero
    last layer would be caught)."""
    leaves, treedef = jax.tree.flatten(twist.params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return twist.with_params(
        jax.tree.unflatten(
            treedef, [jax.random.normal(k, np.shape(x)) for k, x in zip(keys, leaves, strict=True)]
        )
    )


def assert_same_params(a, b):
    leaves_a, tree_a = jax.tree.flatten(a.params)
    leaves_b, tree_b = jax.tree.flatten(b.params)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(
    "make",
    [
        lambda: twists.LinearTwist(LM),
        lambda: twists.LinearTwist(LM, output="log_sigmoid", condition_length=2, condition_size=3),
        lambda: twists.MLPTwist(LM, 6, num_layers=4),
        lambda: twists.MLPTwist(LM, 5, condition_length=1),
        lambda: twists.TabularTwist(LM.vocab_size, 2, output="log_sigmoid"),
    ],
    ids=["linear", "linear-conditional", "mlp-4-layers", "mlp-conditional", "tabular"],
)
def test_a_saved_twist_is_rebuilt_from_the_model(tmp_path, make):
    twist = randomised(make())
    path = twists.save_twist(
        tmp_path / "t.npz", twist, lm=LM, step=7, history={"loss": [1.0, 0.5]}, metadata={"a": 1}
    )
    info = twists.read_twist_info(path)
    assert info["class"] == type(twist).__name__
    assert info["step"] == 7 and info["history"] == {"loss": [1.0, 0.5]}
    assert info["metadata"] == {"a": 1}
    assert info["model"] == {"name": LM.name, "vocab_size": 5, "hidden_size": 8}
    loaded = twists.load_twist(path, LM)
    assert type(loaded) is type(twist)
    assert loaded.output == twist.output
    assert_same_params(loaded, twist)
    assert twists.twist_spec(loaded) == twists.twist_spec(twist)
    # the same file still loads into a twist built by hand, and as a plain checkpoint
    assert_same_params(twists.load_twist(path, make()), twist)
    params, _, step, _ = twists.load_checkpoint(path, twist.params)
    assert step == 7


def test_transformer_twist_round_trip(tmp_path):
    lm = lmppl.random_lm("gpt2", symbols=3, hidden_size=8, num_heads=2, num_layers=1)
    twist = randomised(twists.TransformerTwist(lm, conditional=True))
    twists.save_twist(tmp_path / "t.npz", twist)  # the model is recorded from the twist
    assert twists.read_twist_info(tmp_path / "t.npz")["model"]["vocab_size"] == lm.vocab_size
    loaded = twists.load_twist(tmp_path / "t.npz", lm)
    assert loaded.conditional and loaded.lm is lm
    assert_same_params(loaded, twist)


def test_errors_are_one_line(tmp_path):
    path = twists.save_twist(tmp_path / "t.npz", twists.LinearTwist(LM), lm=LM)
    other = table_lm(4, context_length=12)
    with pytest.raises(
        ValueError, match=r"trained on table-5 \(vocab 5, hidden 8\), not on table-6"
    ):
        twists.load_twist(path, other)
    twists.save_checkpoint(tmp_path / "bare.npz", twists.LinearTwist(LM).params)
    with pytest.raises(ValueError, match="records no twist class"):
        twists.load_twist(tmp_path / "bare.npz", LM)
    with pytest.raises(FileNotFoundError, match="no twist file"):
        twists.load_twist(tmp_path / "none.npz", LM)
    with pytest.raises(TypeError, match="cannot record a twist of class"):
        twists.twist_spec(object())
    with pytest.raises(ValueError, match="unknown twist class 'Nope'"):
        twists.build_twist({"class": "Nope"}, LM)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="is not a twist file"):
        twists.read_twist_info(tmp_path / "junk.npz")
