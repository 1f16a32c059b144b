"""The ArviZ view of inference results (kept as an alias of :mod:`lmppl.infer.arviz`).

The view lives inside the inference layer, so that ``InferenceResult.to_arviz`` imports
nothing from a layer above it; this module keeps ``lmppl.diagnostics`` importable.
"""

from lmppl.infer.arviz import result_to_arviz, run_many, runs_to_arviz

__all__ = ["result_to_arviz", "run_many", "runs_to_arviz"]
