"""sdecor's microbenchmarks: ``python -m benchmarks`` (same as ``python -m sdecor bench``).

The harness, the shapes and the baselines live in the installed package (:mod:`sdecor.bench`);
results are written to ``benchmarks/results/``.
"""
