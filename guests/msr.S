# RDMSR/WRMSR: one MSR KVM handles in the kernel (IA32_SYSENTER_CS), and one it does not know
# (0x474f4f00, as the KVM selftests use), which goes to userspace when KVM_CAP_X86_USER_SPACE_MSR is enabled. CPL0 only.
# modes: long protected
        .include "kvmiso.inc"
        .set MSR_SYSENTER_CS, 0x174
        .set MSR_UNKNOWN, 0x474f4f00
        .text
        .globl main
main:
        mov $MSR_SYSENTER_CS, %ecx
        mov $0x10, %eax
        xor %edx, %edx
        wrmsr
        xor %eax, %eax
        rdmsr
        mov %eax, %ebx
        REPORT 1, %ebx          # 0x10: the in-kernel MSR round trip
        mov $MSR_UNKNOWN, %ecx
        rdmsr                   # answered by the host
        mov %eax, %ebx
        REPORT 2, %ebx
        mov $MSR_UNKNOWN, %ecx
        mov $0xcafe, %eax
        xor %edx, %edx
        wrmsr                   # seen by the host
        ret
