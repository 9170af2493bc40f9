"""What a kvmiso command's end means to the shell: 0 done and passed, 1 done and failed (a
check that found faults, a suite with failures, a KVM error), 2 bad input (``CliError``).

Its own module, below ``cli``: command modules raise CliError without importing ``cli``, which
under ``python -m kvmiso.cli`` is ``__main__``, a second copy whose classes the first's ``except``
clauses would not match. Arguments that every command reads alike are checked here too, so that
a bad one is bad input (status 2) in every command that takes it."""

import argparse
import math

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2


class CliError(Exception):
    """Bad input: printed as ``kvmiso: <message>``, exit status 2."""


MAX_TIMEOUT = 86400.0  # a day: beyond it a deadline is not a deadline


def positive_seconds(text: str) -> float:
    """``--timeout`` and ``--duration`` (argparse's ``type``): a positive, finite number of
    seconds up to a day (a deadline already past races the guest; the timer behind one cannot
    wait forever)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0 or value > MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds up to {MAX_TIMEOUT:g}, not {text}")
    return value


__all__ = ["CliError", "EXIT_BAD_INPUT", "EXIT_FAILED", "MAX_TIMEOUT", "positive_seconds"]
