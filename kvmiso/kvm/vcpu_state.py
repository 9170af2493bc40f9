"""The rest of a vCPU's state: debug registers, XSAVE area, XCRs, MP state, the registers synced
through ``kvm_run.s``, and the whole of it saved and loaded as selftests' ``vcpu_save_state`` /
``vcpu_load_state`` do (:class:`VcpuState`). :class:`VcpuStateIoctls` is a part of
:class:`~kvmiso.kvm.Vcpu`; so is the escape hatch :meth:`VcpuStateIoctls.ioctl`.

>>> state = vcpu.save_state()
>>> vcpu.run()                              # the guest goes on, changes things
IoExit(port=233, size=1, count=1, is_in=False)
>>> _ = state.msrs.pop(0x4b564d06, None)    # kvm_pvm refuses MSR_KVM_POLL_CONTROL's own value
>>> vcpu.load_state(state)                  # and is back where it was
>>> vcpu.get_regs().rip == state.regs.rip
True
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from . import abi

if TYPE_CHECKING:
    from .vm import Vm


@functools.lru_cache(maxsize=4)
def _xsave_type(size: int) -> type:
    """``struct kvm_xsave`` with its flexible ``extra`` grown to ``size`` bytes in all; the
    request number's size is the header's (``header_type``), 4096 bytes."""
    class _Xsave(ctypes.Structure):
        _fields_ = [("region", ctypes.c_uint32 * (size // 4))]
        header_type = abi.kvm_xsave

    return _Xsave


@dataclass
class VcpuState:
    """Everything KVM lets userspace read back of one vCPU, as selftests' ``struct
    kvm_x86_state``: ``xsave`` (its bytes) and ``xcrs`` are None where KVM has no
    KVM_CAP_XSAVE / KVM_CAP_XCRS; ``msrs`` holds every MSR of KVM_GET_MSR_INDEX_LIST."""

    regs: abi.kvm_regs
    sregs: abi.kvm_sregs
    fpu: abi.kvm_fpu
    events: abi.kvm_vcpu_events
    mp_state: int
    debugregs: abi.kvm_debugregs
    msrs: dict[int, int]
    xsave: bytes | None
    xcrs: abi.kvm_xcrs | None


class VcpuStateIoctls:
    """The state ioctls of a vCPU fd beyond registers and MSRs (a part of :class:`Vcpu`)."""

    fd: int
    vm: "Vm"
    kvm_run: abi.kvm_run

    def ioctl(self, request: int, arg: int | ctypes._CData | None = None,
              explain: Callable[[int], str] | None = None) -> int:
        """Any vCPU ioctl (see :meth:`Kvm.ioctl`): selftests' ``vcpu_ioctl``; errors as
        :meth:`Vm.ioctl`'s (VmDead where KVM refuses the VM).

        >>> vcpu.ioctl(abi.KVM_GET_REGS, regs := abi.kvm_regs())
        0
        """
        return self.vm.ioctl(request, arg, explain, self.fd)

    @property
    def sync_regs(self) -> abi.kvm_sync_regs:
        """``kvm_run.s.regs`` (``struct kvm_sync_regs``): the regs, sregs and events KVM_RUN
        writes on its way out for each KVM_SYNC_X86_* bit of ``kvm_run.kvm_valid_regs``, and
        loads on its way in for each bit of ``kvm_run.kvm_dirty_regs`` (KVM_CAP_SYNC_REGS).

        >>> vcpu.kvm_run.kvm_valid_regs = abi.KVM_SYNC_X86_REGS
        >>> exit = vcpu.run()
        >>> vcpu.sync_regs.regs.rip == vcpu.get_regs().rip
        True
        """
        return self.kvm_run.s.regs

    def get_debugregs(self) -> abi.kvm_debugregs:
        """KVM_GET_DEBUGREGS: the guest's own DR0-DR3, DR6 and DR7."""
        dr = abi.kvm_debugregs()
        self.ioctl(abi.KVM_GET_DEBUGREGS, dr)
        return dr

    def set_debugregs(self, debugregs: abi.kvm_debugregs) -> None:
        """KVM_SET_DEBUGREGS."""
        self.ioctl(abi.KVM_SET_DEBUGREGS, debugregs)

    def get_xsave(self) -> bytes:
        """The XSAVE area: KVM_GET_XSAVE2 with as many bytes as KVM_CAP_XSAVE2 says on the VM
        (4096 or more), else KVM_GET_XSAVE (4096)."""
        size = self.vm.check_extension("XSAVE2")
        buf = _xsave_type(max(size, ctypes.sizeof(abi.kvm_xsave)))()
        self.ioctl(abi.KVM_GET_XSAVE2 if size else abi.KVM_GET_XSAVE, buf)
        return bytes(buf)

    def set_xsave(self, area: bytes) -> None:
        """KVM_SET_XSAVE of an area :meth:`get_xsave` read."""
        self.ioctl(abi.KVM_SET_XSAVE, _xsave_type(len(area)).from_buffer_copy(area))

    def get_xcrs(self) -> abi.kvm_xcrs:
        """KVM_GET_XCRS: the extended control registers (XCR0), none where the host has no XSAVE."""
        xcrs = abi.kvm_xcrs()
        self.ioctl(abi.KVM_GET_XCRS, xcrs)
        return xcrs

    def set_xcrs(self, xcrs: abi.kvm_xcrs) -> None:
        """KVM_SET_XCRS."""
        self.ioctl(abi.KVM_SET_XCRS, xcrs)

    def get_mp_state(self) -> int:
        """KVM_GET_MP_STATE: a KVM_MP_STATE_* value (``abi.KVM_MP_STATE_NAMES`` names it)."""
        mp = abi.kvm_mp_state()
        self.ioctl(abi.KVM_GET_MP_STATE, mp)
        return mp.mp_state

    def set_mp_state(self, mp_state: int) -> None:
        """KVM_SET_MP_STATE."""
        self.ioctl(abi.KVM_SET_MP_STATE, abi.kvm_mp_state(mp_state))

    def save_state(self) -> VcpuState:
        """The whole state (selftests' ``vcpu_save_state``, in its order): a vCPU whose last
        exit left an instruction to complete (I/O, MMIO, MSR) should be given
        :meth:`complete_pending` first, as the state of a half-done instruction does not load."""
        events, mp_state, regs = self.get_vcpu_events(), self.get_mp_state(), self.get_regs()
        xsave = self.get_xsave() if self.vm.check_extension("XSAVE") else None
        xcrs = self.get_xcrs() if self.vm.check_extension("XCRS") else None
        sregs, fpu = self.get_sregs(), self.get_fpu()
        msrs = self.get_msrs(self.vm.kvm.get_msr_index_list())
        return VcpuState(regs, sregs, fpu, events, mp_state, self.get_debugregs(), msrs, xsave, xcrs)

    def load_state(self, state: VcpuState) -> None:
        """Load a :meth:`save_state` (selftests' ``vcpu_load_state``, in its order; the FPU
        before XSAVE, which holds it too)."""
        self.set_sregs(state.sregs)
        self.set_msrs(state.msrs)
        self.set_fpu(state.fpu)
        if state.xsave is not None:
            self.set_xsave(state.xsave)
        if state.xcrs is not None:
            self.set_xcrs(state.xcrs)
        self.set_vcpu_events(state.events)
        self.set_mp_state(state.mp_state)
        self.set_debugregs(state.debugregs)
        self.set_regs(state.regs)
