"""The access record's QEMU side: which QEMU can load kvmiso's TCG plugin, the plugin built from
accesses.c with the system C compiler (once, cached by content like the guests), and its
``-plugin`` argument.

>>> plugin_argument(build_plugin(), Path("/tmp/rec"))       # doctest: +SKIP
'/root/.cache/kvmiso/plugins/accesses-1c0f....so,dir=/tmp/rec,cap=1000000'
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from ...guest.build import cache_root
from ..booterror import BootError

SOURCE = Path(__file__).resolve().parent / "accesses.c"
# QEMU releases this plugin was run with. It declares plugin API version 1 itself (Debian ships
# no qemu-plugin.h); a QEMU whose API or call signatures differ would load it and misbehave.
SUPPORTED_QEMU = ("7.2",)
PLUGIN_API = 1
DEFAULT_CAP = 1_000_000  # accesses kept per window; the plugin counts the rest as dropped
CFLAGS = ["-O2", "-std=gnu11", "-fPIC", "-shared", "-fvisibility=hidden", "-Wall", "-Werror"]
# what a boot writes into the record folder: the plugin's, the guest's symbols, kvmiso record's
RECORD_FILES = ("vcpu*.rec", "kallsyms", "modules", "runs.json", "fields.json", "runs/*")


def qemu_version(qemu: str) -> str:
    """QEMU's release as ``qemu --version`` prints it: ``7.2.22``; BootError when it says none."""
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BootError(f"cannot run {qemu} --version: {e}") from None
    m = re.search(r"QEMU emulator version (\d+)\.(\d+)(\.\d+)?", out)
    if not m:
        raise BootError(f"{qemu} --version names no QEMU release: {out.strip()[:80]!r}")
    return m.group(0).rsplit(" ", 1)[1]


def check_qemu(qemu: str) -> str:
    """The QEMU release when the access record supports it, else BootError in one line."""
    version = qemu_version(qemu)
    if ".".join(version.split(".")[:2]) not in SUPPORTED_QEMU:
        raise BootError(f"--record-accesses supports QEMU {', '.join(SUPPORTED_QEMU)} (TCG plugin API "
                        f"{PLUGIN_API}); {qemu} is QEMU {version}")
    return version


def build_plugin(cache: Path | None = None) -> Path:
    """The plugin's shared object, compiled on first use into ``$XDG_CACHE_HOME/kvmiso/plugins``
    and keyed by the source, the flags and the compiler's version."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise BootError("no C compiler (gcc) found: the access record builds its QEMU plugin with it "
                        "(Debian package gcc)")
    source = SOURCE.read_bytes()
    h = hashlib.sha256(source + "\0".join(CFLAGS).encode() + _compiler_version(cc).encode())
    out = (cache or cache_root() / "plugins") / f"accesses-{h.hexdigest()[:24]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kvmiso-plugin-") as tmp:
        built = Path(tmp) / out.name
        p = subprocess.run([cc, *CFLAGS, "-o", str(built), str(SOURCE), "-lpthread"],
                           capture_output=True, text=True, errors="replace")
        if p.returncode != 0:
            first = next((line for line in p.stderr.splitlines() if "error" in line), p.stderr.strip()[:200])
            raise BootError(f"building the access record's QEMU plugin failed: {first}")
        tmp_out = out.with_suffix(f".so.{os.getpid()}")  # write-then-rename: never half a file
        shutil.copyfile(built, tmp_out)
        tmp_out.replace(out)
    return out


def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    except OSError:
        return "unknown"


def plugin_argument(plugin: Path, record_dir: Path, cap: int = DEFAULT_CAP) -> str:
    """``-plugin``'s value: the object, then the plugin's own arguments. QEMU's option parser
    takes ``,,`` for a comma inside a value."""
    return f"{plugin},dir={str(record_dir.resolve()).replace(',', ',,')},cap={cap}"


def clear_record(record_dir: Path) -> None:
    """Remove an earlier boot's record from ``record_dir``: a record is of one boot, whose
    kallsyms symbolize it (KASLR moves the kernel at every boot)."""
    for pattern in RECORD_FILES:
        for f in record_dir.glob(pattern):
            f.unlink()
    if (record_dir / "runs").is_dir():
        (record_dir / "runs").rmdir()
