"""What a kvmiso command's end means to the shell: 0 done and passed, 1 done and failed (a
check that found faults, a suite with failures, a KVM error), 2 bad input (``CliError``).

Its own module, below ``cli``: command modules raise CliError without importing ``cli``, which
under ``python -m kvmiso.cli`` is ``__main__``, a second copy whose classes the first's ``except``
clauses would not match."""

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2


class CliError(Exception):
    """Bad input: printed as ``kvmiso: <message>``, exit status 2."""


__all__ = ["CliError", "EXIT_BAD_INPUT", "EXIT_FAILED"]
