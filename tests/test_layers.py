"""The package's shape, checked: one source for each constant the guests and the host share."""

from __future__ import annotations

import pytest

from kvmiso.guest import build, ucall


@pytest.mark.parametrize("mode", ["real", "protected", "long"])
def test_ucall_constants_are_the_guest_conventions(mode):
    # guests/lib/kvmiso.inc defines them for the assembler; the image's symbol table carries
    # the values the guest was really built with
    sym = build("hello", mode).symbols
    for name in ("PORT_CONSOLE", "PORT_UCALL", "UCALL_DONE", "UCALL_FAIL", "UCALL_REPORT", "UCALL_EXCEPTION"):
        assert getattr(ucall, name) == sym[name], name
