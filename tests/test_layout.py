from pathlib import Path

import pytest

from kvmiso.guest import Machine
from kvmiso.isolation.layout import OBJECTS, build_layout, host_layout, parse_kallsyms
from kvmiso.isolation.mapset import KernelTable, MapSetError

FIXTURES = Path(__file__).parent / "fixtures" / "isolation"
KALLSYMS = (FIXTURES / "kallsyms.txt").read_text()  # recorded on the kvm_pvm host (6.18, no KALLSYMS_ALL)
FLAGS = "flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep nx pdpe1gb lm\n"


def test_sections_come_from_kallsyms_and_say_how():
    lay = build_layout(KALLSYMS, FLAGS, cpus=2, vendor="kvm_pvm")
    text = lay.region("text")
    assert (text.start, text.ranges[0][1]) == (0xFFFFFFFF81000000, 0xFFFFFFFF8220BB08)
    assert text.source == "kallsyms: _stext.._etext" and not text.modeled
    # this kernel exports neither __end_rodata nor _sdata: the end is derived, and says so
    assert lay.region("rodata").source == "kallsyms: __start_rodata..__start_init_stack (derived)"
    assert lay.region("bss").modeled
    assert lay.levels == 4 and lay.source == "/proc/kallsyms"
    assert lay.region("kernel_image").size == 1 << 30  # KASLR-configured KERNEL_IMAGE_SIZE
    assert lay.describe(lay.symbols.address("kvm_fast_pio") + 0x2B) == "kvm_fast_pio+0x2b (text)"
    # __pfx_ padding symbols never name a function
    assert lay.symbols.resolve(lay.symbols.address("kvm_fast_pio") - 1)[0] != "__pfx_kvm_fast_pio"


def test_objects_are_modeled_per_vendor_and_count():
    lay = build_layout(KALLSYMS, FLAGS, cpus=3, vendor="kvm_intel", vcpus=2)
    assert "vmcs" in lay.regions and "pvcs" not in lay.regions and "vmcb" not in lay.regions
    assert len(lay.region("vcpu_struct").ranges) == 2 and len(lay.region("percpu_areas").ranges) == 3
    objects = [r for r in lay.regions.values() if r.kind == "object"]
    assert all(r.modeled and r.source.startswith("modeled") for r in objects)
    spans = sorted(rg for r in objects for rg in r.ranges)
    assert all(a[1] < b[0] for a, b in zip(spans, spans[1:]))  # a guard page between neighbours
    for r in objects:
        area = next(o[1] for o in OBJECTS if o[0] == r.name)
        assert all(lay.region(area).contains(s) for s, _ in r.ranges)
    amd = build_layout(KALLSYMS, FLAGS, vendor="kvm_amd")
    assert {"vmcb", "msrpm", "iopm"} <= set(amd.regions) and "vmcs" not in amd.regions


def test_hidden_kallsyms_falls_back_to_the_documented_default():
    hidden = "".join(f"0000000000000000 {l.split()[1]} {l.split()[2]}\n" for l in KALLSYMS.splitlines())
    assert parse_kallsyms(hidden) is None
    lay = build_layout(hidden, FLAGS)
    assert lay.source.startswith("documented default layout")
    assert lay.region("text").start == 0xFFFFFFFF81000000 and lay.region("text").modeled
    assert lay.symbols is None and "kallsyms" in lay.notes[0]


def test_kallsyms_all_kernels_give_exact_sections():
    extra = ("ffffffff82c00000 D __end_rodata\nffffffff83000000 D _sdata\nffffffff83400000 D _edata\n"
             "0000000000000000 D __per_cpu_start\n000000000002e000 D __per_cpu_end\n"
             "ffffffff83a00000 B __bss_start\nffffffff83c00000 B __bss_stop\n")
    lay = build_layout(KALLSYMS + extra, FLAGS)
    assert lay.region("rodata").source == "kallsyms: __start_rodata..__end_rodata"
    assert lay.region("data").source == "kallsyms: _sdata.._edata"
    assert lay.region("bss").ranges == ((0xFFFFFFFF83A00000, 0xFFFFFFFF83C00000),) and not lay.region("bss").modeled
    # zero-based on x86-64 SMP: offsets, not addresses, so a note rather than a region
    assert "percpu_section" not in lay.regions and any("0x2e000 bytes of offsets" in n for n in lay.notes)
    assert any("built into the kernel" in n for n in lay.notes)


def test_module_kvm_and_a_512m_image():
    text = KALLSYMS + "ffffffffa0201000 t kvm_vcpu_ioctl\t[kvm]\nffffffffa0255000 t kvm_mmu_x\t[kvm]\n"
    lay = build_layout(text, FLAGS)
    assert lay.region("kvm_module").ranges == ((0xFFFFFFFFA0201000, 0xFFFFFFFFA0256000),)
    assert not any("built into the kernel" in n for n in lay.notes)
    assert lay.region("kernel_image").size == 512 << 20
    assert lay.region("modules").start == 0xFFFFFFFFA0000000


def test_five_level_is_detected_and_refused_by_the_4_level_model():
    lay = build_layout(KALLSYMS, FLAGS.replace("lm", "lm la57"))
    assert lay.levels == 5 and lay.region("direct_map").start == 0xFF11000000000000
    with pytest.raises(MapSetError, match="5-level"):
        KernelTable(lay)


def test_userspace_side_is_the_real_vm(kvm):
    with Machine("hello", mode="long", kvm=kvm) as m:
        lay = host_layout(m.vm)
        run = lay.region("kvm_run")
        assert run.ranges == ((m.vcpu._run_addr, m.vcpu._run_addr + kvm.vcpu_mmap_size),) and not run.modeled
        slot = m.vm.slots[0]
        assert lay.region("guest_memory").ranges == ((slot.host_addr, slot.host_addr + slot.size),)
        assert lay.find(slot.host_addr + 5).name == "guest_memory"
    if lay.symbols:  # root on this host: the sections are real
        assert lay.region("text").source == "kallsyms: _stext.._etext"
        assert "kvm_arch_vcpu_ioctl_run" in lay.symbols
