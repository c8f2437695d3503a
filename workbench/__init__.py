"""workbench: exact answer distributions, sampling and interpretability for LLM personas.

Data flows one way: study file -> prompts -> model -> answer distributions -> run folder.

    import workbench as wb
    study = wb.load_study("probes/example.yaml")
    lm = wb.load_model("path/to/model", dtype="float32", device="cpu")
    result = wb.compute_distributions(study, lm, out_dir="runs/example")
    result.distributions  # pandas DataFrame, one row per prompt x option
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workbench.engine.models import LoadedModel, load_bridge, load_model
    from workbench.errors import ModelLoadError, StudyError, WorkbenchError
    from workbench.interp.activations import (
        ActivationConfig,
        ActivationStore,
        capture_activations,
    )
    from workbench.interp.probe_study import ProbeConfig, ProbeSpec, load_probe_study
    from workbench.interp.probing import run_probes
    from workbench.measure.distributions import (
        DistributionConfig,
        DistributionResult,
        compute_distributions,
    )
    from workbench.study.load import load_study
    from workbench.study.spec import Study

# Names are imported on first use, so `workbench --help`, `validate` and `import
# workbench.errors` do not pay for torch and transformers (seconds) before they are needed.
_LAZY = {
    "LoadedModel": "workbench.engine.models",
    "load_bridge": "workbench.engine.models",
    "load_model": "workbench.engine.models",
    "ModelLoadError": "workbench.errors",
    "StudyError": "workbench.errors",
    "WorkbenchError": "workbench.errors",
    "ActivationConfig": "workbench.interp.activations",
    "ActivationStore": "workbench.interp.activations",
    "capture_activations": "workbench.interp.activations",
    "ProbeConfig": "workbench.interp.probe_study",
    "ProbeSpec": "workbench.interp.probe_study",
    "load_probe_study": "workbench.interp.probe_study",
    "run_probes": "workbench.interp.probing",
    "DistributionConfig": "workbench.measure.distributions",
    "DistributionResult": "workbench.measure.distributions",
    "compute_distributions": "workbench.measure.distributions",
    "load_study": "workbench.study.load",
    "Study": "workbench.study.spec",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'workbench' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__version__ = "0.1.0"

__all__ = [
    "ActivationConfig",
    "ActivationStore",
    "DistributionConfig",
    "DistributionResult",
    "LoadedModel",
    "ModelLoadError",
    "ProbeConfig",
    "ProbeSpec",
    "Study",
    "StudyError",
    "WorkbenchError",
    "capture_activations",
    "compute_distributions",
    "load_bridge",
    "load_model",
    "load_probe_study",
    "load_study",
    "run_probes",
]
