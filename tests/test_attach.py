"""kvmiso on a VMM it did not write: QEMU (Debian's qemu-system-x86) running a multiboot image,
traced with -- COMMAND and with --pid, its exits against QEMU's own view, its VM's real objects."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from kvmiso.cli import main
from kvmiso.kvm.exits import IoExit
from kvmiso.observe.tracing.exitlog import read_jsonl
from kvmiso.observe.kernel.evidence import read_evidence

QEMU = shutil.which("qemu-system-x86_64")
GUEST = Path(__file__).parent / "guests" / "multiboot.S"
pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed (Debian: qemu-system-x86)")


def _image(tmp_path, count=None):
    obj, elf = tmp_path / "mb.o", tmp_path / f"mb{count or 'loop'}.elf"
    defs = [f"--defsym=COUNT={count}"] if count else ["--defsym=LOOP=1"]
    subprocess.run(["as", "--32", *defs, "-o", str(obj), str(GUEST)], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext=0x100000", "-o", str(elf), str(obj)], check=True)
    return elf


def _qemu(elf, debugcon, *extra):
    return [QEMU, "-enable-kvm", "-nodefaults", "-display", "none", "-m", "64", "-kernel", str(elf),
            "-debugcon", f"file:{debugcon}", "-device", "isa-debug-exit,iobase=0xf4", *extra]


def test_trace_a_command_matches_qemus_own_view(kvm, tmp_path, capsys):
    """Every byte the guest wrote to debugcon is one port-0xe9 OUT kvmiso saw, the events are all
    QEMU's threads', and the evidence is QEMU's VM, not kvmiso's."""
    count = 37
    con, log, ev = tmp_path / "con", tmp_path / "q.jsonl", tmp_path / "q.ev.json"
    rc = main(["trace", "--json", str(log), "--evidence", str(ev), "--", *_qemu(_image(tmp_path, count), con)])
    out = capsys.readouterr().out
    assert rc == 1 and "until the process exited with status 1" in out  # isa-debug-exit(0) = status 1, passed on
    written = con.read_bytes().count(b"K")
    assert written == count
    got = read_jsonl(log)
    outs = [e for _, e in got.events() if e.name == "kvm_pio" and e.fields["port"] == 0xE9 and e.fields["rw"] == 1]
    assert len(outs) == written  # QEMU's own view: its debugcon file
    assert all(e.stack for _, e in got.events())
    assert os.getpid() not in {e.pid for _, e in got.events()}
    assert got.host["pid"] != os.getpid()  # the log is QEMU's
    evidence = read_evidence(ev)
    assert evidence.real and not evidence.failed_checks()
    assert evidence.object("vcpu_struct") is not None and evidence.object("lapic") is not None  # QEMU's irqchip
    assert set(evidence.threads) == {0}


def test_check_a_command_per_vcpu_with_real_objects(kvm, tmp_path, capsys):
    con = tmp_path / "con"
    rc = main(["check", "--json", "--policy", "asi", "--", *_qemu(_image(tmp_path, 5), con, "-smp", "2")])
    out = json.loads(capsys.readouterr().out)
    assert out["evidence"].startswith("bpf+btf") and out["total"]["exits"] > 0
    assert out["total"]["unknown_functions"] == [] and rc == 0, out["total"]["unknown_functions"]
    assert [v["vcpu"] for v in out["vcpus"]] and sum(v["runs"] for v in out["vcpus"]) == out["total"]["runs"]


def test_attach_to_a_running_qemu(kvm, tmp_path, capsys):
    con = tmp_path / "con"
    q = subprocess.Popen(_qemu(_image(tmp_path), con), stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while con.stat().st_size == 0 if con.exists() else True:  # SeaBIOS done: the guest prints
            assert time.monotonic() < deadline and q.poll() is None
            time.sleep(0.1)
        log = tmp_path / "p.jsonl"
        assert main(["trace", "--pid", str(q.pid), "--duration", "1.5", "--json", str(log)]) == 0
        out = capsys.readouterr().out
        assert f"traced pid {q.pid} until 1.5 s passed" in out
        got = read_jsonl(log)
        # the guest's OUTs to debugcon, typed from their kvm_pio events
        assert got.records and all(isinstance(r.exit, IoExit) and r.exit.port == 0xE9 and not r.exit.is_in
                                   and bytes(r.exit.data) == b"." for r in got.records)
        tids = {int(t) for t in os.listdir(f"/proc/{q.pid}/task")}
        assert {e.pid for _, e in got.events()} <= tids
        assert q.poll() is None  # attaching and detaching leaves QEMU running
    finally:
        q.kill()
        q.wait()


def test_a_command_stopped_at_its_duration_is_gone(kvm, tmp_path, capsys):
    """A looping QEMU started by kvmiso is traced for 2 s, then stopped: no QEMU child remains,
    and every KVM_RUN traced is its vCPU 0's, named by the evidence read before it was stopped.
    (Under TCG, QEMU may not reach its first KVM_RUN within 2 s: then neither names a thread.)"""
    con, log, ev = tmp_path / "con", tmp_path / "loop.jsonl", tmp_path / "loop.ev.json"
    rc = main(["trace", "--duration", "2", "--json", str(log), "--evidence", str(ev), "--", *_qemu(_image(tmp_path), con)])
    assert rc == 0 and "until 2 s passed" in capsys.readouterr().out
    assert psutil.Process().children() == []
    threads = read_evidence(ev).threads
    assert set(threads) <= {0} and {r.vcpu for r in read_jsonl(log).records} <= set(threads)


@pytest.mark.parametrize("end", ["duration", signal.SIGTERM, signal.SIGINT], ids=["duration", "SIGTERM", "SIGINT"])
def test_a_vmm_started_by_a_wrapper_goes_with_the_trace(kvm, tmp_path, end):
    """Before: `trace -- sh -c 'qemu ...; echo done'` stopped the shell only: QEMU ran on with
    parent 1 after --duration, Ctrl-C or SIGTERM, holding the stdout of whoever read kvmiso's."""
    con, elf = tmp_path / "con", _image(tmp_path)
    wrapper = " ".join(shlex.quote(a) for a in _qemu(elf, con)) + "; echo done"
    duration = ["--duration", "3"] if end == "duration" else []
    k = subprocess.Popen([sys.executable, "-m", "kvmiso.cli", "trace", *duration, "--", "sh", "-c", wrapper],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if end != "duration":
            deadline = time.monotonic() + 60
            while not (con.exists() and con.stat().st_size):  # QEMU's guest is running
                assert time.monotonic() < deadline and k.poll() is None
                time.sleep(0.1)
            k.send_signal(end)
        k.wait(timeout=120)
        leftovers = [p for p in psutil.process_iter(["cmdline", "status"])
                     if str(elf) in (p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE]
        for p in leftovers:
            p.kill()
        out, err = k.communicate(timeout=60)  # QEMU held the pipe: this hung
    finally:
        k.kill()
        k.wait()
    assert leftovers == [], err
    assert k.returncode == (0 if end == "duration" else 128 + end) and "Traceback" not in err, err
    assert "KVM_RUN calls" in out


@pytest.mark.parametrize("argv, why", [
    (["trace", "--pid", "999999999"], "pid 999999999: no such process"),
    (["check", "--pid", str(os.getpid()), "--duration", "1"], "holds no KVM file descriptor"),
    (["trace", "--", "/nonexistent/vmm"], "cannot start /nonexistent/vmm"),
    (["trace", "portio", "--pid", "1"], "one of them"),
])
def test_bad_targets_are_one_line_status_2(kvm, argv, why, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert why in err and len(err.strip().splitlines()) == 1


def test_another_users_process_is_refused_in_one_line(kvm, tmp_path, checkout_open_to_nobody):
    """kvmiso as an unprivileged user cannot read root's fds: one line, status 2."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to an unprivileged user")
    # import first: this Python's own files may be unreadable to the unprivileged user
    code = ("import os, sys, textwrap\nimport kvmiso.session, kvmiso.observe.kernel.evidence\nfrom kvmiso.cli import main\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "sys.exit(main(['trace', '--pid', '1']))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert "pid 1: its file descriptors are not readable (another user's process" in p.stderr


def test_sigterm_while_attached_keeps_the_trace_and_leaves_nothing(kvm, tmp_path):
    con, log = tmp_path / "con", tmp_path / "cut.jsonl"
    elf = _image(tmp_path)
    k = subprocess.Popen([sys.executable, "-m", "kvmiso.cli", "trace", "--json", str(log), "--", *_qemu(elf, con)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (con.exists() and con.stat().st_size):
        assert time.monotonic() < deadline and k.poll() is None
        time.sleep(0.1)
    k.send_signal(signal.SIGTERM)
    out, err = k.communicate(timeout=60)
    assert k.returncode == 128 + signal.SIGTERM and "interrupted by SIGTERM" in err
    # ending a watch without --duration is what Ctrl-C or SIGTERM is for: what it saw is kept
    assert "until interrupted (INCOMPLETE)" in out and "KVM_RUN calls" in out, out
    got = read_jsonl(log)
    assert got.incomplete == "interrupted" and got.records
    leftovers = [p for p in os.listdir("/proc") if p.isdigit() and _cmdline(p).startswith(QEMU) and str(elf) in _cmdline(p)]
    assert leftovers == []  # the QEMU kvmiso started went with it
    instances = Path("/sys/kernel/tracing/instances")
    assert not any(d.name == f"kvmiso-{k.pid}" for d in instances.iterdir())


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""
