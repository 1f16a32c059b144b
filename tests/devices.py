"""Run a test script in a subprocess that sees ``count`` virtual CPU devices.

JAX fixes its device count when it starts, so multi-device tests run their checks in a
fresh interpreter with ``--xla_force_host_platform_device_count``; the script prints a
marker line when every check passed.
"""

from __future__ import annotations

import os
import subprocess
import sys

__all__ = ["run_on_virtual_devices"]


def run_on_virtual_devices(script: str, count: int, marker: str, timeout: int = 300) -> str:
    """Run ``script`` with ``count`` CPU devices; assert it exits 0 and prints ``marker``.

    Returns its standard output.
    """
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={count}",
        JAX_PLATFORMS="cpu",
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert marker in done.stdout, done.stdout[-3000:]
    return done.stdout
