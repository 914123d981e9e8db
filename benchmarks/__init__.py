"""Benchmarks: each question has a folder with ``run.py`` and its measured ``results.{md,json}``.

Run from the repository root as modules, e.g. ``python -m benchmarks.overhead.run``; see
``benchmarks/README.md`` for every question, its command, runtime and headline result.
"""
