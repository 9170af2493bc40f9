"""The package's shape, checked: one source for each constant the guests and the host share; the
import graph against docs/layers.md's picture (no cycle, arrows down followed transitively,
observe and guest side by side, isolation pure, subcommands in commands/ only); module length;
docstrings and type hints."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import kvmiso
from kvmiso.guest import Source, build, sites, ucall


@pytest.mark.parametrize("mode", ["real", "protected", "long"])
def test_ucall_constants_are_the_guest_conventions(mode):
    # guests/lib/kvmiso.inc defines them for the assembler; the image's symbol table carries
    # the values the guest was really built with
    sym = build("hello", mode).symbols
    for name in ("PORT_CONSOLE", "PORT_UCALL", "UCALL_DONE", "UCALL_FAIL", "UCALL_REPORT", "UCALL_EXCEPTION",
                 "UCALL_ASSERT", "UCALL_SYNC", "UCALL_PRINTF"):
        assert getattr(ucall, name) == sym[name], name
    # the site kinds GUEST_ASSERT* and the others record, and the names the host gives them
    for kind, macro in enumerate(sites.MACROS):
        assert sym["SITE_" + macro.removeprefix("GUEST_").removeprefix("ASSERT_")] == kind, macro



def test_the_c_header_has_the_assembler_s_conventions():
    # guests/lib/kvmiso.h restates kvmiso.inc's numbers for C: a C payload exports each as a
    # symbol (C_<name>) beside crt0's own, and the two must agree
    names = ["PORT_CONSOLE", "PORT_UCALL", "SCRATCH"] + [n for n in dir(ucall) if n.startswith("UCALL_")]
    names += ["SITE_" + m.removeprefix("GUEST_").removeprefix("ASSERT_") for m in sites.MACROS]
    exports = "".join(f'__asm__(".globl C_{n}\\n.set C_{n}, %c0" : : "i"({n}));' for n in names)
    sym = build(Source("void main(void) {" + exports + "}", "c"), "long").symbols
    assert {n: sym["C_" + n] for n in names} == {n: sym[n] for n in names}


# --- the import graph, read from the source (lazy imports included, TYPE_CHECKING ones not) ---

PACKAGE = Path(kvmiso.__file__).parent
LAYERS = PACKAGE.parent / "docs" / "layers.md"


def _floors() -> dict[str, int]:
    """docs/layers.md's table: each part (a top-level module or package of kvmiso; "" for the
    package's __init__) and its floor. Arrows point down: a module imports only from its own
    part or from parts on lower floors; parts on one floor never import each other."""
    text = LAYERS.read_text()
    table = text[text.index("```layers\n") + len("```layers\n"):]
    table = table[:table.index("```")]
    floors = {}
    for line in table.splitlines():
        floor, *parts = line.split()
        floors.update({part.strip('"'): int(floor) for part in parts})
    return floors


RANK = _floors()
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(PACKAGE).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return mods


def _runtime_imports(path: Path, name: str) -> set[str]:
    """The kvmiso modules ``path`` imports when it runs, relative to the package ("" for it)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and ast.unparse(node.test).endswith("TYPE_CHECKING") for n in ast.walk(node)}
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    here = [p for p in here if p]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - node.level + 1] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "kvmiso":
                base = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:  # "from . import abi" imports a module, not a name
                found.add(".".join(base + [alias.name]) if ".".join(base + [alias.name]) in _MODS else ".".join(base))
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("kvmiso").lstrip(".") for a in node.names if a.name.split(".")[0] == "kvmiso"}
    return found - {name}


def _part(name: str) -> str:
    return name.split(".")[0]


_MODS = _modules()
_GRAPH = {name: _runtime_imports(path, name) for name, path in _MODS.items()}


def test_the_graph_is_read():
    # the reader above must see what is plainly there, or the checks below pass on nothing
    assert "kvm.vcpu" in _GRAPH["kvm.vm"] and "kvm.abi" in _GRAPH["kvm.vm"]
    assert "isolation.check" in _GRAPH["isolation"] and "kvm.system" not in _GRAPH["kvm.vm"]
    assert "commands" in _GRAPH["cli"] and {"commands.check", "commands.probe"} <= _GRAPH["commands"]


def test_no_import_cycle():
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        seen[m] = 1
        for n in sorted(_GRAPH.get(m, ())):
            if seen.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in seen:
                visit(n, path + [n])
        seen[m] = 2

    for m in sorted(_GRAPH):
        if m not in seen:
            visit(m, [m])


