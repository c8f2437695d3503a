"""The model organism: a tiny model trained on a world with planted traits, and its truth."""

from workbench.organism.build import (
    OrganismConfig,
    OrganismQuality,
    attach_truth,
    build_organism,
    organism_config,
    organism_quality,
)

__all__ = [
    "OrganismConfig",
    "OrganismQuality",
    "attach_truth",
    "build_organism",
    "organism_config",
    "organism_quality",
]
