"""workbench: exact answer distributions, sampling and interpretability for LLM personas.

Data flows one way: study file -> prompts -> model -> answer distributions -> run folder.

    import workbench as wb
    study = wb.load_study("probes/example.yaml")
    lm = wb.load_model("path/to/model", dtype="float32", device="cpu")
    result = wb.compute_distributions(study, lm, out_dir="runs/example")
    result.distributions  # pandas DataFrame, one row per prompt x option
"""

from workbench.activations import ActivationConfig, ActivationStore, capture_activations
from workbench.distributions import DistributionConfig, DistributionResult, compute_distributions
from workbench.errors import ModelLoadError, StudyError, WorkbenchError
from workbench.models import LoadedModel, load_bridge, load_model
from workbench.probing import ProbeConfig, ProbeSpec, load_probe_study, run_probes
from workbench.study import Study, load_study

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
