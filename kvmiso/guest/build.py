"""Assemble guest payloads (guests/*.S) with GNU as and ld into flat images, cached by content.

A ``.S`` payload goes through the C preprocessor first, with ``guests/lib/kvmiso.h`` included
before its first line: that is what gives GUEST_ASSERT and the rest their file and line. A ``.s``
file is assembled as it is; a ``.c`` file (long mode) is compiled freestanding. Guest code may
also be written beside the test, as a :class:`Source`.

The cache key is the hash of everything that goes into an image: the payload source and the name
it is known by, the shared includes, crt0, the linker script, the mode and the tools' versions. A
changed source therefore rebuilds; an unchanged one is read back from ``$XDG_CACHE_HOME/kvmiso`` (or a
private temporary folder, said once, where no cache folder can be made).
"""

from __future__ import annotations

import atexit
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path


def _guests_dir() -> Path:
    """guests/ inside the installed package (a wheel: setup.py copies it there), else guests/
    at the top of the checkout (an editable install or a source tree)."""
    installed = Path(__file__).resolve().parents[1] / "guests"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[2] / "guests"


GUESTS_DIR = _guests_dir()
LIB_DIR = GUESTS_DIR / "lib"
LOAD_ADDRESS = 0x8000
MAX_IMAGE = 0x8000  # up to the host's tables at 0x10000
BITS = {"real": 16, "protected": 32, "long": 64}
MODES = tuple(BITS)
HEADER = "kvmiso.h"  # included before the first line of every .S and C payload


class BuildError(RuntimeError):
    """A payload did not assemble or link; the message carries the tool's own output."""


@dataclass(frozen=True)
class Image:
    """A flat guest image: ``code`` loads at ``load_address``; ``symbols`` from the ELF, with
    their nm types (``T`` global text, ``a`` a local absolute value, ...) in ``symbol_types``."""

    name: str
    mode: str
    code: bytes
    symbols: dict[str, int]
    load_address: int = LOAD_ADDRESS
    symbol_types: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def entry(self) -> int:
        """The guest-physical address of ``_start`` (crt0's entry)."""
        return self.symbols["_start"]

    def symbolize(self, address: int) -> str | None:
        """``address`` as the nearest label of the image at or below it, plus the offset:

        >>> build("hello", "long").symbolize(0x8244)
        'main+0x4'

        None outside the image. Absolute values the payload sets (``PORT_UCALL``) are no labels;
        of two labels at one address the global one wins (``main`` over a local alias)."""
        if not self.load_address <= address < self.load_address + len(self.code):
            return None
        best: tuple[int, bool, str] | None = None
        for name, value in self.symbols.items():
            kind = self.symbol_types.get(name, "t")
            if kind in "aA" or not self.load_address <= value <= address:
                continue
            key = (value, kind.isupper(), name)
            if best is None or key[:2] > best[:2]:
                best = key
        if best is None:
            return None
        off = address - best[0]
        return f"{best[2]}+{off:#x}" if off else best[2]


def payload_path(name_or_path: str | os.PathLike) -> Path:
    """A payload name from guests/ (``hello``) or a path to a .S, .s or .c file."""
    p = Path(name_or_path)
    if p.suffix in (".S", ".s", ".c") or p.exists():
        if not p.is_file():
            raise BuildError(f"payload {p}: no such file")
        return p.resolve()
    candidate = GUESTS_DIR / f"{name_or_path}.S"
    if not candidate.is_file():
        known = ", ".join(available_payloads())
        raise BuildError(f"unknown payload {name_or_path!r}; guests/ has: {known}")
    return candidate


def available_payloads() -> list[str]:
    """The payload names guests/ ships (``hello``, ``portio``, ...)."""
    return sorted(p.stem for p in GUESTS_DIR.glob("*.S"))


def payload_modes(path: Path) -> tuple[str, ...]:
    """The modes a payload declares on a ``modes:`` line (the first is its default); every mode
    when it declares none (long mode only for C). BuildError names the file when it is not text
    or names a mode that does not exist."""
    return _declared_modes(_source_text(path), str(path), c=path.suffix == ".c")


