"""What several subcommands share: their argument groups (the guest, another process, the
kvm_mm model) and what those arguments become (the checked guest mode, the address space, the
saved evidence). Bad input raises :class:`kvmiso.exitstatus.CliError`."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from ..exitstatus import CliError, positive_seconds
from ..guest.build import MODES, default_mode, payload_modes, payload_path
from ..interrupt import Interrupted
from ..observe.kernel.bpfprog import VERIFY_EVERY
from ..observe.tracing import TRACERS

if TYPE_CHECKING:
    from ..guest import Machine
    from ..isolation import KvmAddressSpace
    from ..isolation.mapset import DenylistSpace
    from ..observe.kernel.evidence import Evidence
    from ..session import WatchedProcess


def add_guest_args(sp: argparse.ArgumentParser) -> None:
    """--mode, --cpl and --timeout: how a payload runs."""
    sp.add_argument("--mode", choices=MODES, help="CPU mode (default: the payload's first declared mode)")
    sp.add_argument("--cpl", type=int, choices=(0, 3), default=0, help="privilege level (3: long mode only)")
    sp.add_argument("--timeout", type=positive_seconds, default=5.0,
                    help="seconds before the guest is stopped (default 5; positive and finite)")


def add_process_args(sp: argparse.ArgumentParser) -> None:
    """--pid, --duration and --tracer: watching another process (or a command given after --)."""
    sp.add_argument("--pid", type=int, help="watch the KVM vCPUs of a running process (QEMU, your VMM)")
    sp.add_argument("--duration", type=positive_seconds, metavar="S", help="with --pid or -- COMMAND: stop after S seconds (a COMMAND gets SIGTERM then)")
    sp.add_argument("--tracer", choices=TRACERS, help="with --pid or -- COMMAND: bpf (the default: "
                    "compact records, each call chain kept once in the kernel and walked where the exit's path is new "
                    f"and 1 in {VERIFY_EVERY} times after; tracefs where BPF is refused) or tracefs (every event's "
                    "chain walked and copied whole). docs/tracing.md measures them")
    sp.add_argument("--every-chain", action="store_true", help="with the bpf tracer: walk every event's call chain "
                    "(none inferred from its path; costs an exit-bound guest about 40%%)")


def add_model_args(sp: argparse.ArgumentParser) -> None:
    """--policy, --regions, --drop, --evidence and --require-real: which kvm_mm, on which facts."""
    sp.add_argument("--policy", default="rfc-v1", metavar="NAME",
                    help="rfc-v1 (the 2019 RFC's allowlist, the default), asi (2024-2025 denylist) or asi-2022")
    sp.add_argument("--regions", metavar="FILE.toml", help="change rfc-v1's mapping set with a TOML file, "
                    "or a shipped set by name (modern)")
    sp.add_argument("--drop", action="append", default=[], metavar="REGION", help="leave a default region out")
    sp.add_argument("--evidence", metavar="FILE", help="objects and page tables saved by kvmiso trace --evidence")
    sp.add_argument("--require-real", action="store_true",
                    help="fail when an address or page table had to be modeled (no BPF, not root)")


def warn_if_undeclared(payload: str, mode: str | None) -> None:
    """A --mode the payload does not declare runs anyway (the user may know better), but not
    silently: a payload written for long mode misbehaves in real mode."""
    declared = payload_modes(payload_path(payload))
    if mode is not None and mode not in declared:
        print(f"kvmiso: warning: {payload} declares {', '.join(declared)} mode only; running it in {mode} mode anyway",
              file=sys.stderr)


def check_cpl(payload: str, mode: str | None, cpl: int) -> None:
    """--cpl 3 runs in long mode only: bad input, said before a VM is made for ``payload``."""
    mode = mode or default_mode(payload)
    if cpl == 3 and mode != "long":
        raise CliError(f"CPL3 is available in long mode only, not in {mode} mode")


def space_for_args(args: argparse.Namespace, evidence: Evidence,
                   machine: Machine | None = None) -> KvmAddressSpace | DenylistSpace:
    """The isolated address space that --policy, --regions and --drop name, over ``evidence``."""
    from ..isolation import MapSetError
    from ..isolation.policy import POLICIES
    from ..session import layout_of, space_for

    if args.policy not in POLICIES:
        raise CliError(f"unknown policy {args.policy!r}; one of {', '.join(POLICIES)}")
    try:
        return space_for(layout_of(evidence, machine), args.policy, args.regions, tuple(args.drop))
    except MapSetError as e:
        raise CliError(str(e)) from None


class RealFactsMissing(Exception):
    """--require-real and a fact had to be modeled: status 1, one line naming it."""


def require_real(args: argparse.Namespace, evidence: Evidence, what: str) -> None:
    """--require-real: every fact the verdicts rest on must have been read, not modeled."""
    if args.require_real and not evidence.real:
        raise RealFactsMissing(f"{what}: --require-real, but the objects and page table are modeled "
                               f"({evidence.source or 'no evidence'})")


def read_evidence_file(path: str) -> Evidence:
    """The evidence saved at ``path`` (``kvmiso trace --evidence``); CliError where it cannot be read."""
    from ..observe.kernel.evidence import EvidenceError, read_evidence

    try:
        return read_evidence(path)
    except OSError as e:
        raise CliError(f"cannot read evidence {path}: {e.strerror}") from None
    except EvidenceError as e:
        raise CliError(str(e)) from None


def process_target(args: argparse.Namespace) -> int | list[str] | None:
    """--pid or -- COMMAND (one of them, with no payload), or None for a payload."""
    wanted = [x for x in (args.pid is not None, bool(args.command), bool(args.payload)) if x]
    if len(wanted) > 1:
        raise CliError("give a payload, --pid PID or -- COMMAND ..., one of them")
    if args.duration is not None and not (args.pid is not None or args.command):
        raise CliError("--duration is for --pid or -- COMMAND")
    if args.tracer is not None and not (args.pid is not None or args.command):
        raise CliError("--tracer is for --pid or -- COMMAND (a payload is traced through tracefs)")
    if args.every_chain and (args.tracer == "tracefs" or not (args.pid is not None or args.command)):
        raise CliError("--every-chain is for the bpf tracer of --pid or -- COMMAND (tracefs walks every chain)")
    if args.pid is not None:
        return args.pid
    return args.command or None


def watch(args: argparse.Namespace) -> tuple[WatchedProcess, Interrupted | None]:
    """The watched process, and the Interrupted that ended the watch (None if it ended by itself
    or at --duration): the caller reports what was seen, marked incomplete, then raises it."""
    from ..observe.foreign.vms import ProcessError
    from ..observe.tracing.tracefs import TracefsUnavailable
    from ..session import WatchedProcess, watch_process

    try:
        w, interrupted = watch_process(process_target(args), args.duration, tracer=args.tracer or TRACERS[0],
                                       every_chain=args.every_chain), None
    except ProcessError as e:
        raise CliError(str(e)) from None
    except TracefsUnavailable as e:
        # what a user with /dev/kvm alone can still do (the kvm group case the README describes)
        still = "; without root, run, trace PAYLOAD (its exits to userspace), bench and model still work"
        raise CliError(f"cannot watch another process: {e}{still if os.geteuid() else ''}") from None
    except Interrupted as e:
        if not isinstance(e.partial, WatchedProcess):
            raise
        w, interrupted = e.partial, e
    if w.attached.tracer_note:
        print(f"kvmiso: {w.attached.tracer_note}", file=sys.stderr)
    if w.left_running:  # a wrapper's VMM, a daemon: gone with the watch, and not silently
        print(f"kvmiso: the command ended leaving {', '.join(w.left_running)} running: stopped", file=sys.stderr)
    return w, interrupted
