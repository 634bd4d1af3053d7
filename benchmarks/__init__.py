"""Benchmarks that prove the savings and the efficiency, each as a ratio of figures measured side by side.

`python -m benchmarks` (or `make bench`) runs them, prints a table and records the figures in
docs/benchmarks.md under this machine's section. One module per benchmark, each with `run(session)`
returning a `benchmarks.report.BenchResult`; `benchmarks.session.BenchSession` holds what they share.
"""

from benchmarks.config import BENCHMARKS, RAY_FREE_BENCHMARKS

__all__ = ["BENCHMARKS", "RAY_FREE_BENCHMARKS"]
