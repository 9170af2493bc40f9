"""kvmiso's pytest plugin: KVM tests in the selftests' manner, on the real /dev/kvm.

Installed with kvmiso (the ``pytest11`` entry point ``kvmiso``), so any test suite gets it;
``-p no:kvmiso`` turns it off.

Fixtures:

- ``kvm``: a :class:`~kvmiso.kvm.Kvm` on /dev/kvm, closed after the test. Only a missing
  /dev/kvm skips (as the selftests' ENOENT); any other failure to open it (EACCES) fails.
  ``KVMISO_REQUIRE_KVM=1`` turns the skip into a failure, and ``KVMISO_REQUIRE_VENDOR=kvm_amd``
  (say) fails on another vendor module: a CI lane that must run the device tests sets them.
- ``vm``: a :class:`~kvmiso.kvm.Vm` on it.
- ``machine``: a factory, ``machine(payload, mode=None, **kwargs)`` -> a
  :class:`~kvmiso.guest.Machine` on ``kvm``; every machine it made is closed after the test.
  When the test fails, the report shows each one's console (GUEST_PRINTF's lines included), as
  it shows captured output.

Markers:

- ``@pytest.mark.kvm_cap("SYNC_REGS", ...)``: skip, naming the capability, unless
  KVM_CHECK_EXTENSION on /dev/kvm says each is there.
- ``@pytest.mark.kvm_deviation(fact, reason, strict=True, raises=None)``: where ``fact`` holds on
  this host, the test is an xfail that names it: a known way this KVM departs from what the test
  checks. ``fact`` is a vendor module (``"kvm_pvm"``), a fact kvmiso measures (see :data:`PROBED`)
  or a callable taking the Kvm. Strict by default: a deviation that went away fails as XPASS, so
  its marker goes too. ``raises`` (an exception class or a tuple, as xfail's) keeps any other
  failure a failure: the deviation covers the assertion it names, not a test that broke.

>>> @pytest.mark.kvm_deviation("cpl0_hypercall_hangs", "KVM re-executes a CPL0 VMCALL for ever")
... def test_hypercall(machine):
...     machine("hypercall").run(timeout=1).raise_for_guest()
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, Iterator

import pytest

if TYPE_CHECKING:
    from .guest import Machine
    from .kvm import Kvm, Vm

DEV_KVM = "/dev/kvm"
# facts kvmiso measures by running a guest (kvmiso.guest.probe), each once per process
PROBED = ("cpl0_emulated", "cpl3_emulated", "cpl3_cpuid_native", "cpl3_cpuid_intercepted", "cpl0_hypercall_hangs")
_measured: dict[str, bool] = {}
_MACHINES = pytest.StashKey[list]()  # the machines a test's factory made, for its report


def _measure(fact: str, kvm: "Kvm") -> bool:
    from .guest.probe import PROBE_INSNS, cpuid_intercepted, emulated_instructions, hypercall_returns

    if fact.endswith("_emulated"):  # KVM's emulator ran the probe guest's plain instructions
        return emulated_instructions(kvm, "long", int(fact[3])) >= PROBE_INSNS
    if fact == "cpl0_hypercall_hangs":  # KVM re-executes it inside one KVM_RUN (kvm_pvm)
        return not hypercall_returns(kvm)
    return cpuid_intercepted(kvm, 3) is (fact == "cpl3_cpuid_intercepted")


def pytest_configure(config: pytest.Config) -> None:
    """Declare the markers (``pytest --markers`` lists them)."""
    config.addinivalue_line("markers", "kvm_cap(*names): skip unless /dev/kvm has each KVM_CAP_<name>")
    config.addinivalue_line("markers", "kvm_deviation(fact, reason, strict=True, raises=None): xfail where fact (a vendor module, "
                            f"one of {', '.join(PROBED)}, or a callable(kvm)) holds on this host")


def open_kvm(path: str = DEV_KVM) -> "Kvm":
    """A Kvm on ``path`` for a test, or the test's skip or failure: a missing device skips (fails
    under KVMISO_REQUIRE_KVM=1), any other error opening it fails, and so does a vendor module
    other than KVMISO_REQUIRE_VENDOR's."""
    from .host import vendor_module
    from .kvm import Kvm, KvmUnavailable

    if not os.path.exists(path):
        reason = f"{path} does not exist on this host"
        if os.environ.get("KVMISO_REQUIRE_KVM") == "1":
            pytest.fail(f"KVMISO_REQUIRE_KVM=1 but {reason}")
        pytest.skip(reason)
    try:
        kvm = Kvm(path)
    except KvmUnavailable as e:
        pytest.fail(str(e))
    required = os.environ.get("KVMISO_REQUIRE_VENDOR")
    if required and vendor_module() != required:
        kvm.close()
        pytest.fail(f"KVMISO_REQUIRE_VENDOR={required} but the vendor module is {vendor_module()}")
    return kvm


