"""Reading kvmiso's TOML files (region sets, the access model): one loader, one error form
``FILE:LINE: message``, for a missing file, a directory, bytes that are not UTF-8 and TOML that
does not parse alike."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any


class TomlFileError(ValueError):
    """A TOML file kvmiso cannot use; the message names the file (and the line where known)."""


def load_toml(path: str | Path, what: str) -> tuple[dict[str, Any], str]:
    """(document, text) of ``path``; ``what`` names the file's role in errors ("region file")."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise TomlFileError(f"{path}: is a directory, not a {what}") from None
    except OSError as e:
        raise TomlFileError(f"{path}: cannot read the {what}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TomlFileError(f"{path}: not a {what}: byte {e.start} is not UTF-8 text") from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column \d+\)", str(e))
        raise TomlFileError(f"{path}:{m.group(1) if m else '?'}: not valid TOML: {e}") from None


def line_of(text: str, needle: str) -> int | None:
    """The first line of ``text`` (from 1) that contains ``needle``: where a TOML error is."""
    for n, line in enumerate(text.splitlines(), 1):
        if needle in line:
            return n
    return None


__all__ = ["TomlFileError", "line_of", "load_toml"]
