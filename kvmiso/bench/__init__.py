"""KVM_RUN round trips per exit kind: the compiled loop (runloop.c via cffi), the Python twin,
the floors, pyperf-style summaries (latency, stats), result files and ``compare``."""

from .compare import ResultFileError, compare, load
from .latency import KINDS, BenchResult, Result, bench, format_table
from .runloop import LoopError, NotBuilt, Timings, compiled_loop, python_loop

__all__ = ["KINDS", "BenchResult", "LoopError", "NotBuilt", "Result", "ResultFileError", "Timings", "bench",
           "compare", "compiled_loop", "format_table", "load", "python_loop"]
