"""access.toml's measured facts of one kernel series: ``[[measured]]`` tables, which correct an
entry on the vendor module and kernel series an access record measured (the measurement wins
there; the entry stays for the kernels its source describes), and the series a release is of.

>>> in_series("6.1.0-57-amd64", "6.1")
True
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

MEASURED_KEYS = frozenset({"name", "vendor", "kernel", "touches", "cite", "note", "returned"})


def in_series(kernel: str, series: str) -> bool:
    """Is release ``kernel`` (``6.1.0-57-amd64``) of the kernel series ``series`` (``6.1``)?"""
    return kernel == series or kernel.startswith((series + ".", series + "-"))


def on_series(by_key: dict[str, Any], vendor: str, kernel: str) -> Any:
    """The value of ``by_key`` (keys ``vendor@series``) for ``vendor`` on release ``kernel``, or None."""
    for key, value in by_key.items():
        v, _, series = key.partition("@")
        if v == vendor and in_series(kernel, series):
            return value
    return None


def apply_measured(functions: dict[str, Any], tables: list[dict], fail: Callable[[str, str], Exception]) -> None:
    """Attach each ``[[measured]]`` table to the FunctionAccess it corrects, in ``functions``
    (by name): its objects under ``measured["vendor@series"]``, the record it cites, and the
    callees that returned before an event (``returned``). ``fail(message, needle)`` makes the
    error that names the table's line."""
    for e in tables:
        name = e.get("name")
        needle = f'name = "{name}"'
        if name not in functions:
            raise fail(f"[[measured]] {name}: no [[function]] entry to correct", needle)
        returned = e.get("returned", {})
        if not all(isinstance(e.get(k), str) and e.get(k) for k in ("vendor", "kernel", "cite")) or \
                not isinstance(e.get("touches"), list) or not isinstance(returned, dict) or set(e) - MEASURED_KEYS:
            raise fail(f"[[measured]] {name}: needs vendor, kernel, touches and cite (the record), may have returned, "
                       "and no other key", needle)
        for callee in (c for cs in returned.values() for c in cs):
            if callee not in functions:
                raise fail(f"[[measured]] {name}: {callee}, returned before an event, has no [[function]] entry", needle)
        f, key = functions[name], f"{e['vendor']}@{e['kernel']}"
        functions[name] = dataclasses.replace(f, measured={**f.measured, key: tuple(e["touches"])}, measured_cite=e["cite"],
                                              returned={**f.returned, key: {k: tuple(v) for k, v in returned.items()}})


__all__ = ["apply_measured", "in_series", "on_series"]
