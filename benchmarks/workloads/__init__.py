"""One small module per system; each runs one (kind, n) workload in its own process.

Run as ``python -m workloads.<module> <kind> <n>`` with ``benchmarks/`` as the
working directory; each prints exactly one JSON line on stdout (see ``common``).
"""
