"""Every ctypes mirror in kvmiso.kvm.abi against the installed <linux/kvm.h>: sizes, field
offsets, ioctl numbers, exit reasons and capability numbers, via a compiled C program."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from kvmiso.kvm import abi

HEADER = Path("/usr/include/linux/kvm.h")

# ctypes structs that mirror a C struct of the same name
STRUCTS = [
    "kvm_userspace_memory_region", "kvm_regs", "kvm_segment", "kvm_dtable", "kvm_sregs", "kvm_fpu",
    "kvm_msr_entry", "kvm_msrs", "kvm_msr_list", "kvm_cpuid_entry2", "kvm_cpuid2", "kvm_translation",
    "kvm_guest_debug_arch", "kvm_guest_debug", "kvm_vcpu_events", "kvm_irq_level", "kvm_ioeventfd",
    "kvm_dirty_log", "kvm_enable_cap", "kvm_stats_header", "kvm_stats_desc", "kvm_debug_exit_arch",
    "kvm_run", "kvm_debugregs", "kvm_xsave", "kvm_xcr", "kvm_xcrs", "kvm_mp_state", "kvm_sync_regs",
    "kvm_msr_filter_range", "kvm_msr_filter",
]
# newer than the installed header (6.1): checked against the running kernel's BTF below
NEWER_STRUCTS = ["kvm_userspace_memory_region2", "kvm_create_guest_memfd"]
# members the kernel spells otherwise inside itself (#ifdef __KERNEL__), as BTF shows them
BTF_NAMES = {("kvm_run", "immediate_exit"): "immediate_exit__unsafe"}
BTF_SIZE_DIFFERS = {"kvm_stats_desc"}  # the kernel's own ends in name[KVM_STATS_NAME_SIZE], userspace's is flexible
# our padding-only or synthetic names that C spells differently
SKIP_FIELDS = {("kvm_run", "u.padding")}
# kvm_run members newer than some installed headers, checked where the header has the exit
# reason that came with them (elsewhere the C program prints kvmiso's own value), and against
# the running kernel's BTF
NEWER_MEMBERS = {"u.memory_fault": "KVM_EXIT_MEMORY_FAULT"}


def _fields(cls, prefix=""):
    """(C member path, offset, size) for every field, recursing into nested structs."""
    for name, ctype in cls._fields_:
        f = getattr(cls, name)
        path = f"{prefix}{name}"
        yield path, f.offset, f.size
        if isinstance(ctype, type) and issubclass(ctype, (ctypes.Structure, ctypes.Union)):
            for sub, off, size in _fields(ctype, path + "."):
                yield sub, f.offset + off, size


def _c_path(struct: str, path: str) -> str:
    # kvm_run's exit union is anonymous in C: u.io.port -> io.port
    # and its debug member wraps struct kvm_debug_exit_arch in .arch
    if struct == "kvm_run" and path.startswith("u."):
        path = path[2:]
        return path.replace("debug.", "debug.arch.", 1) if path.startswith("debug.") else path
    return path


def _where_defined(statement: str, macro: str | None, ours: int) -> str:
    """``statement`` if the header defines ``macro`` (or no macro is needed), else a printf of ``ours``."""
    if macro is None:
        return statement
    return f'#ifdef {macro}\n{statement}\n#else\nprintf("%zu\\n", (size_t){ours});\n#endif'


def _program():
    lines, expected = [], []
    for s in STRUCTS:
        cls = getattr(abi, s)
        lines.append(f'printf("%zu\\n", sizeof(struct {s}));')
        expected.append((f"sizeof {s}", ctypes.sizeof(cls)))
        for path, off, size in _fields(cls):
            if (s, path) in SKIP_FIELDS or path == "u" or path.startswith("u.padding"):
                continue
            cp = _c_path(s, path)
            newer = next((m for member, m in NEWER_MEMBERS.items() if s == "kvm_run" and path.startswith(member)), None)
            lines.append(_where_defined(f'printf("%zu\\n", offsetof(struct {s}, {cp}));', newer, off))
            expected.append((f"offsetof {s}.{path}", off))
            lines.append(_where_defined(f'printf("%zu\\n", sizeof(((struct {s} *)0)->{cp}));', newer, size))
            expected.append((f"sizeof {s}.{path}", size))
    for value, name in sorted(abi.IOCTL_NAMES.items()):  # one newer than the header: see the BTF test
        lines.append(f'#ifdef {name}\nprintf("%lu\\n", (unsigned long){name});\n#else\nprintf("%lu\\n", {value}UL);\n#endif')
        expected.append((name, value))
    for nr, name in abi.KVM_EXIT_REASONS.items():
        lines.append(f'#ifdef KVM_EXIT_{name}\nprintf("%d\\n", KVM_EXIT_{name});\n#else\nprintf("%d\\n", {nr});\n#endif')
        expected.append((f"KVM_EXIT_{name}", nr))
    for name, nr in abi.KVM_CAPS.items():
        lines.append(f'#ifdef KVM_CAP_{name}\nprintf("%d\\n", KVM_CAP_{name});\n#else\nprintf("%d\\n", {nr});\n#endif')
        expected.append((f"KVM_CAP_{name}", nr))
    src = "#include <stdio.h>\n#include <stddef.h>\n#include <linux/kvm.h>\nint main(void) {\n" + "\n".join(lines) + "\nreturn 0;\n}\n"
    return src, expected


def test_abi_matches_installed_headers(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler (cc/gcc) to check the ABI against <linux/kvm.h>")
    if not HEADER.exists():
        pytest.skip(f"{HEADER} is not installed (linux-libc-dev)")
    src, expected = _program()
    (tmp_path / "abi.c").write_text(src)
    subprocess.run([cc, "-o", str(tmp_path / "abi"), str(tmp_path / "abi.c")], check=True, capture_output=True)
    out = subprocess.run([str(tmp_path / "abi")], check=True, capture_output=True, text=True).stdout.split()
    assert len(out) == len(expected)
    wrong = [f"{what}: kvmiso {ours}, <linux/kvm.h> {int(c)}" for (what, ours), c in zip(expected, out) if ours != int(c)]
    assert not wrong, "\n".join(wrong)
    assert len(expected) > 400  # every struct was walked, not just a few


def test_ioctl_numbers_are_built_not_written():
    # _IOWR(0xAE, 0x05, struct kvm_cpuid2) by hand: dir 3, size 8, type 0xAE, nr 5
    assert abi.KVM_GET_SUPPORTED_CPUID == (3 << 30) | (8 << 16) | (0xAE << 8) | 0x05
    assert abi.KVM_RUN == 0xAE80
    assert abi.IOCTL_NAMES[abi.KVM_SET_USER_MEMORY_REGION] == "KVM_SET_USER_MEMORY_REGION"


def test_abi_names_every_struct_and_constant_of_its_parts():
    # abi re-exports abi_run's and abi_vcpu's names one by one: a name added there is listed there
    from kvmiso.kvm import abi_run, abi_vcpu

    missing = [n for part in (abi_run, abi_vcpu) for n in part.__all__ if not hasattr(abi, n)]
    assert not missing, missing


def test_abi_matches_the_running_kernel_s_btf():
    # the kernel's own layout (CO-RE's habit): every struct, those newer than the installed
    # header included, where this kernel has it (kvm_create_guest_memfd only with guest_memfd)
    from kvmiso.observe.kernel.btf import Btf, BtfError

    try:
        btf = Btf.running()
    except BtfError as e:
        pytest.skip(str(e))
    checked, wrong, compared = [], [], 0
    for s in STRUCTS + NEWER_STRUCTS:
        if not btf.has_struct(s):
            continue
        cls, view = getattr(abi, s), btf.struct(s)
        checked.append(s)
        if ctypes.sizeof(cls) != view.size and s not in BTF_SIZE_DIFFERS:
            wrong.append(f"sizeof {s}: kvmiso {ctypes.sizeof(cls)}, BTF {view.size}")
        for path, off, _ in _fields(cls):
            if (s, path) in SKIP_FIELDS or path == "u":
                continue
            if path.startswith("u."):  # kvm_run's exit union is anonymous in C; BTF names no member "u"
                if not path.startswith(tuple(NEWER_MEMBERS)):
                    continue  # the header checks it
                path = _c_path(s, path)  # BTF finds a member of the anonymous union by its own name
            try:
                theirs = view.offset(path)
            except BtfError:
                theirs = view.offset(BTF_NAMES.get((s, path), path))
            if theirs != off:
                wrong.append(f"offsetof {s}.{path}: kvmiso {off}, BTF {theirs}")
            compared += 1
    assert not wrong, "\n".join(wrong)
    assert {"kvm_run", "kvm_sync_regs", "kvm_msr_filter"} <= set(checked) and compared > 300
