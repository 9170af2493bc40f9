#!/usr/bin/env python3
"""User-space instructions per KVM_RUN round trip, or per fuzz payload, counted by
`valgrind --tool=callgrind` (apt-get install valgrind). Instruction counts repeat from run to run
on a busy host, where wall-clock times do not; the guest and the kernel are not counted, only
what the harness itself executes.

Each figure is the difference of two runs, N1 and N2 iterations, divided by N2 - N1, so start-up
and teardown cancel out.

    python3 scripts/count_instructions.py                         # every userspace-exit kind
    python3 scripts/count_instructions.py --kinds out --paths run c
    python3 scripts/count_instructions.py --fuzz long real         # per fuzz payload

Paths: ``run`` is a bare loop of ``Vcpu.run()`` (answering INs and MMIO reads), ``python`` the
bench's timed Python loop, ``c`` the compiled loop.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

EXIT_LOOP = """
import sys
from kvmiso.bench import runloop
from kvmiso.bench.kinds import KINDS
from kvmiso.guest import Machine, build
kind, path, n = KINDS[sys.argv[1]], sys.argv[2], int(sys.argv[3])
image = build(kind.guest, "long")
with Machine(image) as m:
    port = image.symbols["PORT_BENCH"] if kind.exit == "io" else None
    if path == "run":
        def loop(run, n, reply):
            for _ in range(n):
                e = run()
                if reply:
                    e.reply(reply)
        loop(m.vcpu.run, n, kind.reply)
    elif path == "python":
        runloop.python_loop(m.vcpu, n, kind.exit, port, reply=kind.reply)
    else:
        runloop.compiled_loop(m.vcpu, n, kind.exit, port, reply=kind.reply)
"""

FUZZ_LOOP = """
import sys
from kvmiso.guest.fuzz import Fuzzer
with Fuzzer(sys.argv[1]) as f:
    f.run_many(20, seed=1)  # warm-up
    f.run_many(int(sys.argv[3]), seed=20261124)
"""


def instructions(code: str, args: list[str]) -> int:
    """Instructions callgrind counted for one run of ``code`` with ``args``."""
    with tempfile.TemporaryDirectory(prefix="kvmiso-callgrind-") as tmp:
        out = os.path.join(tmp, "callgrind.out")
        p = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
                            "-c", code, *args], capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"kvmiso: the run under callgrind failed:\n{p.stderr.strip()[-2000:]}")
        with open(out) as f:
            m = re.search(r"^summary: (\d+)", f.read(), re.M)
    if m is None:
        raise SystemExit("kvmiso: callgrind wrote no summary line")
    return int(m.group(1))


def per_iteration(code: str, what: list[str], n1: int, n2: int) -> float:
    return (instructions(code, [*what, str(n2)]) - instructions(code, [*what, str(n1)])) / (n2 - n1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kinds", default="out,in,mmio_write,mmio_read,hlt", help="exit kinds (comma-separated)")
    ap.add_argument("--paths", nargs="+", choices=("run", "python", "c"), default=["run", "python", "c"])
    ap.add_argument("--n", nargs=2, type=int, default=(2000, 12000), metavar=("N1", "N2"))
    ap.add_argument("--fuzz", nargs="+", metavar="TARGET", help="count per fuzz payload instead (N1, N2 payloads)")
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("kvmiso: valgrind not found: apt-get install valgrind")
    n1, n2 = args.n
    if n2 <= n1:
        raise SystemExit("kvmiso: --n needs N1 < N2")
    if args.fuzz:
        for target in args.fuzz:
            print(f"fuzz {target:<10} {per_iteration(FUZZ_LOOP, [target, '-'], n1, n2):12,.0f} instructions per payload")
        return 0
    for kind in args.kinds.split(","):
        for path in args.paths:
            print(f"{kind:<11} {path:<7} {per_iteration(EXIT_LOOP, [kind, path], n1, n2):10,.0f} instructions per round trip")
    return 0


if __name__ == "__main__":
    sys.exit(main())
