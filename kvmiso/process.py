"""Stopping a process kvmiso started (a traced command, QEMU): SIGTERM first, SIGKILL if it
does not go, and reaped either way so no zombie is left behind."""

from __future__ import annotations

import subprocess


def stop(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM ``proc`` if it still runs, give it ``grace`` seconds, then SIGKILL; always reaped."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
