"""Running guests under capture and handing what they showed to the check: the orchestration
between :mod:`kvmiso.guest`, :mod:`kvmiso.observe` and :mod:`kvmiso.isolation` (which runs no
guest itself). ``kvmiso report``'s whole picture of a host is :mod:`.hostreport`."""

from .watch import (EVIDENCE_EVERY_S, CapturedRun, WatchedProcess, WatchedVm, capture_checked, check_run, host_cpus,
                    layout_of, machine_evidence, measure_switches, resolve_chains, space_for, split_by_vm,
                    unread_evidence, watch_process)

__all__ = ["EVIDENCE_EVERY_S", "CapturedRun", "WatchedProcess", "WatchedVm", "capture_checked", "check_run", "host_cpus",
           "layout_of", "machine_evidence", "measure_switches", "resolve_chains", "space_for", "split_by_vm",
           "unread_evidence", "watch_process"]
