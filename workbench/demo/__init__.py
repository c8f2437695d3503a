"""The demo: every stage of the workbench on the model organism, one report."""

from workbench.demo.pipeline import run_demo

__all__ = [
    "run_demo",
]
