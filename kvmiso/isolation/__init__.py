"""The kvm_mm model, pure logic over evidence (it runs no guest and opens no device): the kernel
table rebuilt from the live one, the RFC's mapping set, the 2022 ASI RFC's annotated allowlist and ASI's denylist, the access model, and
the check of each exit's observed path.

>>> from kvmiso.isolation import address_space, build_layout, check, load_access_model
>>> space = address_space(build_layout(evidence), "rfc-v1")
>>> check(space, log, load_access_model()).classes
"""

from .access import AccessModel, AccessModelError, load_access_model
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
