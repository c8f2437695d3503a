"""Interpretability: activations at named sites, probes, and what they say about the answer."""

from workbench.interp.activations import ActivationConfig, ActivationStore, capture_activations
from workbench.interp.attribution import AttributionConfig, AttributionResult, attribute
from workbench.interp.directions import ProbeRun
from workbench.interp.effects import EffectsConfig, compute_effects
from workbench.interp.hooks import Edit, edit_sites, record_sites
from workbench.interp.mediation import MediateConfig, MediateResult, mediate
from workbench.interp.pairs import Pair, factor_pairs
from workbench.interp.patching import PatchConfig, PatchResult, patch_factor
from workbench.interp.probe_study import ProbeConfig, ProbeSpec, load_probe_study
from workbench.interp.probing import ProbeResult, run_probes
from workbench.interp.sites import Site, resolve_sites
from workbench.interp.steering import SteerConfig, SteerResult, steer

__all__ = [
    "ActivationConfig",
    "ActivationStore",
    "AttributionConfig",
    "AttributionResult",
    "Edit",
    "EffectsConfig",
    "MediateConfig",
    "MediateResult",
    "Pair",
    "PatchConfig",
    "PatchResult",
    "ProbeConfig",
    "ProbeResult",
    "ProbeRun",
    "ProbeSpec",
    "Site",
    "SteerConfig",
    "SteerResult",
    "attribute",
    "capture_activations",
    "compute_effects",
    "edit_sites",
    "factor_pairs",
    "load_probe_study",
    "mediate",
    "patch_factor",
    "record_sites",
    "resolve_sites",
    "run_probes",
    "steer",
]
