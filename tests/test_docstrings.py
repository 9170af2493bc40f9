"""Every ``>>>`` example in kvmiso's docstrings runs, on the real /dev/kvm, and prints what it shows.

Each docstring's examples are one doctest (ELLIPSIS: ``...`` stands for a host's own value), run
in a copy of its module's globals plus ``kvm``, ``m``, ``vm`` and ``vcpu``: a Kvm, a Machine on it
with the ``hello`` payload in long mode at CPL0, not yet run, and that machine's VM and vCPU,
fresh for each docstring and closed after it. Anything else an example uses it imports or builds
itself (docs/install.md, "Examples that run"). An example that reads the kernel (tracefs, BPF,
kallsyms' addresses) says "needs root" in a comment, and skips, saying so, for another user.
The API reference (docs/reference.md) shows the same examples."""

from __future__ import annotations

import copy
import doctest
import importlib
import os
import pkgutil

import pytest

import kvmiso
from kvmiso import Machine

FLAGS = doctest.ELLIPSIS


def _modules() -> list[str]:
    return ["kvmiso"] + sorted(name for _, name, _ in pkgutil.walk_packages(kvmiso.__path__, "kvmiso."))


def _examples() -> list[doctest.DocTest]:
    """The docstrings with examples, of each module's own objects (not of what it imports)."""
    finder = doctest.DocTestFinder(exclude_empty=True)
    found = []
    for name in _modules():
        module = importlib.import_module(name)
        found += [t for t in finder.find(module, name) if t.examples]
    return sorted(found, key=lambda t: t.name)


EXAMPLES = _examples()
# an example that captures a traced run (every kvm event with its call chain) takes 5-10 s here,
# minutes under TCG: marked slow, which the kvm_amd lane leaves out
TRACED = ("Capture(", "capture(")


def _param(test: doctest.DocTest):
    slow = any(t in "".join(e.source for e in test.examples) for t in TRACED)
    return pytest.param(test, id=test.name, marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("test", [_param(t) for t in EXAMPLES])
def test_a_docstring_s_examples_run(kvm, test, tmp_path, monkeypatch):
    if "needs root" in (test.docstring or "") and os.geteuid() != 0:
        pytest.skip(f"{test.name}: its example reads the kernel, which needs root")
    monkeypatch.chdir(tmp_path)  # an example that writes a file writes it here
    with Machine("hello", "long", kvm=kvm) as m:
        test = copy.copy(test)
        test.globs = {**test.globs, "kvm": kvm, "m": m, "vm": m.vm, "vcpu": m.vcpu}
        runner = doctest.DocTestRunner(optionflags=FLAGS)
        out: list[str] = []
        runner.run(test, out=out.append, clear_globs=True)
    assert not runner.failures, "".join(out)


def test_the_docstrings_examples_are_found():
    # what the test above runs, counted, so that a change in how they are found cannot make it
    # run nothing; the public classes' examples are among them
    names = {t.name for t in EXAMPLES}
    assert {"kvmiso", "kvmiso.kvm.system.Kvm", "kvmiso.kvm.vm.Vm"} <= names, sorted(names)
    assert sum(len(t.examples) for t in EXAMPLES) >= 50
