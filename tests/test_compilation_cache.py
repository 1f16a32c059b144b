"""The persistent compilation cache: where it lives, how it is turned off, and that a second
process loads a compiled sweep from it instead of compiling again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from lmppl.compilation_cache import cache_directory, enable_compilation_cache

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def jax_cache_settings():
    """Restore JAX's cache settings after a test changes them."""
    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_compilation_cache_max_size",
    )
    saved = {name: getattr(jax.config, name) for name in names}
    yield
    for name, value in saved.items():
        jax.config.update(name, value)


def test_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LMPPL_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_directory() == tmp_path / "mine"
    monkeypatch.delenv("LMPPL_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_directory() == tmp_path / "xdg" / "lmppl" / "jax"


def test_switched_off_by_the_environment(monkeypatch, tmp_path, jax_cache_settings):
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv("LMPPL_COMPILATION_CACHE", "0")
    assert enable_compilation_cache(tmp_path / "cache") is None
    assert jax.config.jax_compilation_cache_dir is None
    assert not (tmp_path / "cache").exists()


def test_threshold_follows_the_environment(monkeypatch, tmp_path, jax_cache_settings):
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv("LMPPL_CACHE_MIN_COMPILE_SECONDS", "0.125")
    assert enable_compilation_cache(tmp_path / "a") == tmp_path / "a"
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.125
    jax.config.update("jax_compilation_cache_dir", None)  # an explicit argument wins
    enable_compilation_cache(tmp_path / "b", min_compile_seconds=2.0)
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 2.0
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv("LMPPL_CACHE_MIN_COMPILE_SECONDS", "soon")
    with pytest.raises(ValueError, match="LMPPL_CACHE_MIN_COMPILE_SECONDS must be a non-neg"):
        enable_compilation_cache(tmp_path / "c")


def test_keeps_a_directory_the_user_set(monkeypatch, tmp_path, jax_cache_settings):
    monkeypatch.delenv("LMPPL_COMPILATION_CACHE", raising=False)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "theirs"))
    assert enable_compilation_cache(tmp_path / "ours") == tmp_path / "theirs"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "theirs")


def test_an_unusable_directory_turns_the_cache_off(monkeypatch, tmp_path, jax_cache_settings):
    monkeypatch.delenv("LMPPL_COMPILATION_CACHE", raising=False)
    jax.config.update("jax_compilation_cache_dir", None)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert enable_compilation_cache(blocker / "cache") is None
    assert jax.config.jax_compilation_cache_dir is None


SWEEP_SCRIPT = """
import json, sys, time
import jax, numpyro
import lmppl
from jax._src import monitoring

compiles = []
monitoring.register_event_duration_secs_listener(
    lambda event, seconds, **kw: compiles.append(seconds)
    if event == "/jax/core/compile/backend_compile_duration" else None
)
lmppl.enable_compilation_cache(sys.argv[1], min_compile_seconds=0.0)
lm = lmppl.random_lm(symbols=6, num_layers=1, seed=0)

def host_score(tokens):  # a host scorer, as text classifiers are
    return (tokens[..., 0] == 3).astype("float32")

def program():
    story = numpyro.sample("story", lmppl.LM(lm, prompt=[1, 2], max_new_tokens=3))
    score = jax.pure_callback(
        host_score, jax.ShapeDtypeStruct(story.shape[:-1], "float32"), story,
        vmap_method="expand_dims",
    )
    numpyro.factor("f", score)

result = lmppl.infer.SMC(program, 8).run(jax.random.key(0))
print(json.dumps({"log_z": float(result.log_marginal), "compile_seconds": sum(compiles)}))
"""


@pytest.mark.slow
def test_a_second_process_loads_the_compiled_sweep(tmp_path):
    """Same result from the cache, and the second process spends far less in XLA compiles.

    The program's potential is a host callback, which JAX never stores: the sweep's heavy
    half is compiled apart from it (``Sweep.advance``) so that it still is.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LMPPL_COMPILATION_CACHE": "1"}
    runs = []
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-c", SWEEP_SCRIPT, str(tmp_path / "cache")],
            capture_output=True,
            text=True,
            env=env,
            check=True,
            timeout=300,
        )
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert any((tmp_path / "cache").iterdir())
    assert runs[1]["log_z"] == runs[0]["log_z"]
    assert runs[1]["compile_seconds"] < 0.5 * runs[0]["compile_seconds"]
