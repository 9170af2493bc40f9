"""The layout from evidence: real objects where the running kernel showed them, modeled ones
(and said so) where it did not."""

from pathlib import Path

from kvmiso.isolation.layout import MODELED_OBJECTS, build_layout
from kvmiso.observe.kernel.evidence import Evidence, image_sections, read_evidence
from kvmiso.observe.kernel.kallsyms import parse_kallsyms

HERE = Path(__file__).parent / "fixtures"
KALLSYMS = (HERE / "isolation" / "kallsyms.txt").read_text()  # recorded on the kvm_pvm host (6.18, no KALLSYMS_ALL)
PORTIO = read_evidence(HERE / "evidence" / "portio.evidence.json")  # captured on the kvm_pvm host


def modeled(vendor="kvm_pvm", vcpus=1, cpus=2):
    ev = Evidence(kernel="6.18.44", vendor=vendor, source="no BPF: test", sections=image_sections(parse_kallsyms(KALLSYMS)))
    return build_layout(ev, vcpus=vcpus, cpus=cpus, user={"kvm_run": [(0x7F00_0000_0000, 0x7F00_0000_3000)],
                                                          "guest_memory": [(0x7E00_0000_0000, 0x7E00_0020_0000)]})


def test_real_objects_keep_their_address_size_and_source():
    lay = build_layout(PORTIO, cpus=2)
    assert lay.real and lay.modeled_objects == []
    pio = lay.region("pio_data")
    o = PORTIO.object("pio_data")
    assert (pio.start, pio.size, pio.source, pio.allocator) == (o.address, 4096, "bpf: vcpu->arch.pio_data", o.allocator)
    vcpu = lay.region("vcpu_struct")
    assert vcpu.size == PORTIO.object("vcpu_struct").size > 16 << 10  # BTF's sizeof(struct vcpu_pvm), not 2019's 16 KiB
    assert len(lay.region("percpu_area").ranges) == 2 and lay.region("percpu_area").per == "cpu"
    assert {r.name for r in lay.matching("bus:*")} >= {"bus:PIO", "bus:MMIO"}
    assert lay.region("guest_memory:0").kind == "user"
    # the direct map's base is the kernel's, with the source it was derived from
    assert lay.region("direct_map").start == PORTIO.page_offset_base and "page_offset_base" in lay.region("direct_map").source
    assert lay.find(pio.start + 8).name == "pio_data"


def test_without_evidence_every_object_is_modeled_and_says_so():
    lay = modeled("kvm_intel", vcpus=2, cpus=3)
    assert not lay.real and "modeled" in lay.source
    objects = [r for r in lay.regions.values() if r.kind == "object"]
    assert objects and all(r.modeled for r in objects)  # the flag says it; every rendering prints it
    assert set(lay.modeled_objects) >= {"vcpu_struct", "pio_data", "emulate_ctxt"}
    assert "vmcs" in lay.regions and "vmcb" not in lay.regions
    assert len(lay.region("vcpu_struct").ranges) == 2 and len(lay.region("percpu_area").ranges) == 3
    units = lay.region("percpu_area").ranges
    assert all(a[1] == b[0] for a, b in zip(units, units[1:]))  # the first chunk's units are contiguous
    assert units[0][0] % (2 << 20) == 0  # and alone in their 2 MiB: the RFC copies them at PMD level
    spans = sorted([rg for r in objects if r.name != "percpu_area" for rg in r.ranges] + [(units[0][0], units[-1][1])])
    assert all(a[1] < b[0] for a, b in zip(spans, spans[1:]))  # a guard page between neighbours
    assert all((s >> 21) != (units[-1][1] - 1) >> 21 for s, _ in spans if s >= units[-1][1])
    for r in objects:
        area = next(o[1] for o in MODELED_OBJECTS if o[0] == r.name)
        assert all(lay.region(area).contains(s) for s, _ in r.ranges)
    assert any("every object below is modeled" in n for n in lay.notes)


def test_sections_come_from_kallsyms_and_say_how():
    lay = modeled()
    text = lay.region("text")
    assert (text.start, text.ranges[0][1]) == (0xFFFFFFFF81000000, 0xFFFFFFFF8220BB08)
    assert text.source == "kallsyms: _stext.._etext" and not text.modeled
    syms = parse_kallsyms(KALLSYMS)
    a = syms.address("kvm_vcpu_ioctl")
    assert syms.resolve(a + 0x2B) == ("kvm_vcpu_ioctl", 0x2B)
    assert syms.resolve(a - 1)[0] != "__pfx_kvm_vcpu_ioctl"  # __pfx_ padding never names a function
    assert syms.code_size("kvm_vcpu_ioctl") > 0


def test_hidden_kallsyms_falls_back_to_the_documented_default():
    hidden = "".join(f"0000000000000000 {l.split()[1]} {l.split()[2]}\n" for l in KALLSYMS.splitlines())
    assert parse_kallsyms(hidden) is None
    lay = build_layout(Evidence(vendor="kvm_pvm"), cpus=1)
    assert lay.region("text").start == 0xFFFFFFFF81000000 and lay.region("text").modeled


def test_a_modules_per_cpu_offsets_do_not_stretch_its_span():
    """Debian's 6.1 lists a module's per-CPU variables at their offsets (0x35000): the module's
    span is its code and data in the module area only."""
    text = ("ffffffff81000000 T _stext\nffffffff82000000 T _etext\n"
            "0000000000035000 d kvm_running_vcpu\t[kvm]\nffffffffc0700000 t kvm_vcpu_ioctl\t[kvm]\n"
            "ffffffffc07b7000 d kvm_debugfs_dir\t[kvm]\n")
    syms = parse_kallsyms(text)
    assert syms.module_span("kvm") == (0xFFFFFFFFC0700000, 0xFFFFFFFFC07B8000)
