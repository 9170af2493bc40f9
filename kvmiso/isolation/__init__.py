"""The kvm_mm model: page tables, the host layout, the RFC's mapping set, and the exit check.

>>> from kvmiso.isolation import KvmAddressSpace, check, host_layout, load_handlers
>>> kas = KvmAddressSpace.default(host_layout())
>>> check(kas, log).classes
"""

from .check import CheckError, CheckResult, check, load_handlers, model_text, result_text
from .layout import Layout, Region, build_layout, host_layout
from .mapset import DEFAULT_SET, POLICIES, KvmAddressSpace, MapSetError, SharedTableError, load_regions
from .pagetable import ByteStore, GuestStore, PageTable, PageTableError

__all__ = [
    "ByteStore", "CheckError", "CheckResult", "DEFAULT_SET", "GuestStore", "KvmAddressSpace", "Layout",
    "MapSetError", "POLICIES", "PageTable", "PageTableError", "Region", "SharedTableError", "build_layout",
    "check", "host_layout", "load_handlers", "load_regions", "model_text", "result_text",
]
