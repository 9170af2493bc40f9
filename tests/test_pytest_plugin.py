"""kvmiso's pytest plugin as a user's suite gets it: pytester runs small test files, on the real
/dev/kvm, with the plugin loaded through its entry point (nothing here registers it)."""

from __future__ import annotations

import pytest

from kvmiso.host import vendor_module

pytest_plugins = ["pytester"]


def test_the_fixtures_give_the_device_a_vm_and_machines(kvm, pytester):
    pytester.makepyfile("""
        from kvmiso.guest import Outcome

        def test_kvm(kvm):
            assert kvm.api_version == 12

        def test_vm(vm):
            assert vm.vcpus == [] and vm.check_extension("USER_MEMORY")

        def test_machine(machine):
            m = machine("hello", "long", cpl=3)
            assert m.run().raise_for_guest().console_text == "Hello from a kvmiso guest!\\n"
            assert machine("hlt").run().outcome is Outcome.HALT  # two machines, both closed after
    """)
    r = pytester.runpytest("-p", "no:cacheprovider")
    r.assert_outcomes(passed=3)


def test_a_failed_guest_assert_reads_as_a_failed_assert(kvm, pytester):
    pytester.makepyfile(test_guest='''
        from kvmiso.guest import Source

        GUEST = Source.asm("""
                .include "kvmiso.inc"
                .globl main
        main:   mov $0xaa, %eax
                GUEST_ASSERT_EQ %eax, $0xab
                ret
        """)

        def test_guest(machine):
            machine(GUEST).run().raise_for_guest()

        PRINTS = Source.asm(r"""
                .include "kvmiso.inc"
                .globl main
        main:   GUEST_PRINTF "before the sync\\n"
                GUEST_SYNC $1
                GUEST_PRINTF "after it\\n"
                GUEST_FAIL "stop"
        """)

        def test_prints(machine):
            m = machine(PRINTS, "long", cpl=3)
            m.run_until_sync()
            m.run().raise_for_guest()
    ''')
    r = pytester.runpytest("-p", "no:cacheprovider")
    r.assert_outcomes(failed=2)
    # the file and line are the test file's own, where the macro is written
    r.stdout.fnmatch_lines(["E *GuestAssertionError: test_guest.py:7: GUEST_ASSERT_EQ(%eax, $0xab) failed: "
                            "expected 0xab, got 0xaa (main+0x*)"])
    # a failed test shows what its guests printed, across every run of each machine
    r.stdout.fnmatch_lines(["E *GuestAssertionError: test_guest.py:20: GUEST_FAIL: stop (main+0x*)",
                            "*- guest console: source, long mode, CPL3 -*", "before the sync", "after it"])


def test_kvm_cap_skips_naming_the_missing_capability(kvm, pytester):
    absent = sorted(name for name, value in kvm.capabilities().items() if not value)
    if not absent:
        pytest.skip("this KVM has every capability kvmiso knows: none to be missing")
    pytester.makepyfile(f"""
        import pytest

        @pytest.mark.kvm_cap("IMMEDIATE_EXIT", "USER_MEMORY")
        def test_present(kvm):
            pass

        @pytest.mark.kvm_cap("IMMEDIATE_EXIT", {absent[0]!r})
        def test_absent():
            raise AssertionError("must not run")

        @pytest.mark.kvm_cap("NO_SUCH_THING")
        def test_misspelled():
            pass
    """)
    r = pytester.runpytest("-p", "no:cacheprovider", "-rsf")
    r.assert_outcomes(passed=1, skipped=1, errors=1)  # a misspelled capability is the test's error
    r.stdout.fnmatch_lines_random([f"SKIPPED * KVM_CAP_{absent[0]} (*) is not available on this host ({vendor_module()})",
                            "*kvm_cap: no KVM capability is named 'NO_SUCH_THING'*"])


