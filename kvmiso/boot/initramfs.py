"""The initramfs of `kvmiso boot`: Debian's static busybox, the modules the guest must load, and
kvmiso's own init, which mounts the host's ``/`` (9p, read-only) under a tmpfs overlay, loads
the vendor module the CPU offers, and runs the command there in the caller's working directory.

The init talks to the host over four serial ports: ttyS0 is the console (kernel messages, kept
for errors), ttyS1 and ttyS2 carry the command's stdout and stderr, and ttyS3 is the control
channel, one line per fact: ``vendor NAME``, ``module NAME MESSAGE``, ``failed WHAT``, ``up``,
``exit STATUS``.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from .booterror import BootError
from .kernel import Kernel, module_bytes, module_key

BUSYBOX = Path("/bin/busybox")
# the host's / over virtio-9p, and the filesystems the init stacks on it
ROOT_MODULES = ["virtio_pci", "9pnet_virtio", "9p", "overlay"]
VENDORS = {"svm": "kvm_amd", "vmx": "kvm_intel"}  # /proc/cpuinfo flag -> the module it wants
MOUNT_TAG = "hostroot"
RECORD_TAG = "record"  # --record-accesses: the record's folder, writable

INIT = r"""#!/bin/busybox sh
# kvmiso boot's init (kvmiso/boot/initramfs.py): mount, load, chroot, run, report, power off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs dev /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
for t in 1 2 3; do stty -F /dev/ttyS$t raw -echo; done
exec 3>/dev/ttyS3
tell() { echo "$*" >&3; }
fail() { tell "failed $*"; poweroff -f; }

# insmod each module a list names; a failure reports the kernel's own words and stops
load() {
    while read -r name file; do
        [ -d /sys/module/$name ] && continue
        before=$(dmesg | wc -l)
        if ! insmod "/kvmiso/mod/$file" 2>/tmp/insmod.err; then
            said=$(dmesg | tail -n +$((before + 1)) | sed 's/^\[[ 0-9.]*\] //' | uniq | tr "\n" " ")
            tell "module $name ${said:-$(cat /tmp/insmod.err)}"
            poweroff -f
        fi
    done < "$1"
}

load /kvmiso/modules.root
vendor=none
for flag in svm vmx; do
    if grep -qw $flag /proc/cpuinfo; then
        vendor=$(cat /kvmiso/vendor.$flag)
        [ -e /kvmiso/missing.$flag ] && { tell "module $vendor $(cat /kvmiso/missing.$flag)"; poweroff -f; }
        load /kvmiso/modules.$flag
        break
    fi
done
tell "vendor $vendor"
load /kvmiso/modules.extra

mkdir -p /lower /rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 hostroot /lower || fail "mount the host's / over 9p"
mount -t tmpfs -o mode=0755 rw /rw && mkdir /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot || fail "overlay a tmpfs on the host's /"
n=/newroot
mount -t proc proc $n/proc && mount -t sysfs sys $n/sys && mount -t devtmpfs dev $n/dev || fail "mount proc, sys and dev"
mkdir -p $n/dev/pts $n/dev/shm
mount -t devpts devpts $n/dev/pts && mount -t tmpfs shm $n/dev/shm
mount -t tracefs tracefs $n/sys/kernel/tracing
mount -t debugfs debugfs $n/sys/kernel/debug
mount -t bpf bpf $n/sys/fs/bpf
mount -t tmpfs -o mode=0755 run $n/run && mkdir $n/run/kvmiso || fail "mount /run"
cp /bin/busybox /kvmiso/command.sh $n/run/kvmiso/
if [ -s /kvmiso/moddir ]; then
    # the kernel's modules where modprobe looks for them, read-only from the host
    m=/lib/modules/$(uname -r)
    mkdir -p $n$m && mount --bind "/lower$(cat /kvmiso/moddir)" $n$m
fi
if [ -s /kvmiso/record ]; then
    # --record-accesses: the record's folder, writable, at its own path; this kernel's symbols
    # go there beside the plugin's files once the command has ended
    r=$n$(cat /kvmiso/record)
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 record "$r" || fail "mount the access record's folder"
fi
for t in 1 2; do
    [ -s /kvmiso/winsize ] && stty -F /dev/ttyS$t $(cat /kvmiso/winsize)
done

tell up
run() { chroot $n /run/kvmiso/busybox sh /run/kvmiso/command.sh </dev/null; }
if [ -e /kvmiso/pipes ]; then
    # not a terminal on the host, so not one here: the command's output goes through pipes
    mkfifo /out /err
    cat /out >/dev/ttyS1 & o=$!
    cat /err >/dev/ttyS2 & e=$!
    run >/out 2>/err
    status=$?
    wait $o $e
else
    run >/dev/ttyS1 2>/dev/ttyS2
    status=$?
