"""Assemble guest payloads (guests/*.S) with GNU as and ld into flat images, cached by content.

The cache key is the hash of everything that goes into an image: the payload source, the
shared include, crt0, the linker script, the mode and the assembler's version. A changed
source therefore rebuilds; an unchanged one is read back from ``$XDG_CACHE_HOME/kvmiso`` (or a
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
from dataclasses import dataclass
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


class BuildError(RuntimeError):
    """A payload did not assemble or link; the message carries the tool's own output."""


@dataclass(frozen=True)
class Image:
    """A flat guest image: ``code`` loads at ``load_address``; ``symbols`` from the ELF."""

    name: str
    mode: str
    code: bytes
    symbols: dict[str, int]
    load_address: int = LOAD_ADDRESS

    @property
    def entry(self) -> int:
        """The guest-physical address of ``_start`` (crt0's entry)."""
        return self.symbols["_start"]


def payload_path(name_or_path: str | os.PathLike) -> Path:
    """A payload name from guests/ (``hello``) or a path to a .S file."""
    p = Path(name_or_path)
    if p.suffix == ".S" or p.exists():
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
    when it declares none. BuildError names the file when it is not text or names a mode that
    does not exist."""
    text = _source_text(path)
    m = re.search(r"modes:[ \t]*([^\n]*)", text)
    if not m:
        return MODES
    declared = tuple(w.lower() for w in re.findall(r"[A-Za-z]+", m.group(1)))
    bad = [w for w in declared if w not in BITS]
    if bad or not declared:
        raise BuildError(f"payload {path}: its modes: line names {', '.join(bad) or 'no mode'}; "
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


def build(payload: str | os.PathLike, mode: str = "long", cache_dir: Path | None = None) -> Image:
    """Build (or fetch from the cache) the image of ``payload`` for ``mode``."""
    if mode not in BITS:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    src = payload_path(payload)
    # every include the assembler can find counts: the shared ones and those beside the source
    includes = sorted({*LIB_DIR.glob("*.inc"), *src.parent.glob("*.inc")})
    inputs = [src, *includes, LIB_DIR / f"crt0_{BITS[mode]}.S", LIB_DIR / "guest.ld"]
    h = hashlib.sha256(f"{mode}\0{_tool_versions()}".encode())
    for p in inputs:
        h.update(p.read_bytes())
    key = h.hexdigest()[:24]
    cache = cache_dir or cache_root() / "guests"
    bin_path, sym_path = cache / f"{src.stem}-{mode}-{key}.bin", cache / f"{src.stem}-{mode}-{key}.sym"
    if not (bin_path.exists() and sym_path.exists()):
        _assemble(src, mode, bin_path, sym_path)
    return Image(src.stem, mode, bin_path.read_bytes(), _parse_symbols(sym_path.read_text()))


def _assemble(src: Path, mode: str, bin_path: Path, sym_path: Path) -> None:
    for tool in ("as", "ld", "objcopy", "nm"):
        if shutil.which(tool) is None:
            raise BuildError(f"{tool} not found: kvmiso builds guests with GNU binutils (apt-get install binutils)")
    bits = BITS[mode]
    with tempfile.TemporaryDirectory(prefix="kvmiso-build-") as tmp:
        t = Path(tmp)
        objs = []
        for s in (LIB_DIR / f"crt0_{bits}.S", src):
            obj = t / f"{s.stem}.o"
            _tool(["as", "--64", f"--defsym=BITS={bits}", "-I", str(LIB_DIR), "-I", str(src.parent),
                   "-o", str(obj), str(s)], f"assembling {s.name} for {mode} mode")
            objs.append(str(obj))
        elf = t / "image.elf"
        _tool(["ld", "-m", "elf_x86_64", "-nostdlib", "-static", "-T", str(LIB_DIR / "guest.ld"),
               "-o", str(elf), *objs], f"linking {src.name} for {mode} mode")
        flat = t / "image.bin"
        _tool(["objcopy", "-O", "binary", str(elf), str(flat)], "objcopy")
        syms = _tool(["nm", str(elf)], "nm")
        size = flat.stat().st_size
        if size > MAX_IMAGE:
            raise BuildError(f"{src.name}: image is {size} bytes; at most {MAX_IMAGE} fit below the host tables")
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


def _parse_symbols(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3:
            out[parts[2]] = int(parts[0], 16)
    return out


@lru_cache(maxsize=1)
def _tool_versions() -> str:
    try:
        return subprocess.run(["as", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        return "unknown"
