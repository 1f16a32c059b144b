"""A training process killed (SIGKILL) in the middle of writing a checkpoint resumes from the
last complete step and ends with the parameters of an uninterrupted run (issue #15)."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

import lmppl
from tests.fixtures import short

REPOSITORY = Path(__file__).resolve().parents[2]
OPTIONS = dict(num_particles=16, learning_rate=1e-2, progress=False)

# The child trains with a checkpoint every step; its third checkpoint write dies half-way
# (some bytes of the archive on disk, then SIGKILL: no Python cleanup, no rename).
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import jax, numpy as np
    import lmppl
    from tests.fixtures import short

    real_savez = np.savez
    calls = 0

    def dying_savez(handle, **arrays):
        global calls
        calls += 1
        if calls == 3:
            handle.write(b"PK\\x03\\x04 half of an archive")
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_savez(handle, **arrays)

    np.savez = dying_savez
    twist = lmppl.twists.MLPTwist(lmppl.infer.discover(short, (), {}).lm_site.model, 8)
    lmppl.twists.fit(short, twist, "ctl", num_steps=6, checkpoint_dir=sys.argv[1],
                     checkpoint_every=1, rng_key=jax.random.key(4), num_particles=16,
                     learning_rate=1e-2, progress=False)
    """
)


def make_twist():
    return lmppl.twists.MLPTwist(lmppl.infer.discover(short, (), {}).lm_site.model, 8)


@pytest.mark.slow
def test_sigkill_while_checkpointing_then_resume_matches_an_uninterrupted_run(tmp_path):
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)],
        cwd=REPOSITORY,
        env=environment,
        capture_output=True,
        timeout=600,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    complete = sorted(p.name for p in tmp_path.glob("step_*.npz"))
    assert complete == ["step_0000001.npz", "step_0000002.npz"]
    assert (tmp_path / ".step_0000003.npz.partial").is_file()  # the write that was killed

    key = jax.random.key(4)
    resumed, history = lmppl.twists.fit(
        short, make_twist(), "ctl", num_steps=6, checkpoint_dir=tmp_path, rng_key=key, **OPTIONS
    )
    straight, straight_history = lmppl.twists.fit(
        short, make_twist(), "ctl", num_steps=6, rng_key=key, **OPTIONS
    )
    assert history["step"] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(history["loss"], straight_history["loss"], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(straight.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
