"""Printing and writing CLI results (samples with weights, JSON/netCDF files)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["check_output_path", "format_samples", "write_result"]


def check_output_path(path: Path, *, folder: bool = False) -> None:
    """Fail before any compute when ``path`` cannot be written: a file where a folder is
    needed (or the reverse), or an existing ancestor that is a file or not writable."""
    from lmppl.cli.errors import UsageError

    path = Path(path).expanduser()
    if path.exists() and path.is_dir() != folder:
        kind = "a folder" if path.is_dir() else "a file"
        raise UsageError(f"--out {path} is {kind}; expected {'a folder' if folder else 'a file'}")
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"--out {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"--out {path}: {ancestor} is not writable")


def _texts(result: Any, tokens: np.ndarray) -> list[str]:
    if result.tokenizer is None:
        return [" ".join(map(str, row)) for row in tokens.tolist()]
    try:
        return result.text()
    except (ValueError, KeyError):
        return [" ".join(map(str, row)) for row in tokens.tolist()]


def format_samples(result: Any, show: int = 5) -> list[str]:
    """Lines ``weight  ×copies  text`` for the ``show`` heaviest distinct sequences of
    ``result``'s LM site (copies: particles holding that sequence after resampling)."""
    tokens = np.asarray(result.samples[result.site])
    weights = np.asarray(result.weights, np.float64)
    texts = _texts(result, tokens)
    merged: dict[bytes, list] = {}
    for row, weight, text in zip(tokens, weights, texts, strict=True):
        entry = merged.setdefault(row.tobytes(), [0.0, 0, text])
        entry[0] += float(weight)
        entry[1] += 1
    ranked = sorted(merged.values(), key=lambda e: -e[0])
    lines = [
        f"top {min(show, len(ranked))} of {len(ranked)} distinct samples "
        "(normalised weight, particles):"
    ]
    for weight, copies, text in ranked[:show]:
        lines.append(f"  {weight:7.4f}  ×{copies:<4d} {text!r}")
    return lines


def _finite_or_none(values: Any) -> list:
    return [float(v) if math.isfinite(float(v)) else None for v in np.ravel(values)]


def write_result(path: Path, result: Any, header: dict[str, Any], resample_key: Any = None) -> None:
    """``.json``: the samples, texts and weights (``null`` = −∞); ``.nc``: ArviZ netCDF.

    ArviZ treats the draws of a netCDF file as equally weighted (``az.summary`` ignores
    weights), so with ``resample_key`` the ``.nc`` holds an equally weighted systematic
    resample of the particles (``sample_stats.particle`` names the source particle);
    without it, the weighted particles with their weights in ``sample_stats.weight``.
    The file's ``draws`` attribute says which.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".nc":
        idata = result.to_arviz(resample_key=resample_key)
        idata.to_netcdf(str(path))
        return
    tokens = np.asarray(result.samples[result.site])
    record = {
        **header,
        "site": result.site,
        "backend": result.backend,
        "model": result.model_name,
        "num_particles": result.num_particles,
        "log_marginal": _finite_or_none(result.log_marginal)[0],
        "ess": result.effective_sample_size if result.ess is not None else None,
        "samples": tokens.tolist(),
        "text": _texts(result, tokens),
        "log_weights": _finite_or_none(result.log_weights),
        "weights": [float(w) for w in np.asarray(result.weights)],
    }
    path.write_text(json.dumps(record, indent=1) + "\n")


def _out_prefix(text: str) -> Path:
    prefix = Path(text).expanduser()
    if prefix.suffix in (".png", ".csv", ".md"):
        prefix = prefix.with_suffix("")
    return prefix


def _with_suffix(prefix: Path, suffix: str) -> Path:
    return prefix.parent / (prefix.name + suffix)


# --------------------------------------------------------------------------- commands


def _key(seed: int):
    import jax

    return jax.random.key(seed)


def _print(*lines: str) -> None:
    for line in lines:
        print(line, flush=True)
