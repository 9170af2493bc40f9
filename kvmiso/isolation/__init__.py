"""The kvm_mm model, pure logic over evidence (it runs no guest and opens no device): the kernel
table rebuilt from the live one, the RFC's mapping set, the 2022 ASI RFC's annotated allowlist and ASI's denylist, the access model, and
the check of each exit's observed path.

>>> from kvmiso.isolation import address_space, build_layout, check, load_access_model
>>> from kvmiso.observe.tracing.capture import Capture
>>> from kvmiso.session import capture_checked
>>> with Capture() as cap:            # needs root: tracefs for the log, BPF for the evidence
...     run = capture_checked(m, cap, "hello")
>>> space = address_space(build_layout(run.evidence), "rfc-v1")
>>> result = check(space, run.log, load_access_model())
>>> result.exits > 0, sorted(result.classes)
(True, ['fault', 'host_mm', 'kvm_mm', 'not_kvm_run', 'outside', 'unknown'])
"""

from .access import AccessModel, AccessModelError
from .accessfile import load_access_model
from .check import CheckError, check
from .checkresult import CheckResult
from .layout import Layout, Region, build_layout
from .mapset import (DEFAULT_SET, AnnotatedSpace, DenylistSpace, KvmAddressSpace, MapSetError, SharedTableError,
                     address_space)
from .framestore import ByteStore, GuestStore, PageTableError, SnapshotStore
from .pagetable import PageTable
from .policy import POLICIES, Policy
from .regionfile import load_regions, shipped_sets
from .render import model_summary, model_text, result_text

__all__ = [
    "AccessModel", "AccessModelError", "AnnotatedSpace", "ByteStore", "CheckError", "CheckResult", "DEFAULT_SET", "DenylistSpace",
    "GuestStore", "KvmAddressSpace", "Layout", "MapSetError", "POLICIES", "PageTable", "PageTableError", "Policy",
    "Region", "SharedTableError", "SnapshotStore", "address_space", "build_layout", "check", "load_access_model",
    "load_regions", "model_summary", "model_text", "result_text", "shipped_sets",
]