fi
if [ -s /kvmiso/record ]; then
    cat /proc/kallsyms >"$r/kallsyms" && cat /proc/modules >"$r/modules" && umount "$r"
fi
tell "exit $status"
poweroff -f
"""

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def command_script(argv: list[str], cwd: str, env: dict[str, str]) -> str:
    """What runs inside the chroot: the caller's environment, working directory and command."""
    lines = [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items()) if _ENV_NAME.match(k)]
    q = shlex.quote(cwd)
    lines.append(f"cd {q} || {{ echo 'kvmiso: the working directory '{q}' is not there in the guest' >&2; exit 2; }}")
    lines.append("exec " + " ".join(shlex.quote(a) for a in argv))
    return "\n".join(lines) + "\n"


def busybox() -> Path:
    """Debian's static busybox: the initramfs has no libc for a dynamic one."""
    if not BUSYBOX.is_file():
        raise BootError(f"{BUSYBOX} not found: install Debian's busybox-static package")
    if _elf_interpreter(BUSYBOX.read_bytes()):
        raise BootError(f"{BUSYBOX} is dynamically linked: install Debian's busybox-static package")
    return BUSYBOX


def _elf_interpreter(elf: bytes) -> bool:
    """True when a 64-bit ELF asks for a program interpreter (PT_INTERP): dynamically linked."""
    phoff, phentsize, phnum = (int.from_bytes(elf[0x20:0x28], "little"), int.from_bytes(elf[0x36:0x38], "little"),
                               int.from_bytes(elf[0x38:0x3A], "little"))
    return any(int.from_bytes(elf[phoff + i * phentsize:][:4], "little") == 3 for i in range(phnum))


def build_initramfs(kernel: Kernel, extra_modules: list[str], script: str, winsize: str | None,
                    pipes: bool, record_dir: str | None = None) -> bytes:
    """The initramfs as the kernel wants it (a newc cpio archive), built in memory: nothing
    of it lands on the host's disk, so nothing of it can be left behind. ``record_dir``: the
    access record's folder, which the guest mounts (tag ``record``) and writes kallsyms into."""
    files: dict[str, bytes | None] = {d: None for d in ("bin", "dev", "proc", "sys", "tmp", "kvmiso", "kvmiso/mod")}
    files["bin/busybox"] = busybox().read_bytes()
    files["init"] = INIT.encode()
    for flag, vendor in VENDORS.items():
        try:
            _add_modules(files, kernel, [vendor], f"modules.{flag}")
        except BootError as e:  # only the vendor the guest's CPU offers must be there
            files[f"kvmiso/modules.{flag}"] = b""
            files[f"kvmiso/missing.{flag}"] = str(e).encode()
        files[f"kvmiso/vendor.{flag}"] = vendor.encode()
    _add_modules(files, kernel, ROOT_MODULES, "modules.root")
    _add_modules(files, kernel, extra_modules, "modules.extra")
    files["kvmiso/moddir"] = str(kernel.modules.resolve()).encode() if kernel.modules else b""
    files["kvmiso/command.sh"] = script.encode()
    if winsize:
        files["kvmiso/winsize"] = winsize.encode()
    if pipes:
        files["kvmiso/pipes"] = b""
    if record_dir:
        files["kvmiso/record"] = record_dir.encode()
    return newc_archive(files, executable={"bin/busybox", "init"})


def _add_modules(files: dict[str, bytes | None], kernel: Kernel, names: list[str], listing: str) -> None:
    """The modules ``names`` need, with the list that loads them in order."""
    rows = []
    for f in kernel.module_files(names):
        name = module_key(f.name)
        files[f"kvmiso/mod/{name}.ko"] = module_bytes(f)
        rows.append(f"{name} {name}.ko\n")
    files[f"kvmiso/{listing}"] = "".join(rows).encode()


def newc_archive(files: dict[str, bytes | None], executable: set[str] = frozenset()) -> bytes:
    """A cpio archive in the "new ASCII" format the kernel unpacks (Documentation/driver-api/
    early-userspace/buffer-format.rst); ``None`` is a directory. Owner root, mtime 0."""
    out = bytearray()

    def entry(ino: int, name: str, mode: int, data: bytes) -> None:
        fields = (ino, mode, 0, 0, 2 if mode & 0o040000 else 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0)
        out.extend(b"070701" + b"".join(b"%08X" % v for v in fields) + name.encode() + b"\0")
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, data) in enumerate(sorted(files.items()), start=1):
        if data is None:
            entry(ino, name, 0o040755, b"")
        else:
            entry(ino, name, 0o100755 if name in executable else 0o100644, data)
    entry(0, "TRAILER!!!", 0, b"")
    return bytes(out)


def host_winsize() -> str | None:
    """``rows R cols C`` of the caller's terminal, for the guest's tty, or None."""
    try:
        size = os.get_terminal_size(1)
    except OSError:
        return None
    return f"rows {size.lines} cols {size.columns}"