def default_mode(payload: str | os.PathLike | Source) -> str:
    """The mode a payload runs in when none is asked for: the first it declares."""
    if isinstance(payload, Source):
        return payload.modes[0]
    return payload_modes(payload_path(payload))[0]


def _declared_modes(text: str, where: str, c: bool = False) -> tuple[str, ...]:
    m = re.search(r"modes:[ \t]*([^\n]*)", text)
    if not m:
        return ("long",) if c else MODES
    declared = tuple(w.lower() for w in re.findall(r"[A-Za-z]+", m.group(1)))
    bad = [w for w in declared if w not in BITS]
    if bad or not declared:
        raise BuildError(f"payload {where}: its modes: line names {', '.join(bad) or 'no mode'}; "
                         f"modes are {', '.join(MODES)}")
    return declared


def _source_text(path: Path) -> str:
    try:
        return path.read_text()
    except UnicodeDecodeError as e:
        raise BuildError(f"payload {path}: not a text file (byte {e.start} is not UTF-8): "
                         "a payload is GNU as source") from None
    except OSError as e:
        raise BuildError(f"payload {path}: cannot read: {e.strerror}") from None


def cache_root() -> Path:
    """kvmiso's cache folder, made if needed: ``$XDG_CACHE_HOME/kvmiso``, or ``~/.cache/kvmiso``;
    where that cannot be made (a service user's HOME=/nonexistent), a private temporary folder."""
    try:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvmiso"
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return _private_cache(f"{e.filename}: {e.strerror}")
    except RuntimeError:  # Path.home(): no HOME and no passwd entry
        return _private_cache("no home directory")
    if not os.access(root, os.W_OK | os.X_OK):
        return _private_cache(f"{root}: not writable")
    return root


_private: list[Path] = []  # this process's private cache, once made
_private_lock = threading.Lock()  # fuzz jobs build from several threads


def _private_cache(why: str) -> Path:
    """One private cache folder for this process, removed at its exit and announced once on
    stderr (a command that cannot keep its builds still runs; it says why it rebuilds)."""
    with _private_lock:
        if not _private:
            _private.append(Path(tempfile.mkdtemp(prefix="kvmiso-cache-")))
            atexit.register(shutil.rmtree, _private[0], ignore_errors=True)
            print(f"kvmiso: warning: no writable cache folder ({why}); building into {_private[0]}, removed at exit "
                  "(set XDG_CACHE_HOME to keep the builds)", file=sys.stderr)
        return _private[0]


@dataclass(frozen=True)
class Source:
    """Guest code written beside the test instead of in a file of its own: assembly that reads as
    a ``.S`` payload does (``Source.asm``), or C for long mode (``Source.c``). ``file`` and ``line``
    say where the text is written, so a GUEST_ASSERT in it names the test file's own line:

    >>> GUEST = Source.asm('''
    ...         .include "kvmiso.inc"
    ...         .globl main
    ... main:   GUEST_ASSERT_EQ %eax, $0
    ...         ret
    ... ''')
    >>> from kvmiso import Machine
    >>> with Machine(GUEST, mode="long", kvm=kvm) as g:
    ...     print(g.run().outcome)
    done

    The text is found in the calling file to learn its line; where it is not there as written
    (a string with escapes that Python turned into other characters), ``file`` is None and the
    lines are counted in the text, under the name ``name``. Write the text as a raw string
    (r'''...''') when it holds a backslash, as a printf format's \\n does."""

    text: str
    lang: str = "asm"  # "asm": preprocessed as a .S file is; "c": compiled freestanding (long mode)
    name: str = "source"
    file: str | None = None
    line: int = 1

    @classmethod
    def asm(cls, text: str, name: str = "source") -> "Source":
        """Assembly, with the file and line of the caller's string."""
        return cls(text, "asm", name, *_written_at(text, sys._getframe(1)))

    @classmethod
    def c(cls, text: str, name: str = "source") -> "Source":
        """C for long mode (``void main(void)``), with the file and line of the caller's string."""
        return cls(text, "c", name, *_written_at(text, sys._getframe(1)))

    @property
    def modes(self) -> tuple[str, ...]:
        """The modes its ``modes:`` line declares, else every mode (long mode only for C)."""
        return _declared_modes(self.text, self.file or self.name, c=self.lang == "c")

    def numbered(self) -> str:
        """The text after a ``#line`` directive naming where it is written: what the compiler sees."""
        return f'#line {self.line} "{self.file or self.name}"\n{self.text}'


