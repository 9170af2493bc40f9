"""Isolation policies as their patch series define them: when the CPU runs on the isolated
address space, what it maps, and what sends it back to the full kernel address space.

A policy's **window** is the part of a KVM_RUN it isolates. kvmiso finds it on each event's
kernel call chain: an event is inside when a frame of the chain is a function that only runs
after a VM exit and before the next VM entry (the vendor's ``handle_exit``, or its ``vcpu_run``
after the hardware exit, where ``kvm_exit`` fires: role ``exit-handler`` in the access model). Work outside the window (the VMM's ioctl
path, ``complete_userspace_io``, ``kvm_mmu_load`` before entry, the return to userspace) runs on
the full kernel address space by design and is not checked.

``rfc-v1``  KVM address space isolation RFC v1 (Alexandre Chartre et al., May 2019): an
            allowlist (kvm_mm maps what patches 19-27 copy); enter in ``vcpu_enter_guest`` just
            before VM entry (patch 04); leave at ``kvm_may_access_sensitive_data()`` call sites
            (patch 07: ``kvm_handle_page_fault``, ``kvm_arch_vcpu_put``,
            ``kvm_write_guest_virt_system``), on IRQ entry and at the end of ``vcpu_run``. A
            missing mapping inside the window faults (patch 24 logs it) and the handler then
            switches to the full address space and retries.
``asi``     Address Space Isolation, 2024-2025 series (Brendan Jackman): a denylist: everything
            the kernel maps except ``__GFP_SENSITIVE`` memory (GFP_USER pages) and the user half
            (the KVM class maps none, so guest memory reached through the VMM's mapping is out);
            entered in ``vmx_vcpu_enter_exit``/``svm_vcpu_enter_exit``, relaxed after the VM exit
            (CR3 unchanged), left on a kernel page fault (``asi_exit``, then the access is retried:
            by design, not an error), before a context switch and at the end of
            ``kvm_arch_vcpu_ioctl_run``; interrupts and NMIs stay restricted.
``asi-2022`` the 2022 RFC (Junaid Shahid, Ofir Weisse): an allowlist: all memory is sensitive
            unless the series marks it non-sensitive (globally: kernel text, rodata, annotated static
            and per-CPU variables, struct kvm, the vCPU and task structs ...; locally, for this VM's
            process only: kvm_run, pio_data, the emulator context, the shadow pages, memslots, the
            vCPU stack, the guest memory KVM maps: :mod:`.asi2022`, patch by patch). Entered in
            ``vmx_vcpu_enter_exit`` (patch 15), kept after the VM exit, left on a page fault on
            what it does not map (``asi_exit``, patch 35), before a context switch (patch 03) and
            at the end of ``vcpu_run`` (patch 46); interrupts and NMIs stay restricted.

The details and their citations are in :data:`POLICIES`; ``kvmiso model --json`` and every check
result name the policy and its sources.
"""

from __future__ import annotations

from dataclasses import dataclass

# Interrupt entry: the RFC switches back to the kernel address space there (patch 07/08).
IRQ_ENTRY = frozenset({"asm_common_interrupt", "common_interrupt", "asm_sysvec_apic_timer_interrupt",
                       "sysvec_apic_timer_interrupt", "irq_exit_rcu", "__irq_exit_rcu", "handle_softirqs"})
CONTEXT_SWITCH = frozenset({"__schedule", "schedule", "preempt_schedule", "preempt_schedule_common"})


@dataclass(frozen=True)
class Policy:
    """When the CPU runs isolated, what is mapped, and what switches it back.

    ``mapping``: ``allowlist`` (only what the policy names is mapped) or ``denylist`` (the full
    kernel table minus sensitive memory). ``builds``: how the space is made: ``kvm_mm`` (the
    RFC's copies of the kernel table at a level, :mod:`.mapset`), ``annotations`` (the pages of
    what the 2022 series marks non-sensitive, :mod:`.asi2022`) or ``denylist`` (:mod:`.denylist`).
    ``leave``: functions that switch to the full address space before they run (function ->
    why). ``miss_is_switch``: a page fault on unmapped memory is a designed switch (ASI's
    asi_exit), not a fault."""

    name: str
    title: str
    mapping: str
    builds: str
    enter: str
    leave_text: str
    leave: dict[str, str]
    irq_switches: bool
    miss_is_switch: bool
    before_entry_events: frozenset[str]
    cite: str

    def switch_at(self, function: str) -> str | None:
        """Why ``function`` runs on the full address space under this policy, or None."""
        if function in self.leave:
            return self.leave[function]
        if self.irq_switches and function in IRQ_ENTRY:
            return "interrupt entry switches to the kernel address space"
        if function in CONTEXT_SWITCH:
            return "context switch: the isolated address space is left before schedule()"
        return None


