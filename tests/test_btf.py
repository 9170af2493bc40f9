"""The running kernel's BTF FUNC records: a kernel function's parameters and their C types, read
from /sys/kernel/btf (vmlinux plus the split BTF of the KVM modules where KVM is modular)."""

import pytest

from kvmiso.observe.kernel.btf import BTF_DIR, Btf, BtfError


@pytest.fixture(scope="module")
def btf():
    if not (BTF_DIR / "vmlinux").exists():
        pytest.skip("this kernel exports no BTF (/sys/kernel/btf/vmlinux)")
    return Btf.running(tuple(sorted(p.name for p in BTF_DIR.glob("kvm*"))))


def _has_funcs(btf) -> bool:
    try:
        btf.func("kvm_vcpu_ioctl")
    except BtfError:
        return False
    return True


def test_a_kvm_function_prototype_names_its_structs(btf):
    if not _has_funcs(btf):
        pytest.skip("this kernel's BTF has no FUNC record for kvm_vcpu_ioctl (a build without them)")
    params = btf.func("kvm_vcpu_ioctl")  # virt/kvm/kvm_main.c: (struct file *filp, unsigned int ioctl, unsigned long arg)
    assert [(p.name, p.ctype, p.pointee) for p in params] == [
        ("filp", "struct file *", "file"), ("ioctl", "unsigned int", ""), ("arg", "long unsigned int", "")]
    first = btf.func("kvm_mmu_page_fault")[0]  # arch/x86/kvm/mmu/mmu.c: (struct kvm_vcpu *vcpu, gpa_t cr2_or_gpa, ...)
    assert (first.name, first.ctype, first.pointee) == ("vcpu", "struct kvm_vcpu *", "kvm_vcpu")
    assert btf.func("kvm_mmu_page_fault")[1].ctype == "gpa_t"  # a typedef keeps its name


def test_a_function_the_kernel_does_not_have_is_an_error(btf):
    with pytest.raises(BtfError, match="no function 'kvmiso_no_such_function'"):
        btf.func("kvmiso_no_such_function")