def _written_at(text: str, frame) -> tuple[str | None, int]:
    """The file holding ``text`` as written (the caller's, relative to the working directory
    when below it) and the line ``text`` starts on; (None, 1) when it is not there once."""
    path = frame.f_code.co_filename
    try:
        content = Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return None, 1
    at = content.find(text)
    if at < 0 or content.find(text, at + 1) >= 0:
        return None, 1
    return _display(Path(path)), content.count("\n", 0, at) + 1


def _display(path: Path) -> str:
    """The name a source is known by in its images (``__FILE__``): relative to the working
    directory when below it, as a test run from the checkout names it, else absolute."""
    path = path.resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# C payloads: freestanding, at a fixed address, with no red zone (crt0's exception stubs push
# on the same stack at CPL0) and no SSE (KVM's emulator runs CPL0 code on kvm_pvm).
C_FLAGS = ("-std=gnu11", "-O2", "-ffreestanding", "-fno-pic", "-fno-pie", "-fno-stack-protector",
           "-mno-red-zone", "-mgeneral-regs-only", "-fcf-protection=none", "-fno-asynchronous-unwind-tables",
           "-fno-builtin", "-Wall")


def build(payload: str | os.PathLike | Source, mode: str = "long", cache_dir: Path | None = None) -> Image:
    """Build (or fetch from the cache) the image of ``payload`` for ``mode``: a name from guests/,
    a path to a .S, .s or .c file, or a :class:`Source`."""
    if mode not in BITS:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if isinstance(payload, Source):
        name, lang, text = payload.name, payload.lang, payload.numbered().encode()
        where = Path(payload.file).resolve().parent if payload.file else None
    else:
        src = payload_path(payload)
        name, text, where = src.stem, src.read_bytes(), src.parent
        lang = {".c": "c", ".s": "raw"}.get(src.suffix, "asm")
        if lang != "raw":  # the preprocessor names the file as it was given: the path shown
            text = _display(src).encode() + b"\0" + text
    if lang == "c" and mode != "long":
        raise BuildError(f"{name}: a C payload runs in long mode only, not in {mode} mode")
    # every include the assembler can find counts: the shared ones and those beside the source
    includes = sorted({*LIB_DIR.glob("*.inc"), *LIB_DIR.glob("*.h"), *(where.glob("*.inc") if where else ())})
    inputs = [*includes, LIB_DIR / f"crt0_{BITS[mode]}.S", LIB_DIR / "guest.ld"]
    h = hashlib.sha256(f"{mode}\0{lang}\0{_tool_versions()}\0".encode() + text)
    for p in inputs:
        h.update(p.read_bytes())
    key = h.hexdigest()[:24]
    cache = cache_dir or cache_root() / "guests"
    bin_path, sym_path = cache / f"{name}-{mode}-{key}.bin", cache / f"{name}-{mode}-{key}.sym"
    if not (bin_path.exists() and sym_path.exists()):
        _assemble(payload if isinstance(payload, Source) else src, mode, bin_path, sym_path, where)
    symbols, types = _parse_symbols(sym_path.read_text())
    return Image(name, mode, bin_path.read_bytes(), symbols, symbol_types=types)


