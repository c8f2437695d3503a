"""Study files and prompts: what is asked, of whom, and how it is rendered."""

from workbench.study.load import load_study, parse_study
from workbench.study.prompts import Prompt, render
from workbench.study.spans import Span, factor_spans
from workbench.study.spec import Cell, Factor, Question, Study

__all__ = [
    "Cell",
    "Factor",
    "Prompt",
    "Question",
    "Span",
    "Study",
    "factor_spans",
    "load_study",
    "parse_study",
    "render",
]
