"""Running guests under capture and handing what they showed to the check: the orchestration
between :mod:`kvmiso.guest`, :mod:`kvmiso.observe` and :mod:`kvmiso.isolation` (which runs no
guest itself). A Machine run under capture is :mod:`.capture`'s, the check of what it showed
:mod:`.modelcheck`'s, another process's VMs watched :mod:`.watch`'s, and ``kvmiso report``'s
whole picture of a host :mod:`.hostreport`'s (not re-exported here: it drives the benchmark too).
Inside a recorded boot, :mod:`.recording` runs the suite behind an access record, and
:mod:`.measuredcheck` checks that record's exits against the model (``check --measured``).

>>> from kvmiso import Machine
>>> from kvmiso.observe.tracing.capture import Capture
>>> with Capture() as cap, Machine("portio", kvm=kvm) as portio:   # needs root: tracefs and BPF
...     run = capture_checked(portio, cap, "portio")
>>> result = check_run(run, "rfc-v1")
>>> result.runs, result.exits == sum(result.classes[c] for c in ("kvm_mm", "host_mm", "fault", "unknown"))
(7, True)

(On kvm_pvm, 6.18.44-fc-v1300, all 24 exits checked fault, and ``result.fault_lines()[0]`` is
``kvm_mm miss #0 on ... (emulate_ctxt) attributed at x86_decode_emulated_instruction+0x36/0xb0,
first access in init_emulate_ctxt: 24 exits``.)
"""

from .capture import CapturedRun, RunCapture, capture, capture_checked, capture_run, machine_evidence
from .modelcheck import check_run, host_cpus, layout_of, measure_switches, space_for
from .watch import (EVIDENCE_EVERY_S, WatchedProcess, WatchedVm, resolve_chains, split_by_vm, unread_evidence,
                    watch_process)

__all__ = ["EVIDENCE_EVERY_S", "CapturedRun", "RunCapture", "WatchedProcess", "WatchedVm", "capture", "capture_checked",
           "capture_run", "check_run", "host_cpus", "layout_of", "machine_evidence", "measure_switches",
           "resolve_chains", "space_for", "split_by_vm", "unread_evidence", "watch_process"]
