"""The model: loading (HF folder or hub id) and the batched, prefix-sharing scoring engine."""

from workbench.engine.models import LoadedModel, load_bridge, load_model
from workbench.engine.scoring import EngineConfig, Request, Scored, score_requests

__all__ = [
    "EngineConfig",
    "LoadedModel",
    "Request",
    "Scored",
    "load_bridge",
    "load_model",
    "score_requests",
]
