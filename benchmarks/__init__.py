"""Benchmarks, run from the repository root as `python -m benchmarks.<name>`.

Each writes its own section of docs/benchmarks.md.
"""
