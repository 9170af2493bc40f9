"""Guest exceptions on the real /dev/kvm: the suite's ``exceptions`` payload takes #UD, #DE and
#GP at CPL0 and CPL3 and survives each, and the exception delivery kvm_pvm runs for them is in
the access model."""

import pytest

from kvmiso.guest import Machine, Outcome
from kvmiso.guest.suite import suite


@pytest.mark.parametrize("cpl", [0, 3])
def test_exceptions_payload_survives_ud_de_gp(kvm, cpl):
    """Each exception reaches crt0's hook with its vector and error code, the guest resumes after
    the faulting instruction, and the run ends in DONE: the outcome the suite expects."""
    with Machine("exceptions", mode="long", cpl=cpl, kvm=kvm) as m:
        r = m.run(timeout=10)
    assert r.outcome is Outcome.DONE, r.detail
    seen = [(a.value, b.value) for a, b in zip(r.reports[0::2], r.reports[1::2]) if a.tag == 1 and b.tag == 2]
    assert seen == [(6, 0), (0, 0), (13, 0)]  # #UD, #DE, #GP(0), in program order
    assert r.report(3) == 3


def test_the_suite_takes_exceptions_at_both_privilege_levels():
    labels = {e.label: e.expected for e in suite(hypercall_returns=False)}
    assert labels["exceptions/long"] is labels["exceptions/long/cpl3"] is Outcome.DONE
