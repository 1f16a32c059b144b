"""Inference layer: the sequential-target compiler, resampling, IS / SMC / twisted SMC / exact,
and particle Gibbs (iterated conditional SMC) over any of the SMC family."""

from lmppl.infer.backends import SMC, ActiveParticles, ImportanceSampling, TwistedSMC
from lmppl.infer.exact import Exact, ExactTwist
from lmppl.infer.gibbs import ParticleGibbs, ParticleGibbsResult
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
    "ActiveParticles",
    "Exact",
    "ExactTwist",
    "ImportanceSampling",
    "InferenceResult",
    "ParticleGibbs",
    "ParticleGibbsResult",
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
