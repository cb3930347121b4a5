"""``python -m dareflow.cli``: the ``dareflow`` command (what tests and benchmarks spawn)."""

from dareflow.cli import run

run()
