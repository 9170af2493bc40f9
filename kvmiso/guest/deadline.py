"""How long a guest may run: :func:`deadline` stops a vCPU's KVM_RUN when time is up, and
:class:`GuestTimeout` is what :class:`kvmiso.guest.Machine` raises then.

The kick itself is the ioctl layer's (:meth:`kvmiso.kvm.Vcpu.kick_after`: a kernel timer that
signals the running thread, so no watchdog thread and no main-thread signal handler): any
thread may run a vCPU under a deadline.

>>> from kvmiso import Machine
>>> with Machine("spin", kvm=kvm) as spin, deadline(spin.vcpu, 0.1) as dl:
...     exit = spin.vcpu.run()  # a guest spinning in `jmp .`
>>> exit, dl.expired
(IntrExit(), True)
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

from ..kvm import Vcpu

if TYPE_CHECKING:
    from .result import RunResult


class GuestTimeout(TimeoutError):
    """A guest ran past its deadline; ``what`` says what it was doing when stopped. ``result`` is
    the run's :class:`~kvmiso.guest.RunResult` (outcome ``timeout``), given when the error is
    built, as :class:`kvmiso.interrupt.Interrupted` carries its ``partial``."""

    def __init__(self, seconds: float, what: str, exits: int = 0, result: RunResult | None = None) -> None:
        super().__init__(f"guest did not finish within {seconds:g} s ({exits} exits): {what}")
        self.seconds = seconds
        self.what = what
        self.exits = exits
        self.result = result

    def __reduce__(self) -> tuple:
        return (type(self), (self.seconds, self.what, self.exits, self.result))


@dataclass
class Deadline:
    """A deadline under way: ``seconds`` long, due at ``at`` (time.monotonic())."""

    seconds: float
    at: float
    vcpu: Vcpu = field(repr=False)

    @property
    def expired(self) -> bool:
        """The deadline passed and stopped the vCPU (``run()`` returned or will return IntrExit)."""
        return self.vcpu.timer_kicked


@contextlib.contextmanager
def deadline(vcpu: Vcpu, seconds: float) -> Iterator[Deadline]:
    """Kick ``vcpu`` out of this thread's KVM_RUN once ``seconds`` have passed: ``run()`` then
    returns ``IntrExit()`` and ``Deadline.expired`` is true. On the way out the timer is
    disarmed and ``immediate_exit`` cleared, so the next run starts clean."""
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"a deadline must be a finite number of seconds >= 0, not {seconds!r}")
    dl = Deadline(seconds, time.monotonic() + seconds, vcpu)
    vcpu.kick_after(seconds)
    try:
        yield dl
    finally:
        if vcpu.fd >= 0:
            vcpu.cancel_kick()
            vcpu.immediate_exit = False
