"""Interpretability: activations at named sites, probes, and what they say about the answer."""

from workbench.interp.activations import ActivationConfig, ActivationStore, capture_activations
from workbench.interp.probe_study import ProbeConfig, ProbeSpec, load_probe_study
from workbench.interp.probing import ProbeResult, run_probes
from workbench.interp.sites import Site, resolve_sites

__all__ = [
    "ActivationConfig",
    "ActivationStore",
    "ProbeConfig",
    "ProbeResult",
    "ProbeSpec",
    "Site",
    "capture_activations",
    "load_probe_study",
    "resolve_sites",
    "run_probes",
]