def _assemble(src: Path | Source, mode: str, bin_path: Path, sym_path: Path, where: Path | None) -> None:
    if isinstance(src, Source):
        suffix, what = (".c" if src.lang == "c" else ".S"), src.file or src.name
    else:
        suffix, what = src.suffix, src.name
    tools = ["as", "ld", "objcopy", "nm"] + {".c": ["gcc"], ".S": ["cpp"]}.get(suffix, [])
    for tool in tools:
        if shutil.which(tool) is None:
            raise BuildError(f"{tool} not found: kvmiso builds guests with GNU binutils and gcc "
                             "(apt-get install binutils gcc)")
    bits = BITS[mode]
    with tempfile.TemporaryDirectory(prefix="kvmiso-build-") as tmp:
        t = Path(tmp)
        includes = ["-I", str(LIB_DIR)] + (["-I", str(where)] if where else [])
        if isinstance(src, Source):  # a file of its own, whose #line names where the text is
            given = t / f"{src.name}{suffix}"
            given.write_text(src.numbered())
        else:
            given = Path(_display(src))  # what __FILE__ and the tools' messages say
        crt0 = t / f"crt0_{bits}.o"
        _tool(["as", "--64", f"--defsym=BITS={bits}", *includes, "-o", str(crt0), str(LIB_DIR / f"crt0_{bits}.S")],
              f"assembling crt0_{bits}.S for {mode} mode")
        obj = t / f"{Path(given).stem}.o"  # named as the source, for ld's messages
        if suffix == ".c":
            _tool(["gcc", *C_FLAGS, *includes, "-include", HEADER, "-c", "-o", str(obj), str(given)],
                  f"compiling {what} for {mode} mode")
        else:
            if suffix == ".S":
                pre = t / f"{given.stem}.s"
                _tool(["cpp", "-x", "assembler-with-cpp", "-undef", *includes, "-include", HEADER, "-o", str(pre),
                       str(given)], f"preprocessing {what} for {mode} mode")
                given = pre
            _tool(["as", "--64", f"--defsym=BITS={bits}", *includes, "-o", str(obj), str(given)],
                  f"assembling {what} for {mode} mode")
        objs = [str(crt0), str(obj)]
        elf = t / "image.elf"
        _tool(["ld", "-m", "elf_x86_64", "-nostdlib", "-static", "-T", str(LIB_DIR / "guest.ld"),
               "-o", str(elf), *objs], f"linking {what} for {mode} mode")
        flat = t / "image.bin"
        _tool(["objcopy", "-O", "binary", str(elf), str(flat)], "objcopy")
        syms = _tool(["nm", str(elf)], "nm")
        size = flat.stat().st_size
        if size > MAX_IMAGE:
            raise BuildError(f"{what}: image is {size} bytes; at most {MAX_IMAGE} fit below the host tables")
        bin_path.parent.mkdir(parents=True, exist_ok=True)
        # write-then-rename so a concurrent build never reads half a file
        for data, dst in ((flat.read_bytes(), bin_path), (syms.encode(), sym_path)):
            tmpf = dst.with_suffix(dst.suffix + f".{os.getpid()}")
            tmpf.write_bytes(data)
            tmpf.replace(dst)


def _tool(argv: list[str], what: str) -> str:
    p = subprocess.run(argv, capture_output=True, text=True, errors="replace")
    if p.returncode != 0:
        # one line naming the cause first (the tool's first error), then the tool's own lines
        lines = [line for line in (p.stderr or p.stdout).strip().splitlines() if line.strip()]
        errors = [line for line in lines if re.search(r": (fatal )?error:", line, re.I)] or lines or ["no message"]
        first = errors[0].strip()
        rest = "\n".join(line for line in lines if line.strip() != first and not line.endswith("Assembler messages:"))
        raise BuildError(f"{what} failed: {first}" + (f"\n{rest}" if rest else ""))
    return p.stdout


def _parse_symbols(text: str) -> tuple[dict[str, int], dict[str, str]]:
    """nm's lines as {name: value} and {name: type letter}."""
    values, types = {}, {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3:
            values[parts[2]] = int(parts[0], 16)
            types[parts[2]] = parts[1]
    return values, types


@lru_cache(maxsize=1)
def _tool_versions() -> str:
    try:
        return " / ".join(subprocess.run([tool, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
                          for tool in ("as", "gcc"))
    except (OSError, IndexError):
        return "unknown"
