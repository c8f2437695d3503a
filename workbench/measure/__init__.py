"""Measurements of what the model answers: logit distributions, sampled text and its parsing."""

from workbench.measure.answers import AnswerParser, Parsed
from workbench.measure.distributions import (
    DistributionConfig,
    DistributionResult,
    compute_distributions,
)
from workbench.measure.sampling import SamplingConfig, SamplingResult, compute_samples

__all__ = [
    "AnswerParser",
    "DistributionConfig",
    "DistributionResult",
    "Parsed",
    "SamplingConfig",
    "SamplingResult",
    "compute_distributions",
    "compute_samples",
]
