"""The names benchmarks/likelihood.py imports from here, at their homes: measure.py (measuring and recording) and
report.py (the RESULTS.md pieces). Delete this file once likelihood.py imports them from there."""

from .measure import RESULTS_DIR, log, machine, write_json
from .report import table

__all__ = ["RESULTS_DIR", "log", "machine", "table", "write_json"]
