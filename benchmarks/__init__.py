"""Benchmarks of tlora_diffusers: one module per concern, one shared timing harness (``harness``).

Run ``python benchmarks/bench.py --help``; results go to ``--out`` (default ``bench-out/``,
outside the tracked tree). ``benchmarks/results/`` holds the committed results, updated
only on purpose (``--out benchmarks/results``); ``python -m benchmarks.report --readme``
regenerates the README's performance table from them.
"""
