"""The `workbench` command line (usage and exit codes: `workbench.cli.main`)."""

from workbench.cli.main import build_parser, entry, main

__all__ = ["build_parser", "entry", "main"]
