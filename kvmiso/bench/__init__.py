"""KVM_RUN round trips per exit kind: the compiled loop (runloop.c via cffi), the Python twin,
the floors, pyperf-style summaries (latency, stats), result files and ``compare``.

The names below load their module on first use, so ``kvmiso --help`` does not pay for them.
"""

from importlib import import_module

_EXPORTS = {
    "KINDS": "kinds", "BenchResult": "results", "Result": "results", "bench": "latency",
    "format_table": "table", "ResultFileError": "results", "compare": "compare", "load": "results",
    "LoopError": "runloop", "NotBuilt": "runloop", "Timings": "runloop", "compiled_loop": "runloop",
    "python_loop": "runloop",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
