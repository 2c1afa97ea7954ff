"""Benchmark evaluation: local benchmark files (data), the scoring rules (answers), per-benchmark
scorers with their prompts (scorers), a torchmetrics metric for grouped scores (metrics) and the
generation loop that reports each score next to the attended visual KV entries (runner).
"""
