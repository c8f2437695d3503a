"""Driver scripts (benchmarks, one-off reports); run as `python -m scripts.<name>`."""
