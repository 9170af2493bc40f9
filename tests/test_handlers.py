import re
from pathlib import Path

import pytest

from kvmiso.isolation.check import CheckError, load_handlers
from kvmiso.isolation.layout import build_layout, known_region_names
from kvmiso.kvm import abi

FIXTURES = Path(__file__).parent / "fixtures" / "isolation"
KALLSYMS = (FIXTURES / "kallsyms.txt").read_text()
FLAGS = "flags\t\t: fpu pae nx pdpe1gb lm\n"
# Recorded on the kvm_pvm host: its tracefs kvm/kvmmmu event names and kvm_exit's format.
EVENTS = (FIXTURES / "events.txt").read_text().split()
KVM_EXIT_FORMAT = (FIXTURES / "kvm_exit.format").read_text()
NOT_X86 = {"S390_SIEIC", "S390_RESET", "DCR", "OSI", "PAPR_HCALL", "S390_UCONTROL", "WATCHDOG", "S390_TSCH", "EPR",
           "S390_STSI", "ARM_NISV", "RISCV_SBI", "RISCV_CSR", "LOONGARCH_IOCSR", "AP_RESET_HOLD", "TDX"}


@pytest.fixture(scope="module")
def table():
    return load_handlers(regions=known_region_names())


def _vendors(table, kind):
    return [v for v in ("kvm_pvm", "kvm_intel", "kvm_amd") if table.lookup(kind, v)]


def test_every_trace_event_of_this_kernel_has_an_entry(table):
    assert len(EVENTS) > 100
    missing = [e for e in EVENTS if not _vendors(table, f"trace:{e}")]
    assert missing == []


def test_every_x86_userspace_exit_has_an_entry(table):
    reasons = [n for n in abi.KVM_EXIT_REASONS.values() if n not in NOT_X86]
    assert [r for r in reasons if not table.lookup(f"exit:{r}", "kvm_pvm")] == []
    h = table.lookup("exit:IO", "kvm_pvm")
    assert h.leaves == {"rfc-v1", "asi"} and not h.leave_at_start


def _symbolic(isa: str) -> list[int]:
    """The reason codes kvm_exit's print format names for VMX (isa == 1) or SVM."""
    fmt = KVM_EXIT_FORMAT.split("print fmt:")[1]
    parts = fmt.split("__print_symbolic(")
    body = parts[1] if isa == "vmx" else parts[2]
    body = body.split(")", 1)[0] if isa == "vmx" else body.split("), (REC", 1)[0]
    return [int(m.group(1), 0) + (int(m.group(2)) if m.group(2) else 0)
            for m in re.finditer(r"\{ (-?0x[0-9a-f]+|-?\d+)(?: \+ (\d+))?, \"", body)]


def test_every_vmx_reason_the_tracepoint_names_has_an_entry(table):
    codes = _symbolic("vmx")
    assert len(codes) > 60 and 30 in codes and 48 in codes
    assert [c for c in codes if not table.lookup(f"vmx:{c}", "kvm_intel")] == []
    assert table.lookup("vmx:30", "kvm_pvm") is None  # vendor entries are for their vendor only


def test_every_svm_code_the_tracepoint_names_has_an_entry(table):
    codes = [c for c in _symbolic("svm") if 0 <= c < 0x80000000]  # vmgexit sub-codes ride on 0x403
    assert len(codes) > 80 and 0x7B in codes and 0x400 in codes
    assert [hex(c) for c in codes if not table.lookup(f"svm:{c:#x}", "kvm_amd")] == []


def test_policies_differ_where_the_rfc_and_asi_do(table):
    irq = table.lookup("vmx:1", "kvm_intel")
    assert irq.leaves == {"rfc-v1"}  # ASI keeps IRQ entry in the restricted space
    assert table.lookup("trace:kvm_update_master_clock", "kvm_pvm").outside == {"asi"}
    assert all(h.cite and h.reason for h in table.handlers)


def test_stale_names_are_reported_with_their_line(tmp_path):
    f = tmp_path / "h.toml"
    f.write_text('version = 1\n[defaults]\ntouches = []\n\n[[exit]]\nkind = "trace:kvm_pio"\n'
                 'path = [{ fn = "kvm_fast_pio" }, { fn = "kvm_no_such_function" }]\ninlined = ["vcpu_run"]\n'
                 'reason = "r"\ncite = "c"\n')
    t = load_handlers(f, known_region_names())
    stale, inlined = t.stale(build_layout(KALLSYMS, FLAGS, vendor="kvm_pvm"))
    assert stale == [f"{f}:5: trace:kvm_pio: kvm_no_such_function is not in this kernel's kallsyms"]
    assert inlined == ["trace:kvm_pio: vcpu_run"]


def test_the_shipped_table_is_current_for_the_running_kernel(table):
    from kvmiso.isolation.layout import host_layout

    lay = host_layout()
    if lay.symbols is None:
        pytest.skip("/proc/kallsyms shows no addresses (needs root): names cannot be checked")
    stale, _ = table.stale(lay)
    # this kernel is built without Hyper-V and Xen emulation: exactly those are stale
    assert all(("kvm_hv_hypercall" in s or "kvm_xen_hypercall" in s) for s in stale), stale


@pytest.mark.parametrize("body, line, why", [
    ('[[exit]]\nkind = "trace:x"\npath = [{ fn = "f", touches = ["nowhere"] }]\n', 3, "unknown region 'nowhere'"),
    ('\n[[exit]]\nkind = "perf:x"\npath = [{ fn = "f" }]\n', 2, "must start with trace:"),
    ('[[exit]]\nkind = "trace:x"\npath = [{ fn = "f" }]\nleaves = ["pti"]\n', 1, "unknown policy 'pti'"),
    ('[[exit]]\nkind = "trace:x"\npath = []\n', 1, "empty path"),
    ('[[exit]]\nkind = "trace:x"\npath = [{ fn = "f" }]\nleave_at = "middle"\n', 1, "leave_at"),
    ('[[exit]]\nkind = "trace:x"\npath = [{ fn = "f" }]\n[[exit]]\nkind = "trace:x"\npath = [{ fn = "g" }]\n', 4,
     "already described at line 1"),
    ('[[exit]\n', None, "not valid TOML"),
])
def test_bad_tables_name_the_line(tmp_path, body, line, why):
    f = tmp_path / "h.toml"
    f.write_text(body)
    with pytest.raises(CheckError, match=re.escape(why)) as e:
        load_handlers(f, known_region_names())
    if line:
        assert str(e.value).startswith(f"{f}:{line}: ")
