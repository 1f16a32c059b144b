"""Inference layer: the sequential-target compiler, resampling, IS / SMC / twisted SMC / exact."""

from lmppl.infer.backends import SMC, ImportanceSampling, TwistedSMC
from lmppl.infer.exact import Exact, ExactTwist
from lmppl.infer.program import ProgramError, ProgramStructure, discover
from lmppl.infer.resampling import (
    RESAMPLERS,
    effective_sample_size,
    multinomial,
    normalized_weights,
    residual,
    stratified,
    systematic,
)
from lmppl.infer.result import InferenceResult
from lmppl.infer.twist import ParametricTwist, TwistInputs

__all__ = [
    "RESAMPLERS",
    "SMC",
    "Exact",
    "ExactTwist",
    "ImportanceSampling",
    "InferenceResult",
    "ParametricTwist",
    "ProgramError",
    "ProgramStructure",
    "TwistInputs",
    "TwistedSMC",
    "discover",
    "effective_sample_size",
    "multinomial",
    "normalized_weights",
    "residual",
    "stratified",
    "systematic",
]
