"""The kernel `kvmiso boot` starts: Debian's package fetched once into the cache, or a bzImage
the user built, with its modules folder; and the modules it must load, resolved from that
folder's own modules.dep (a module built in needs no file).
"""

from __future__ import annotations

import gzip
import lzma
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..guest.build import cache_root
from .booterror import BootError

DEBIAN_META = "linux-image-amd64"  # the package that depends on Debian's current kernel
SBIN = ("/usr/sbin", "/sbin")  # dpkg and depmod live here; a user's PATH may lack them


@dataclass(frozen=True)
class Kernel:
    """A bootable kernel: the image, its release string and its modules folder (or None when
    the user's kernel has none: then what kvmiso boot needs must be built in)."""

    image: Path
    release: str
    modules: Path | None
    origin: str  # "debian package <name>" or the path given

    def module_files(self, names: list[str]) -> list[Path]:
        """The .ko files that load ``names`` with everything they depend on, dependencies
        first, each once; a module built into the kernel needs none. Unknown names fail."""
        if self.modules is None:
            return []
        deps, builtin = _read_depmod(self.modules)
        order: list[str] = []

        def visit(rel: str) -> None:
            if rel in order:
                return
            for d in deps[rel]:
                visit(d)
            order.append(rel)

        for name in names:
            key = module_key(name)
            if key in builtin:
                continue
            rel = next((r for r in deps if module_key(Path(r).name) == key), None)
            if rel is None:
                raise BootError(f"module {name} is neither in {self.modules}/modules.dep nor built into {self.release}")
            visit(rel)
        return [self.modules / r for r in order]


def module_key(name: str) -> str:
    """A module's name as the kernel spells it: ``kvm-amd.ko.xz`` -> ``kvm_amd``."""
    return name.split(".ko")[0].replace("-", "_")


def _read_depmod(modules: Path) -> tuple[dict[str, list[str]], set[str]]:
    try:
        text = (modules / "modules.dep").read_text()
    except OSError as e:
        raise BootError(f"cannot read {modules}/modules.dep ({e.strerror}): run depmod for that kernel") from None
    deps = {}
    for line in text.splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    builtin_file = modules / "modules.builtin"
    builtin = {module_key(Path(p).name) for p in builtin_file.read_text().split()} if builtin_file.exists() else set()
    return deps, builtin


def module_bytes(path: Path) -> bytes:
    """A module as insmod wants it: busybox's insmod reads only uncompressed objects."""
    if path.suffix == ".xz":
        return lzma.decompress(path.read_bytes())
    if path.suffix == ".gz":
        return gzip.decompress(path.read_bytes())
    if path.suffix == ".zst":
        zstd = shutil.which("zstd")
        if not zstd:
            raise BootError(f"{path} is zstd-compressed and the zstd tool is missing: install Debian's zstd package")
        return subprocess.run([zstd, "-dcq", str(path)], check=True, capture_output=True).stdout
    return path.read_bytes()


# --- a kernel the user built -----------------------------------------------------------------

def bzimage_release(image: Path) -> str:
    """The release string a bzImage carries in its setup header (``kernel_version`` at 0x20e
    points to it, relative to 0x200), as the boot protocol documents."""
    try:
        with open(image, "rb") as f:
            head = f.read(64 * 1024)
    except OSError as e:
        raise BootError(f"kernel {image}: {e.strerror}") from None
    if head[0x202:0x206] != b"HdrS":
        raise BootError(f"kernel {image} is not a bzImage (no HdrS setup header)")
    at = int.from_bytes(head[0x20E:0x210], "little") + 0x200
    return head[at:at + 256].split(b"\0")[0].split(b" ")[0].decode("ascii", "replace")


def user_kernel(image: str, modules_dir: str | None) -> Kernel:
    """A bzImage the user built; modules from ``modules_dir`` or /lib/modules/<release>."""
    path = Path(image)
    if not path.is_file():
        raise BootError(f"kernel {image}: no such file")
    release = bzimage_release(path)
    modules = Path(modules_dir) if modules_dir else Path("/lib/modules") / release
    if modules_dir and not (modules / "modules.dep").is_file():
        raise BootError(f"modules folder {modules_dir} has no modules.dep (run depmod -b for release {release})")
    return Kernel(path, release, modules if (modules / "modules.dep").is_file() else None, str(path))


# --- Debian's kernel, fetched once -----------------------------------------------------------

def kernels_cache() -> Path:
    """Where fetched kernel packages are unpacked, one folder per release."""
    return cache_root() / "kernels"


def debian_kernel(cache: Path | None = None, log: Callable[[str], None] = print) -> Kernel:
    """Debian's kernel package, from the cache or, the first time, fetched with
    ``apt-get download``, unpacked with ``dpkg -x`` and indexed with ``depmod -b``."""
    cache = cache or kernels_cache()
    found = cached_debian_kernel(cache)
    if found:
        return found
    package = _debian_kernel_package()
    log(f"kvmiso: fetching Debian's kernel package {package} into {cache} (once)")
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=cache))
    try:
        _run(["apt-get", "download", package], cwd=work, what=f"apt-get download {package}")
        deb = next(work.glob("*.deb"))
        _run([_tool("dpkg"), "-x", str(deb), str(work / "root")], what="dpkg -x")
        deb.unlink()
        release = _only_release(work / "root")
        _run([_tool("depmod"), "-b", str(work / "root"), release], what="depmod -b")
        final = cache / f"debian-{release}"
        os.replace(work, final)  # complete or absent: a killed fetch leaves no half kernel
        return _debian_at(final, release)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def cached_debian_kernel(cache: Path) -> Kernel | None:
    """The newest Debian kernel already unpacked in ``cache``, or None (nothing is fetched)."""
    for d in sorted(cache.glob("debian-*"), reverse=True):
        release = d.name.removeprefix("debian-")
        if (d / "root/boot" / f"vmlinuz-{release}").is_file():
            return _debian_at(d, release)
    return None


def _debian_at(d: Path, release: str) -> Kernel:
    root = d / "root"
    return Kernel(root / "boot" / f"vmlinuz-{release}", release, root / "lib/modules" / release,
                  f"Debian's {release}")


def _debian_kernel_package() -> str:
    if not shutil.which("apt-get"):
        raise BootError("--kernel debian needs apt-get (a Debian or Ubuntu host); give --kernel PATH instead")
    out = _run(["apt-cache", "depends", "--important", DEBIAN_META], what=f"apt-cache depends {DEBIAN_META}")
    m = re.search(r"Depends: (linux-image-\S+)", out)
    if not m:
        raise BootError(f"apt knows no {DEBIAN_META} package: run apt-get update first")
    return m.group(1)


def _only_release(root: Path) -> str:
    releases = [p.name for p in (root / "lib/modules").iterdir()]
    if len(releases) != 1:
        raise BootError(f"the kernel package holds {len(releases)} module trees, expected one: {releases}")
    return releases[0]


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))
    if not found:
        package = {"depmod": "kmod", "dpkg": "dpkg"}[name]
        raise BootError(f"{name} not found: install Debian's {package} package")
    return found


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    try:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise BootError(f"{cmd[0]} not found") from None
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BootError(f"{what} failed (status {p.returncode}): {last}")
    return p.stdout
