"""Benchmarks of dareflow (scripts, not timed tests).

``python -m benchmarks.merge_vs_mergekit`` merges a synthetic Llama family with
dareflow and with mergekit (installed in its own venv under ``.bench/``), alternating
runs, and prints wall time, CPU time, peak memory and the IO floor per merge.
"""
