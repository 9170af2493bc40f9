"""Where a guest stopped inside KVM_RUN is, in words: its linear RIP, the instruction there, and
what KVM did meanwhile. Machine's run loop puts this in the detail of a timeout, an interruption,
a triple fault or an emulation failure."""

from __future__ import annotations

from typing import Any, Callable

from ..kvm import Vcpu, Vm

RFLAGS_IF = 1 << 9

# Instructions worth naming when a guest is stopped inside KVM_RUN.
_KNOWN_INSNS = {
    b"\x0f\x01\xc1": "VMCALL", b"\x0f\x01\xd9": "VMMCALL", b"\xeb\xfe": "jmp . (a tight loop)",
    b"\xf4": "HLT", b"\xfa": "CLI",
}


def at_rip(vm: Vm, vcpu: Vcpu, mode: str) -> tuple[Any, int, str, bytes]:
    """The vCPU's registers, its linear RIP, why no code can be fetched there ("" when it can),
    and up to 3 bytes of the instruction there."""
    regs = vcpu.get_regs()
    rip = regs.rip + (vcpu.get_sregs().cs.base if mode == "real" else 0)
    try:
        t = vcpu.translate(rip)
    except OSError:
        return regs, rip, "", b""
    if not t.valid:
        return regs, rip, " (not mapped by the guest's page tables)", b""
    try:
        slot = vm.slot_for(t.physical_address)
    except ValueError:
        return regs, rip, f" (guest-physical {t.physical_address:#x}, which no memory slot backs)", b""
    return regs, rip, "", vm.read(t.physical_address, min(3, slot.end - t.physical_address))


def _byte_before(vm: Vm, vcpu: Vcpu, rip: int) -> bytes:
    """The byte before linear ``rip`` in guest memory, b"" where it cannot be read."""
    try:
        t = vcpu.translate(rip - 1)
        return vm.read(t.physical_address, 1) if t.valid else b""
    except (OSError, ValueError):
        return b""


def describe_stop(vm: Vm, vcpu: Vcpu, mode: str, exits: int, emulated: int,
                  symbolize: Callable[[int], str | None] | None = None) -> str:
    """What a guest stopped inside KVM_RUN was doing: its RIP (with the label it is in, through
    ``symbolize``: :meth:`Image.symbolize`), the instruction there, whether interrupts were off,
    how many instructions KVM emulated (``emulated``, from the vCPU's stats) and how many
    ``exits`` it made to userspace meanwhile."""
    regs, rip, where, insn = at_rip(vm, vcpu, mode)
    label = symbolize(rip) if symbolize else None
    text = f"stopped at rip {rip:#x}{f' ({label})' if label else ''}{where}"
    name = next((n for b, n in _KNOWN_INSNS.items() if insn.startswith(b)), None)
    if insn:
        text += f" ({insn.hex(' ')}{': ' + name if name else ''})"
    # kvmiso starts every guest with IF clear (there is no interrupt controller), so a clear
    # IF alone says nothing; a CLI right before the loop is what the guest chose
    if not regs.rflags & RFLAGS_IF and insn and _byte_before(vm, vcpu, rip) == b"\xfa":
        text += " right after CLI, with interrupts disabled"
    if emulated:
        text += f"; KVM emulated {emulated} instructions"
        text += f" and exited to userspace {exits} time{'s' if exits > 1 else ''}" if exits else " without an exit to userspace"
    elif exits:
        text += f"; {exits} exits to userspace"
    if name in ("VMCALL", "VMMCALL"):
        text += "; the guest is in a hypercall that KVM keeps re-executing inside KVM_RUN"
    return text
