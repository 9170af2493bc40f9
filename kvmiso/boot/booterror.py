"""The one exception of `kvmiso boot`."""

from __future__ import annotations

from ..exitstatus import CliError


class BootError(CliError):
    """Bad input or an unusable setup for ``kvmiso boot``: printed as one line, exit status 2.
    The message names the cause (a missing package, a module's dmesg line, the console's end)."""
