"""Where a guest stopped inside KVM_RUN is, in words: its linear RIP, the instruction there, and
what KVM did meanwhile. Machine's run loop puts this in the detail of a timeout, an interruption,
a triple fault or an emulation failure; :func:`run_ended` names the outcome of an exit that ends
a run."""

from __future__ import annotations

from typing import Any, Callable

from ..kvm import Vcpu, Vm
from ..kvm.exits import Exit, FailEntryExit, HltExit, InternalErrorExit, ShutdownExit, SystemEventExit
from .result import Outcome

RFLAGS_IF = 1 << 9
RESET_STATE = (0xFFF0, 0xF000, 0xFFFF0000)  # rip, cs, cs.base: where a reset x86 CPU starts

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


def run_ended(vm: Vm, vcpu: Vcpu, mode: str, exit: Exit, symbol: Callable[[int], str]) -> tuple[Outcome, str]:
    """The outcome of a run that ``exit`` ends (HLT, a triple fault, an internal error, a failed
    entry, a system event, or an exit nothing handles) and its detail; ``symbol(linear)`` names
    where in the image an address is (`` (main+0x5c)`` or "")."""
    if isinstance(exit, HltExit):
        return Outcome.HALT, "the guest executed HLT"
    if isinstance(exit, ShutdownExit):
        regs, rip, where, _ = at_rip(vm, vcpu, mode)
        sregs = vcpu.get_sregs()
        if (regs.rip, sregs.cs.selector, sregs.cs.base) == RESET_STATE:
            # kvm_amd reinitializes the VMCB and resets the vCPU before reporting a shutdown
            # (svm.c shutdown_interception): where the guest died is lost
            where = " (the vCPU's reset state: KVM reset it on shutdown, as kvm_amd does)"
        return Outcome.SHUTDOWN, f"the guest triple-faulted (KVM_EXIT_SHUTDOWN) near rip {rip:#x}{symbol(rip)}{where}"
    if isinstance(exit, InternalErrorExit):
        _, rip, where, _ = at_rip(vm, vcpu, mode)
        text = f"KVM_EXIT_INTERNAL_ERROR suberror {exit.suberror_name} at rip {rip:#x}{symbol(rip)}{where}"
        if exit.suberror_name == "EMULATION" and len(exit.data) >= 3 and exit.data[0] & 1:
            # data: flags (bit 0: instruction bytes follow), then insn_size and 15 bytes
            raw = b"".join(d.to_bytes(8, "little") for d in exit.data[1:3])
            text += f"; KVM's emulator cannot execute {raw[1:1 + min(raw[0], 15)].hex(' ')}"
        else:
            text += ", data " + " ".join(f"{d:#x}" for d in exit.data)
        return Outcome.INTERNAL_ERROR, text
    if isinstance(exit, FailEntryExit):
        return Outcome.FAIL_ENTRY, (f"VM entry failed: hardware reason {exit.hardware_entry_failure_reason:#x} "
                                    f"on cpu {exit.cpu}")
    if isinstance(exit, SystemEventExit):
        return Outcome.SYSTEM_EVENT, f"system event {exit.type_name}"
    return Outcome.UNHANDLED_EXIT, f"no handler for {exit!r}"
