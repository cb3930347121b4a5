"""Benchmarks of dareflow (scripts, not timed tests).

``python -m benchmarks.merge_vs_mergekit`` merges a synthetic Llama family with
dareflow and with mergekit (installed in its own venv under ``.bench/``), alternating
runs, and prints wall time, CPU time, peak memory and the IO floor per merge.
``python -m benchmarks.mergekit_parity`` merges a corpus of mergekit recipes with both
tools on a tiny float32 family and checks that the outputs agree (README, "Parity with
mergekit").
"""
