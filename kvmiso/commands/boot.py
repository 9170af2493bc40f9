"""``kvmiso boot``: a kernel in QEMU with this host's files, running one command there (kvm_amd
anywhere, under TCG, and kernels under development)."""

from __future__ import annotations

import argparse
import sys

from ..exitstatus import positive_seconds
from ..output import writable_dir
from ..boot.booterror import BootError
from ..boot.kernel import debian_kernel, user_kernel
from ..boot.run import DEFAULT_MEMORY_MIB, boot


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The parser of ``kvmiso boot``."""
    sp = subparsers.add_parser("boot", help="run a command in a kernel under QEMU with this host's files (kvm_amd anywhere)")
    sp.add_argument("--kernel", default="debian", metavar="PATH|debian",
                    help="a bzImage you built, or 'debian' for Debian's kernel package, fetched once into the cache (default)")
    sp.add_argument("--modules-dir", metavar="DIR", help="the kernel's lib/modules/RELEASE folder (default /lib/modules/RELEASE)")
    sp.add_argument("--modules", action="append", default=[], metavar="NAME[,NAME]",
                    help="more modules to load in the guest, after the vendor module")
    sp.add_argument("--cpu", metavar="MODEL", help="QEMU's -cpu model (default: max,la57=off under TCG, host under KVM)")
    sp.add_argument("--accel", choices=("auto", "tcg", "kvm"), default="auto",
                    help="KVM when this host's kvm_amd/kvm_intel nests, else TCG (default auto)")
    sp.add_argument("--memory", type=int, default=DEFAULT_MEMORY_MIB, metavar="MIB", help="guest memory (default %(default)s)")
    sp.add_argument("--timeout", type=positive_seconds, default=300.0, metavar="S",
                    help="seconds for the guest to come up and start the command (default %(default)g)")
    sp.add_argument("--console", action="store_true", help="show the guest's console (kernel messages) on stderr")
    sp.add_argument("--record-accesses", metavar="DIR", help="record every data access of the guest kernel's KVM "
                    "per exit it handles, into DIR (TCG; QEMU 7.2)")
    sp.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG ...], run in the same working directory")
    return sp


def run(args: argparse.Namespace) -> int:
    """Exit with the command's own status; a guest that cannot run it is a BootError (2)."""
    argv = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not argv:
        raise BootError("no command given: kvmiso boot [options] -- COMMAND ...")
    if args.memory < 256:
        raise BootError("--memory must be at least 256 MiB")
    say = lambda text: print(text, file=sys.stderr)  # noqa: E731 - progress goes beside the command's output
    kernel = debian_kernel(log=say) if args.kernel == "debian" else user_kernel(args.kernel, args.modules_dir)
    modules = [m for group in args.modules for m in group.split(",") if m]
    result = boot(argv, kernel, cpu=args.cpu, accel=args.accel, modules=modules, timeout=args.timeout,
                  memory_mib=args.memory, show_console=args.console, log=say,
                  record_dir=writable_dir(args.record_accesses, "the access record") if args.record_accesses else None)
    return result.status
