"""``kvmiso model``: the isolated address space of a fresh VM of this host (or of saved evidence):
regions, levels, sizes, and the share of the kernel mapped."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from ..exitstatus import EXIT_FAILED
from .options import RealFactsMissing, add_model_args, read_evidence_file, require_real, space_for_args


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The parser of ``kvmiso model``."""
    sp = subparsers.add_parser("model", help="the kvm_mm mapping set: regions, levels, sizes, share of the kernel mapped")
    add_model_args(sp)
    sp.add_argument("--json", action="store_true", help="print the model as JSON")
    return sp


def run(args: argparse.Namespace) -> int:
    """Print the model of a VM that has run here (or of --evidence); 1 when --require-real fails."""
    from ..guest import Machine
    from ..isolation import model_summary, model_text
    from ..session import machine_evidence

    if args.evidence:
        evidence, machine_ctx = read_evidence_file(args.evidence), contextlib.nullcontext(None)
    else:
        machine_ctx = Machine("hello", mode="long")
    with machine_ctx as m:
        if m is not None:
            m.run(timeout=5)  # a VM that has run: its MMU root, kvm_run page and vCPU thread exist
            evidence = machine_evidence(m)
        space = space_for_args(args, evidence, m)
    try:
        require_real(args, evidence, "model")
    except RealFactsMissing as e:
        print(f"kvmiso: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(model_summary(space), indent=2) if args.json else model_text(space))
    return 0
