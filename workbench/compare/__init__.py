"""Comparisons: distance metrics, human survey data, survey-level metrics and the comparison of runs."""

from workbench.compare.comparison import CompareConfig, CompareResult, compare, load_run
from workbench.compare.human import HumanData, load_human

__all__ = [
    "CompareConfig",
    "CompareResult",
    "HumanData",
    "compare",
    "load_human",
    "load_run",
]