def _reach(m: str) -> set[str]:
    """Every kvmiso module ``m`` imports, directly or through others, when it runs."""
    seen: set[str] = set()
    todo = [m]
    while todo:
        for n in _GRAPH.get(todo.pop(), ()):
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen - {m}


_REACH = {m: _reach(m) for m in _GRAPH}


def test_every_part_is_on_a_floor_of_the_picture():
    assert {"commands", "session", "observe", "kvm"} <= set(RANK)  # the table was read
    unplaced = sorted({_part(m) for m in _MODS} - set(RANK))
    assert not unplaced, f"parts docs/layers.md does not place: {unplaced}"


def test_arrows_point_down():
    # followed transitively: a module reaches only its own part and parts on lower floors
    wrong = sorted(f"{m} reaches {n}" for m, targets in _REACH.items() for n in targets
                   if _part(n) != _part(m) and RANK[_part(n)] >= RANK[_part(m)])
    assert not wrong, wrong


def test_kvm_reaches_nothing_of_kvmiso_but_itself():
    reach = {n for m, targets in _REACH.items() if _part(m) == "kvm" for n in targets}
    assert {_part(n) for n in reach} <= {"kvm"}, reach


def test_observe_and_guest_stand_side_by_side():
    # observe/ runs no guest (session/capture.py does), and guest/ reads no trace
    for a, b in (("observe", "guest"), ("guest", "observe")):
        crossing = {f"{m} -> {n}" for m, targets in _REACH.items() if _part(m) == a for n in targets if _part(n) == b}
        assert not crossing, crossing


def test_isolation_runs_no_guest_and_opens_no_device():
    reach = {n for m, targets in _REACH.items() if _part(m) == "isolation" for n in targets}
    assert not {n for n in reach if _part(n) in ("guest", "session", "bench")
                or n in ("kvm.system", "kvm.vm", "kvm.vcpu", "observe.tracing.capture", "observe.tracing.tracefs")}, reach


def test_a_subcommand_lives_in_commands_only():
    # one room for a subcommand: cli.py assembles the parser from commands.COMMANDS
    from kvmiso.commands import COMMANDS

    outside = sorted(name for name, p in _MODS.items() if _part(name) != "commands"
                     and any(isinstance(n, ast.FunctionDef) and (n.name.startswith("cmd_") or n.name == "add_parser")
                             for n in ast.parse(p.read_text()).body))
    assert not outside, outside
    for module in COMMANDS:
        assert callable(module.add_parser) and callable(module.run), module.__name__


def test_no_module_is_over_400_lines():
    long = {name: n for name, p in _MODS.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_every_public_name_has_a_docstring():
    missing = []
    for name, p in _MODS.items():
        tree = ast.parse(p.read_text())
        if not ast.get_docstring(tree):
            missing.append(name)
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
                continue
            if not ast.get_docstring(node):
                missing.append(f"{name}.{node.name}")
            for member in node.body if isinstance(node, ast.ClassDef) else ():
                setter = any(ast.unparse(d).endswith((".setter", ".deleter")) for d in getattr(member, "decorator_list", ()))
                if (isinstance(member, ast.FunctionDef) and not member.name.startswith("_") and not setter
                        and not ast.get_docstring(member)):
                    missing.append(f"{name}.{node.name}.{member.name}")
    assert not missing, missing


def test_every_public_function_has_type_hints():
    def unhinted(fn: ast.FunctionDef, owner: str) -> list[str]:
        args = [a for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs if a.arg not in ("self", "cls")]
        args += [a for a in (fn.args.vararg, fn.args.kwarg) if a is not None]
        bad = [a.arg for a in args if a.annotation is None]
        if fn.returns is None and fn.name != "__init__":
            bad.append("return")
        return [f"{owner}{fn.name}: {', '.join(bad)}"] if bad else []

    missing = []
    for name, p in _MODS.items():
        for node in ast.parse(p.read_text()).body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                missing += unhinted(node, f"{name}.")
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                missing += [m for f in node.body if isinstance(f, ast.FunctionDef)
                            and (not f.name.startswith("_") or f.name == "__init__")
                            for m in unhinted(f, f"{name}.{node.name}.")]
    assert not missing, missing


def test_one_handle_on_the_c_library():
    # kvm/_libc.py opens libc once; every other module borrows that handle (issue 25: five
    # ctypes.CDLL calls had each set up argtypes of their own on separate handles)
    opened = {name for name, p in _MODS.items() if "ctypes.CDLL(" in p.read_text()}
    assert opened == {"kvm._libc"}, opened
