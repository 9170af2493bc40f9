"""The access record of `kvmiso boot --record-accesses DIR`: a QEMU TCG plugin (accesses.c)
that writes down every data access of the guest kernel's KVM while it handles an exit of its
own guest, one file per vCPU; :mod:`kvmiso.observe.accesses.accessrecord` reads them back.
"""

from .plugin import DEFAULT_CAP, SUPPORTED_QEMU, build_plugin, check_qemu, clear_record, plugin_argument

__all__ = ["DEFAULT_CAP", "SUPPORTED_QEMU", "build_plugin", "check_qemu", "clear_record", "plugin_argument"]
