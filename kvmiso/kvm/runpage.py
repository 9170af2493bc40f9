"""Whether a vCPU's kvm_run page is still mapped, as the exits that view it ask at each use.

A closed vCPU's page is unmapped, and the next mapping (another VM's kvm_run page, say) may
take its address: an exit kept past its vCPU's close must raise, not read or write there. The
check is a flag the exit reads in ``data`` and ``reply()``, so ``Vcpu.run()`` pays nothing.
"""

from __future__ import annotations

from .errors import VcpuClosed


class RunPage:
    """Whether a vCPU's kvm_run page is still mapped, as the exits that view it ask before each
    use. ``owner`` names the vCPU in the error; ``keeper`` is what unmaps the page when it is
    freed (the vCPU's C struct): held here, so that only a close, which clears ``mapped``
    first, unmaps a page an exit may still read."""

    __slots__ = ("mapped", "owner", "_keeper")

    def __init__(self, owner: str, keeper: object = None) -> None:
        self.mapped = True
        self.owner = owner
        self._keeper = keeper

    def check(self) -> None:
        """Raise VcpuClosed once the page is unmapped."""
        if not self.mapped:
            raise VcpuClosed(f"{self.owner} is closed: its kvm_run page, which this exit's data and reply "
                             "viewed, is unmapped (detach() an exit to keep its data)")


DETACHED = RunPage("no vCPU")  # the "page" of exits that hold copies (detach, exit_from_dict): always there


class ViewsKvmRun:
    """An exit whose ``data`` views kvm_run (its dataclass has ``_view`` and ``_page``)."""

    __slots__ = ()

    @property
    def data(self) -> memoryview:
        """The exit's data in the kvm_run page (VcpuClosed once the vCPU is closed)."""
        self._page.check()
        return self._view
