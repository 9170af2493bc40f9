"""What :meth:`kvmiso.guest.Machine.reset` puts back in a vCPU: the state ``modes.setup`` does
not rewrite, saved once before the first run."""

from __future__ import annotations

from dataclasses import dataclass

from ..kvm import Vcpu, abi

# MSRs that steer guest execution (SYSENTER/SYSCALL targets, KERNEL_GS_BASE, PAT, DEBUGCTL):
# reset() restores them so that one payload's WRMSR cannot redirect the next payload.
RESET_MSRS = (0x174, 0x175, 0x176, 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084, 0xC0000102,
              0x277, 0x1D9)


@dataclass
class VcpuState:
    """What ``modes.setup`` does not rewrite: pending events (``struct kvm_vcpu_events``),
    FPU/SSE state (``struct kvm_fpu``), the control MSRs, and the sregs (``struct kvm_sregs``)
    whose CR2, CR8 and APIC base setup keeps."""

    events: abi.kvm_vcpu_events
    fpu: abi.kvm_fpu
    sregs: abi.kvm_sregs
    msrs: dict[int, int]

    @classmethod
    def save(cls, vcpu: Vcpu, msrs: list[int]) -> "VcpuState":
        """Read the vCPU's state now (before its first run)."""
        return cls(vcpu.get_vcpu_events(), vcpu.get_fpu(), vcpu.get_sregs(), vcpu.get_msrs(msrs))

    def restore(self, vcpu: Vcpu) -> abi.kvm_sregs:
        """Put events, FPU and MSRs back; returns a copy of the saved sregs for ``modes.setup``
        to complete and load (one KVM_SET_SREGS instead of two)."""
        vcpu.set_vcpu_events(self.events)
        vcpu.set_fpu(self.fpu)
        vcpu.set_msrs(self.msrs)
        return abi.kvm_sregs.from_buffer_copy(self.sregs)
