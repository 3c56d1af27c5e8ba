"""The GPU suite (``benchmarks/gpu/run.sh``)."""
