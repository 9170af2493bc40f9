"""Every Python example of the README and of docs/*.md runs as written, on the real /dev/kvm.

The rules (docs/install.md, "Examples that run"): a ```pycon block is a doctest (ELLIPSIS); a
```python block runs, and a ```text block under ``<!-- output -->`` right after it is what it must
print; the blocks of one page share one namespace, in order; a ```python block under
``<!-- example: pytest file -->`` is a test file whose tests must all pass under pytest (``, run
by tests/FILE.py`` hands it to that test; a ``kvm_deviation``'s xfail where its fact holds and a
``kvm_cap``'s skip where KVM lacks the capability count as passing). Other blocks are shown, not
run."""

from __future__ import annotations

import contextlib
import doctest
import io
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^(`{3,})(\S*)\s*$")
COMMENT = re.compile(r"^<!--\s*(.*?)\s*-->$")
RUN_BY = re.compile(r"run by (tests/\S+\.py)")
FLAGS = doctest.ELLIPSIS


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    comment: str  # the HTML comment right above the fence, if any
    output: str | None = None  # the <!-- output --> block that follows a python block

    @property
    def where(self) -> str:
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page
        return f"{page}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of ``page``, each with the comment above it; an output block is folded
    into the python block it follows."""
    lines = page.read_text().split("\n")
    found: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].rstrip() == m.group(1))
        above = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        c = COMMENT.match(above)
        block = Block(page, i + 1, m.group(2), "\n".join(lines[i + 1:end]) + "\n", c.group(1) if c else "")
        if block.comment == "output":
            assert found and found[-1].lang == "python" and found[-1].output is None, \
                f"{block.where}: an output block follows the python block it belongs to"
            found[-1].output = block.code
        else:
            found.append(block)
        i = end + 1
    return found


def _runnable(page: Path) -> list[Block]:
    return [b for b in blocks(page) if b.lang in ("python", "pycon") and not b.comment.startswith("example: pytest file")]


def _test_files() -> list[Block]:
    return [b for p in PAGES for b in blocks(p) if b.comment.startswith("example: pytest file")]


def run_block(block: Block, namespace: dict) -> None:
    """Run one block in ``namespace``; fail naming the page and line where it does not do what the
    page says."""
    if block.lang == "pycon":
        test = doctest.DocTestParser().get_doctest(block.code, namespace, block.where, str(block.page), block.line)
        out = io.StringIO()
        runner = doctest.DocTestRunner(optionflags=FLAGS)
        runner.run(test, out=out.write, clear_globs=False)
        assert not runner.failures, out.getvalue()
        return
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(block.code, block.where, "exec"), namespace)  # noqa: S102 - the example is the test
    if block.output is not None:
        checker = doctest.OutputChecker()
        assert checker.check_output(block.output, printed.getvalue(), FLAGS), \
            f"{block.where} printed\n{printed.getvalue()}which is not what the page shows:\n{block.output}"


@pytest.mark.parametrize("page", [p for p in PAGES if _runnable(p)], ids=lambda p: p.name)
def test_a_page_s_examples_run(kvm, page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an example that writes a file writes it here
    namespace: dict = {"__name__": "__example__"}
    for block in _runnable(page):
        run_block(block, namespace)


@pytest.mark.parametrize("block", _test_files(), ids=lambda b: b.where)
def test_a_test_file_on_a_page_passes(kvm, block, pytester):
    run_by = RUN_BY.search(block.comment)
    if run_by:
        # that test runs it (and checks more of the page); it must exist and read this page
        test = ROOT / run_by.group(1)
        assert test.is_file(), f"{block.where}: {run_by.group(1)} does not exist"
        assert block.page.name in test.read_text(), f"{run_by.group(1)} does not read {block.page.name}"
        return
    pytester.makepyfile(test_example=block.code)
    r = pytester.runpytest("-p", "no:cacheprovider", "-rxs")
    outcomes = r.parseoutcomes()
    assert outcomes.get("passed", 0) > 0 and set(outcomes) <= {"passed", "xfailed", "skipped", "seconds"}, \
        "\n".join(r.outlines)
    # the only xfails and skips are the plugin's: a deviation that names its fact, a missing capability
    others = [line for line in r.outlines if line.startswith(("XFAIL", "SKIPPED"))
              and "known deviation on this host" not in line and "is not available on this host" not in line]
    assert not others, "\n".join(r.outlines)


def test_the_pages_examples_are_found():
    # what the tests above run, counted, so that a change of fence or marker cannot make them run
    # nothing; and no example hides where it would not run
    runnable = [b for p in PAGES for b in _runnable(p)]
    assert {b.page.name for b in runnable} >= {"README.md", "python-api.md"}
    assert len(_test_files()) >= 2
    for p in PAGES:
        for b in blocks(p):
            if b.lang not in ("python", "pycon"):
                assert ">>> " not in b.code, f"{b.where}: a doctest in a ```{b.lang} block is not run: make it ```pycon"


def test_an_example_that_does_not_do_what_its_page_says_fails(tmp_path):
    # the runner itself: a wrong doctest output and a wrong printed output are failures
    page = tmp_path / "page.md"
    page.write_text("```pycon\n>>> 1 + 1\n3\n```\n\n```python\nprint('a')\n```\n\n<!-- output -->\n```text\nb\n```\n")
    wrong_doctest, wrong_print = blocks(page)
    assert wrong_print.output == "b\n"
    with pytest.raises(AssertionError, match="Expected:"):
        run_block(wrong_doctest, {})
    with pytest.raises(AssertionError, match="not what the page shows"):
        run_block(wrong_print, {})