_RFC_LEAVE = {
    "kvm_handle_page_fault": "RFC patch 07: kvm_may_access_sensitive_data() before a guest page fault is handled",
    "kvm_arch_vcpu_put": "RFC patch 07: kvm_may_access_sensitive_data() when the vCPU is put (sched out)",
    "kvm_write_guest_virt_system": "RFC patch 07: kvm_may_access_sensitive_data() before writing guest memory",
}

POLICIES = {
    "rfc-v1": Policy(
        "rfc-v1", "KVM address space isolation RFC v1 (May 2019)", "allowlist", "kvm_mm",
        "vcpu_enter_guest(), just before VM entry (patch 04)",
        "kvm_may_access_sensitive_data() sites (patch 07), IRQ entry, the end of vcpu_run()",
        _RFC_LEAVE, irq_switches=True, miss_is_switch=False, before_entry_events=frozenset(),
        cite="[RFC KVM 00/27] KVM Address Space Isolation (Alexandre Chartre, Liran Alon, 2019-05-13): patch 04 "
             "(enter in vcpu_enter_guest before kvm_x86_ops->run), 06 (exit on IRQ entry), 07 "
             "(kvm_may_access_sensitive_data: kvm_handle_page_fault, kvm_arch_vcpu_put, "
             "kvm_write_guest_virt_system, end of vcpu_run), 24 (page fault handler: exit and retry, logged), "
             "19-27 (what kvm_mm maps); https://lore.kernel.org/lkml/"
             "1557758315-12667-1-git-send-email-alexandre.chartre@oracle.com/"),
    "asi": Policy(
        "asi", "Address Space Isolation, 2024-2025 series", "denylist", "denylist",
        "vmx_vcpu_enter_exit() / svm_vcpu_enter_exit() (asi_enter), relaxed after the VM exit",
        "a page fault on sensitive memory (asi_exit), a context switch, the end of vcpu_run(); "
        "interrupts stay restricted", {}, irq_switches=False, miss_is_switch=True,
        before_entry_events=frozenset({"kvm_entry"}),
        cite="Brendan Jackman, [PATCH 00/26] Address Space Isolation (ASI) 2024-07 "
             "(https://lore.kernel.org/all/20240712-asi-rfc-24-v1-0-144b319a40d8@google.com/) and RFC v2 "
             "2025-01 (https://lore.kernel.org/all/20250110-asi-rfc-v2-v2-0-8419288bc805@google.com/): "
             "asi_enter in vmx/svm_vcpu_enter_exit, asi_relax after the exit (CR3 unchanged), asi_exit on any "
             "kernel page fault, context switch and the end of kvm_arch_vcpu_ioctl_run; interrupts and NMIs stay "
             "restricted; GFP_USER (__GFP_SENSITIVE) unmapped; the KVM class maps no user half "
             "(asi_maps_user_addr() is false)"),
    "asi-2022": Policy(
        "asi-2022", "Address Space Isolation for KVM, 2022 RFC", "allowlist", "annotations",
        "vmx_vcpu_enter_exit() (asi_enter, patch 15), kept after the VM exit (asi_set_target_unrestricted)",
        "a page fault on memory it does not map (asi_exit, patch 35), a context switch (patch 03), the end of "
        "vcpu_run() (patch 46); interrupts and NMIs stay restricted", {}, irq_switches=False, miss_is_switch=True,
        before_entry_events=frozenset({"kvm_entry"}),
        cite="Junaid Shahid, Ofir Weisse, [RFC PATCH 00/47] Address Space Isolation for KVM (2022-02-23, "
             "https://lore.kernel.org/all/20220223052223.1202152-1-junaids@google.com/): all memory is sensitive "
             "unless marked (cover letter); globally non-sensitive: patches 10-12, 37-45; locally: 17-24, 33 (guest "
             "memory), 43-44, 47 (the vCPU stack); asi_enter in vmx_vcpu_enter_exit (15), asi_exit on a page "
             "fault (35), before schedule() (03) and at the end of vcpu_run (46); interrupts and NMIs stay "
             "restricted (04); the KVM class is registered on VMX only (15)"),
}


def policy(name: str) -> Policy:
    """The policy named ``name`` (``rfc-v1``, ``asi``, ``asi-2022``)."""
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; one of {', '.join(POLICIES)}") from None


__all__ = ["CONTEXT_SWITCH", "IRQ_ENTRY", "POLICIES", "Policy", "policy"]