@pytest.fixture
def kvm() -> Iterator["Kvm"]:
    """The real /dev/kvm (see the module's docstring for when it skips and when it fails)."""
    with open_kvm() as k:
        yield k


@pytest.fixture
def vm(kvm: "Kvm") -> Iterator["Vm"]:
    """A VM on the ``kvm`` fixture, with no memory and no vCPU yet."""
    with kvm.create_vm() as v:
        yield v


@pytest.fixture
def machine(kvm: "Kvm", request: pytest.FixtureRequest) -> Iterator[Callable[..., "Machine"]]:
    """A factory of :class:`~kvmiso.guest.Machine` on ``kvm``, as ``Machine(payload, mode,
    **kwargs)`` takes them; each is closed after the test."""
    from .guest import Machine

    made: list[Machine] = []
    request.node.stash[_MACHINES] = made

    def make(payload: Any, mode: str | None = None, **kwargs: Any) -> Machine:
        m = Machine(payload, mode, kvm=kvm, **kwargs)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


def _holds(fact: Any) -> tuple[bool, str]:
    """Whether ``fact`` holds here, and its name for the xfail's reason."""
    from .host import vendor_module

    if callable(fact):
        name = getattr(fact, "__name__", repr(fact))
        if not os.path.exists(DEV_KVM):
            return False, name  # the kvm fixture skips the test anyway
        with open_kvm() as kvm:
            return bool(fact(kvm)), name
    if fact in ("kvm_intel", "kvm_amd", "kvm_pvm"):
        return vendor_module() == fact, fact
    if fact not in PROBED:
        pytest.fail(f"kvm_deviation: unknown fact {fact!r}; facts are a vendor module (kvm_intel, kvm_amd, kvm_pvm), "
                    f"{', '.join(PROBED)}, or a callable taking the Kvm", pytrace=False)
    if fact not in _measured:
        if not os.path.exists(DEV_KVM):
            return False, fact
        with open_kvm() as kvm:
            _measured[fact] = _measure(fact, kvm)
    return _measured[fact], fact


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Apply ``kvm_cap`` (a skip) and ``kvm_deviation`` (an xfail) before the test's fixtures."""
    names = [n for mark in item.iter_markers("kvm_cap") for n in mark.args]
    if names:
        from .host import vendor_module
        from .kvm import abi

        with open_kvm() as kvm:
            for name in names:
                try:
                    present = kvm.check_extension(name)
                except ValueError:
                    present = None
                if present is None:  # out of the except: the ValueError is no cause to show
                    pytest.fail(f"kvm_cap: no KVM capability is named {name!r}", pytrace=False)
                if not present:
                    cap = "KVM_CAP_" + str(name).upper().removeprefix("KVM_CAP_")
                    nr = abi.capability_number(name)
                    pytest.skip(f"{cap} ({nr}) is not available on this host ({vendor_module() or 'no vendor module'})")
    for mark in item.iter_markers("kvm_deviation"):
        fact, reason = mark.args[0], mark.args[1] if len(mark.args) > 1 else mark.kwargs.get("reason", "")
        holds, name = _holds(fact)
        if holds:
            # pytest reads xfail marks again when the test is called, so one added here counts
            item.add_marker(pytest.mark.xfail(reason=f"known deviation on this host ({name}): {reason}",
                                              strict=mark.kwargs.get("strict", True),
                                              raises=mark.kwargs.get("raises")))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """A failed test's report gets the console of every machine its ``machine`` factory made:
    what the guests printed before the failure, as selftests show GUEST_PRINTF's lines."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and report.when == "call":
        for m in item.stash.get(_MACHINES, ()):
            if m.console:
                report.sections.append((f"guest console: {m.image.name}, {m.mode} mode, CPL{m.cpl}",
                                        m.console.decode("utf-8", "replace")))
