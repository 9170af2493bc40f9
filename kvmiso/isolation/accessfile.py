"""``access.toml`` read and checked: :func:`load_access_model` makes the :class:`AccessModel` of
:mod:`.access` from it, every entry's keys and shapes validated, every function it names given a
[[function]] entry, and an error naming the file's line where one is not.

>>> model = load_access_model()
>>> model.source == str(ACCESS_TOML), model.lookup("em_out.cold").touches
(True, ('emulate_ctxt', 'kernel_data'))
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .access import (BASES, ROLES, AccessModel, AccessModelError, EmulatedPath, ExitPath, FunctionAccess,
                     UntracedPath)
from .accessseries import apply_measured
from .tomlfile import TomlFileError, line_of, load_toml

ACCESS_TOML = Path(__file__).with_name("access.toml")
Fail = Callable[[str, str], AccessModelError]  # (message, text to find its line by) -> the error to raise


def load_access_model(path: str | Path = ACCESS_TOML) -> AccessModel:
    """Parse and validate an access model."""
    try:
        doc, text = load_toml(path, "access model")
    except TomlFileError as e:
        raise AccessModelError(str(e)) from None

    def fail(msg: str, needle: str) -> AccessModelError:
        line = line_of(text, needle)
        return AccessModelError(f"{path}:{line}: {msg}" if line else f"{path}: {msg}")

    functions: dict[str, FunctionAccess] = {}
    for e in doc.get("function", []):
        f = _function_entry(e, "name", text, fail)
        if f.name in functions:
            raise fail(f"{f.name} is described twice (line {functions[f.name].line})", f'"{f.name}"')
        functions[f.name] = f
    _check_callees(functions, fail)
    apply_measured(functions, doc.get("measured", []), fail)
    prefixes = [_function_entry(e, "prefix", text, fail) for e in doc.get("prefix", [])]
    imp = doc.get("implicit", {})
    emulated = {}
    for e in doc.get("emulated", []):
        fns = _known(functions, "emulated", ("opcodes", "functions"), f"emulated opcodes {e.get('opcodes')}", e, fail)
        for op in e["opcodes"]:
            emulated[op] = EmulatedPath(tuple(e["opcodes"]), fns, e["cite"])
    untraced = {}
    for e in doc.get("untraced", []):
        fns = _known(functions, "untraced", ("event", "functions"), f"untraced event {e.get('event')}", e, fail)
        untraced[e["event"]] = UntracedPath(e["event"], fns, e["cite"])
    derive = doc.get("derive", {})
    types = derive.get("types", {})
    if not isinstance(types, dict) or not all(isinstance(v, str) for v in types.values()):
        raise fail("[derive] types maps a struct name to an object name", "[derive")
    if types and not derive.get("cite"):
        raise fail("[derive] cites where its struct-to-object table was read (cite = ...)", "[derive")
    return AccessModel(functions, prefixes, tuple(imp.get("touches", ())), imp.get("cite", ""), str(path),
                       _exit_paths(doc.get("exit_path", []), functions, fail), emulated, untraced,
                       derive_types=types, derive_cite=derive.get("cite", ""))


def _function_entry(e: dict, key: str, text: str, fail: Fail) -> FunctionAccess:
    """A [[function]] (``key`` "name") or [[prefix]] (``key`` "prefix") entry, every key checked."""
    name = e.get(key)
    if not isinstance(name, str) or not name:
        raise fail(f"an entry needs {key}", f"[[{'function' if key == 'name' else 'prefix'}]]")
    needle = f'"{name}"'
    touches = e.get("touches", [])
    if not isinstance(touches, list) or not all(isinstance(t, str) for t in touches):
        raise fail(f"{name}: touches must be a list of object names", needle)
    role = e.get("role", "")
    if role not in ROLES:
        raise fail(f"{name}: unknown role {role!r} (one of {', '.join(r or '(none)' for r in ROLES)})", needle)
    cite = e.get("cite", "")
    if not isinstance(cite, str) or not cite.strip():
        raise fail(f"{name}: every entry cites the source it was read from (cite = ...)", needle)
    unknown = set(e) - {key, "touches", "role", "cite", "note", "when", "after", "before", "first", "basis",
                        "hidden_caller"}
    if unknown:
        raise fail(f"{name}: unknown key {sorted(unknown)[0]!r}", needle)
    basis = e.get("basis", "source")
    if basis not in BASES[:2]:
        raise fail(f"{name}: basis is 'source' or 'inference' (derived entries are made from BTF), not {basis!r}", needle)
    hidden = e.get("hidden_caller", {})
    if not isinstance(hidden, dict) or not all(isinstance(v, str) for v in hidden.values()):
        raise fail(f"{name}: hidden_caller maps a caller to the function a tail call hid", needle)
    vt = e.get("when", {})
    if not isinstance(vt, dict) or not all(isinstance(v, list) for v in vt.values()):
        raise fail(f"{name}: when maps a vendor module or CONFIG_ option to a list of objects", needle)
    after, before, first = e.get("after", {}), e.get("before", {}), e.get("first", {})
    if not isinstance(after, dict) or not all(isinstance(v, list) for v in after.values()):
        raise fail(f"{name}: after maps an event name to the callees that run after it", needle)
    if not isinstance(before, dict) or not all(isinstance(v, list) and set(v) <= set(touches)
                                               for v in before.values()):
        raise fail(f"{name}: before maps a callee to some of the objects in touches", needle)
    if not isinstance(first, dict) or not all(isinstance(v, str) for v in first.values()):
        raise fail(f"{name}: first maps an object to the callee that touches it first", needle)
    return FunctionAccess(name, tuple(touches), role, cite, e.get("note", ""), line_of(text, needle) or 0,
                          tuple((k, tuple(v)) for k, v in vt.items()), {k: tuple(v) for k, v in after.items()},
                          {k: tuple(v) for k, v in before.items()}, dict(first),
                          basis=basis, hidden_callers=tuple(hidden.items()))


def _check_callees(functions: dict[str, FunctionAccess], fail: Fail) -> None:
    """Every callee an ``after`` table names has a [[function]] entry of its own."""
    for f in functions.values():
        for event, callees in f.after.items():
            for callee in callees:
                if callee not in functions:
                    raise fail(f"{f.name}: {callee}, called after {event}, has no [[function]] entry", f'"{f.name}"')


def _exit_paths(entries: list[dict], functions: dict[str, FunctionAccess],
                fail: Fail) -> dict[tuple[str, str, str], ExitPath]:
    """The [[exit_path]] entries by (vendor, reason, kernel series; "" for any)."""
    paths = {}
    for e in entries:
        needle = f'reason = "{e.get("reason")}"'
        if not all(isinstance(e.get(k), str) and e.get(k) for k in ("vendor", "reason", "cite")):
            raise fail("an [[exit_path]] needs vendor, reason and cite", "[[exit_path]]")
        fns = tuple(e.get("functions", ()))
        for fn in fns:
            if fn not in functions:
                raise fail(f"exit path {e['vendor']} {e['reason']}: {fn} has no [[function]] entry", needle)
        kernel = e.get("kernel", "")
        paths[(e["vendor"], e["reason"], kernel)] = ExitPath(e["vendor"], e["reason"], fns, e["cite"], kernel)
    return paths


def _known(functions: dict[str, FunctionAccess], section: str, keys: tuple[str, ...], what: str, e: dict,
           fail: Fail) -> tuple[str, ...]:
    """The entry's functions, each with a [[function]] entry, and its keys all present."""
    if not all(e.get(k) for k in keys) or not isinstance(e.get("cite"), str):
        raise fail(f"a [[{section}]] needs {', '.join(keys)} and cite", f"[[{section}]]")
    fns = tuple(e["functions"])
    for fn in fns:
        if fn not in functions:
            raise fail(f"{what}: {fn} has no [[function]] entry", f"[[{section}]]")
    return fns


__all__ = ["ACCESS_TOML", "load_access_model"]
