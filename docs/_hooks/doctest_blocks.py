"""MkDocs hook: docstring examples shown as code.

Markdown reads a line that starts with ``>`` as a quote, so a doctest (``>>> ...`` up to the next
blank line) in a docstring would show as three nested quotes in the API reference. This hook adds
a Markdown preprocessor, to the pages and to mkdocstrings' rendering of docstrings alike, that
puts each such block outside a fenced block into a ``pycon`` fence, as pydoc and Sphinx show it.
"""

from __future__ import annotations

import re

from markdown import Extension, Markdown
from markdown.preprocessors import Preprocessor

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
PROMPT = re.compile(r"^ {0,3}>>> ")


class DoctestBlocks(Preprocessor):
    """Fence every doctest block that is not already in a fenced block."""

    def run(self, lines: list[str]) -> list[str]:
        out: list[str] = []
        fence = None  # the fence of the code block we are in, if any
        indent = None  # the indent of the doctest block we are in, if any
        for line in lines:
            if indent is not None:
                if line.strip():
                    out.append(line[indent:] if line[:indent].isspace() else line.lstrip(" "))
                    continue
                out.append("```")
                indent = None
            m = FENCE.match(line)
            if fence is None and m:
                fence = m.group(1)
            elif fence is not None and line.strip() == fence:
                fence = None
            elif fence is None and PROMPT.match(line):
                if out and out[-1].strip():
                    out.append("")
                out.append("```pycon")
                indent = len(line) - len(line.lstrip(" "))
                line = line[indent:]
            out.append(line)
        if indent is not None:
            out.append("```")
        return out


class DoctestBlocksExtension(Extension):
    def extendMarkdown(self, md: Markdown) -> None:  # noqa: N802 - Markdown's name
        # before fenced_code (25), which then reads the fences this adds
        md.preprocessors.register(DoctestBlocks(md), "kvmiso_doctest_blocks", 27)


def on_config(config):
    """Add the extension to the pages' Markdown, a list mkdocstrings hands to its own."""
    config.markdown_extensions.append(DoctestBlocksExtension())
    return config