def test_kvm_deviation_is_a_strict_xfail_where_the_fact_holds(kvm, pytester):
    here = vendor_module()
    other = "kvm_intel" if here != "kvm_intel" else "kvm_amd"
    pytester.makepyfile(f"""
        import pytest

        @pytest.mark.kvm_deviation({here!r}, "this KVM does it its own way")
        def test_deviates():
            assert False

        @pytest.mark.kvm_deviation({here!r}, "fixed since")
        def test_deviation_gone():
            pass

        @pytest.mark.kvm_deviation({other!r}, "not this host's")
        def test_elsewhere():
            assert False

        @pytest.mark.kvm_deviation(lambda kvm: kvm.api_version == 12, "a fact a callable decides")
        def test_callable():
            assert False

        @pytest.mark.kvm_deviation("cpl9_teleports", "no such fact")
        def test_unknown_fact():
            pass

        @pytest.mark.kvm_deviation({here!r}, "an assertion, not a broken test", raises=AssertionError)
        def test_broken_otherwise():
            raise KeyError("a typo")
    """)
    r = pytester.runpytest("-p", "no:cacheprovider", "-rxXf")
    r.assert_outcomes(xfailed=2, failed=3, errors=1)
    r.stdout.fnmatch_lines_random([
        f"XFAIL *test_deviates - known deviation on this host ({here}): this KVM does it its own way",
        f"[[]XPASS(strict)[]] known deviation on this host ({here}): fixed since",
        "FAILED *test_elsewhere*",
        "XFAIL *test_callable - known deviation on this host (<lambda>): a fact a callable decides",
        "*kvm_deviation: unknown fact 'cpl9_teleports'*",
        "FAILED *test_broken_otherwise*", "E       KeyError: 'a typo'",
    ])


def test_a_probed_fact_is_measured_on_this_host(kvm, pytester):
    # measured, not read from the module name: KVM's emulator runs CPL0 code (kvm_pvm), and a
    # CPL0 hypercall never comes back (kvm_pvm re-executes it)
    pytester.makepyfile("""
        import pytest

        @pytest.mark.kvm_deviation("cpl0_emulated", "CPL0 code is emulated here")
        def test_native_cpl0():
            assert False

        @pytest.mark.kvm_deviation("cpl0_hypercall_hangs", "KVM re-executes a CPL0 VMCALL for ever")
        def test_hypercall(machine):
            machine("hypercall", "long").run(timeout=1).raise_for_guest()
    """)
    r = pytester.runpytest("-p", "no:cacheprovider")
    from kvmiso.guest.probe import PROBE_INSNS, emulated_instructions, hypercall_returns

    emulated, hangs = emulated_instructions(kvm, "long", 0) >= PROBE_INSNS, not hypercall_returns(kvm)
    # a deviation this host lacks leaves the test as it is: assert False fails, the hypercall passes
    r.assert_outcomes(xfailed=emulated + hangs, failed=1 - emulated, passed=1 - hangs)


def test_only_a_missing_device_skips_and_require_kvm_fails_instead(pytester, monkeypatch):
    # the kvm fixture's rule, on a device path that does not exist (the real one is not touched)
    pytester.makepyfile("""
        from kvmiso.pytest_plugin import open_kvm

        def test_missing(tmp_path):
            open_kvm(str(tmp_path / "kvm"))
    """)
    monkeypatch.delenv("KVMISO_REQUIRE_KVM", raising=False)
    r = pytester.runpytest("-p", "no:cacheprovider", "-rs")
    r.assert_outcomes(skipped=1)
    r.stdout.fnmatch_lines(["SKIPPED * /*/kvm does not exist on this host"])
    monkeypatch.setenv("KVMISO_REQUIRE_KVM", "1")
    r = pytester.runpytest("-p", "no:cacheprovider")
    r.assert_outcomes(failed=1)
    r.stdout.fnmatch_lines(["*KVMISO_REQUIRE_KVM=1 but /*/kvm does not exist on this host"])
