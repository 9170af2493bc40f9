"""The README's "Writing KVM tests" example, run as a user runs it: its test file, read from the
README, under pytest with kvmiso's plugin on the real /dev/kvm; and the failure the README shows
is what pytest prints when the host does not act at the sync."""

from __future__ import annotations

import re
from pathlib import Path

pytest_plugins = ["pytester"]

README = Path(__file__).resolve().parent.parent / "README.md"


def _section_blocks() -> tuple[str, list[str]]:
    """The section's Python block (the test file) and the lines of its text block (the failure)."""
    text = README.read_text()
    section = text[text.index("## Writing KVM tests"):]
    section = section[:section.index("\n## ", 1)]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    shown = re.search(r"```text\n(.*?)```", section, re.S).group(1)
    return code, shown.splitlines()


def test_the_readme_example_passes_in_every_mode(kvm, pytester):
    code, _ = _section_blocks()
    pytester.makepyfile(test_mailbox=code)
    r = pytester.runpytest("-p", "no:cacheprovider")
    r.assert_outcomes(passed=4)


def test_the_failure_the_readme_shows_is_what_pytest_prints(kvm, pytester):
    code, shown = _section_blocks()
    forgetful = "".join(line for line in code.splitlines(keepends=True) if "m.vm.write" not in line)
    assert forgetful != code
    pytester.makepyfile(test_mailbox=forgetful)
    r = pytester.runpytest("-p", "no:cacheprovider", "-k", "long-0")
    r.assert_outcomes(failed=1)
    missing = [line for line in shown if line not in r.stdout.lines]
    assert not missing, "\n".join(r.stdout.lines)
