"""Issue 9's edges, each as a user meets it: bad arguments, outputs that cannot be written,
payloads that are not what they claim, a guest that writes escape sequences. Each is one line
naming the cause and status 2 (or the documented status), never a traceback."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvmiso.bench.compare import Row

ROOT = Path(__file__).resolve().parent.parent


def kvmiso(*args, timeout=120, **kw):
    return subprocess.run([sys.executable, "-m", "kvmiso.cli", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


def one_line(p) -> str:
    assert "Traceback" not in p.stderr, p.stderr
    lines = [line for line in p.stderr.splitlines() if not line.startswith("kvmiso: warning:")]
    assert len(lines) == 1 and lines[0].startswith("kvmiso: "), p.stderr
    return lines[0]


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "0", "-1", "1e10", "1e300", "soon"])
@pytest.mark.parametrize("command", ["run", "trace", "check"])
def test_timeout_must_be_positive_and_finite(command, value):
    p = kvmiso(command, "hello", "--timeout", value)
    assert p.returncode == 2 and "--timeout" in one_line(p) and p.stdout == ""


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "0", "-1", "1e10", "soon"])
def test_boot_timeout_must_be_positive_and_finite(value):
    """Before: boot took nan and inf (a deadline that never comes); run and trace refused both.
    The kernel named does not exist, so an accepted timeout fails on it, not after a boot."""
    p = kvmiso("boot", "--kernel", "/nonexistent/bzImage", "--timeout", value, "--", "true")
    assert p.returncode == 2 and "--timeout" in one_line(p) and p.stdout == ""


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-1", "soon"])
@pytest.mark.parametrize("command", ["trace", "check"])
def test_duration_must_be_positive_and_finite(command, value):
    p = kvmiso(command, "--duration", value, "--", "true")
    assert p.returncode == 2 and "--duration" in one_line(p) and p.stdout == ""


def test_a_bad_argument_is_one_line():
    for args in (["nosuchcommand"], ["run"], ["run", "hello", "--cpl", "2"], ["bench", "--runs", "x"]):
        p = kvmiso(*args)
        assert p.returncode == 2, args
        one_line(p)


def test_help_is_whole_sentences():
    p = kvmiso("--help")
    description = p.stdout.split("\n\n")[1].replace("\n", " ")
    assert p.returncode == 0 and description.rstrip().endswith(".")


def test_fuzz_script_help_is_whole_sentences():
    """Before: the description was the docstring's first line, cut mid-sentence ("... half")."""
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "fuzz.py"), "--help"], capture_output=True, text=True,
                       timeout=60)
    description = p.stdout.split("\n\n")[1].replace("\n", " ")
    assert p.returncode == 0 and description.rstrip().endswith("."), description


@pytest.mark.parametrize("command", [["probe"], ["run", "hello"], ["trace", "hello"]])
def test_stdout_that_cannot_be_written_is_one_line(kvm, command):
    with open("/dev/full", "w") as full:
        p = subprocess.run([sys.executable, "-m", "kvmiso.cli", *command], stdout=full, stderr=subprocess.PIPE,
                           text=True, timeout=120)
    assert p.returncode == 2
    assert one_line(p) == "kvmiso: cannot write to standard output: No space left on device"


@pytest.mark.parametrize("args,what", [
    (["trace", "hello", "--json", "/dev/full"], "the exit log"),
    (["bench", "--kinds", "out", "--samples", "20", "--runs", "1", "--json", "/dev/full"], "the results"),
    (["bench", "--kinds", "out", "--json", "/nonexistent/dir/r.json"], "the results"),
    (["report", "--out", "/dev/full/report"], "the report"),
    (["report", "--out", "/proc/kvmiso-report"], "the report"),
])
def test_unwritable_output_is_refused_before_the_work(kvm, args, what):
    p = kvmiso(*args)
    assert p.returncode == 2 and f"cannot write {what} to " in one_line(p)
    assert p.stdout == ""  # nothing was measured, traced or run first


def test_closed_stdout_pipe_on_report_or_probe_stays_quiet(kvm):
    p = subprocess.Popen([sys.executable, "-m", "kvmiso.cli", "probe"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    p.stdout.close()
    err = p.stderr.read()
    p.wait(timeout=120)
    assert p.returncode == 141 and err == ""


@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_console_escape_sequences_never_reach_the_terminal_raw(kvm, tmp_path, extra):
    src = tmp_path / "evil.S"
    src.write_text("""# Writes a terminal title sequence, a bell and a carriage return.  modes: long
        .include "kvmiso.inc"
        .text
        .globl main
main:   lea msg(%rip), %rsi
        mov $msg_end - msg, %ecx
        mov $PORT_CONSOLE, %dx
        rep outsb
        ret
msg:    .ascii "before\\x1b]0;owned\\x07\\rafter\\n"
msg_end:
""")
    p = kvmiso("run", str(src), *extra)
    assert p.returncode == 0, p.stderr
    assert "\x1b" not in p.stdout and "\x07" not in p.stdout
    if extra:
        r = json.loads(p.stdout)
        assert r["console"] == "before\x1b]0;owned\x07\rafter\n" and r["console_base64"] is None  # as written
    else:
        assert "console| before\\x1b]0;owned\\x07\\x0dafter" in p.stdout


def test_console_bytes_that_are_not_utf8_are_kept_exactly(kvm, tmp_path):
    src = tmp_path / "raw.S"
    src.write_text("""# Writes 0xff (never valid UTF-8), ESC and BEL.  modes: long
        .include "kvmiso.inc"
        .text
        .globl main
main:   PUTS msg, (msg_end - msg)
        ret
msg:    .byte 0xff, 0x1b, 0x07, 0x0a
msg_end:
""")
    from kvmiso.guest import Machine

    with Machine(str(src), kvm=kvm) as m:
        assert m.run(timeout=10).console == b"\xff\x1b\x07\n"
    text = subprocess.run([sys.executable, "-m", "kvmiso.cli", "run", str(src)], capture_output=True, timeout=120)
    assert text.returncode == 0, text.stderr
    assert b"console| \\xff\\x1b\\x07\n" in text.stdout
    assert not {0xff, 0x1b, 0x07} & set(text.stdout) and "\ufffd".encode() not in text.stdout
    p = kvmiso("run", str(src), "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert base64.b64decode(r["console_base64"]) == b"\xff\x1b\x07\n"  # the exact bytes
    assert r["console"] == "\ufffd\x1b\x07\n"  # the text, the invalid byte replaced


def test_payloads_that_are_not_what_they_claim(kvm, tmp_path):
    upper = tmp_path / "upper.S"
    upper.write_text("# modes: Long\n.include \"kvmiso.inc\"\n.globl main\nmain: ret\n")
    p = kvmiso("run", str(upper))
    assert p.returncode == 0 and "running upper in long mode" in p.stdout, p.stderr
    warp = tmp_path / "warp.S"
    warp.write_text("# modes: warp long\n.include \"kvmiso.inc\"\n.globl main\nmain: ret\n")
    p = kvmiso("run", str(warp))
    assert p.returncode == 2 and str(warp) in one_line(p) and "warp" in one_line(p)
    binary = tmp_path / "blob.S"
    binary.write_bytes(bytes(range(256)) * 4)
    for command in ("run", "trace", "check"):
        p = kvmiso(command, str(binary))
        assert p.returncode == 2 and one_line(p).startswith(f"kvmiso: payload {binary}: not a text file"), command


def test_regions_file_that_is_binary_names_the_file(kvm, tmp_path):
    blob = tmp_path / "regions.toml"
    blob.write_bytes(b"\xd0\xff" * 64)
    p = kvmiso("model", "--regions", str(blob))
    assert p.returncode == 2 and str(blob) in one_line(p)


def test_build_error_names_the_cause_on_its_first_line(kvm, tmp_path):
    bad = tmp_path / "bad.S"
    bad.write_text("# modes: long\n.include \"kvmiso.inc\"\n.globl main\nmain: mov %nosuchreg, %eax\n")
    p = kvmiso("run", str(bad))
    first = p.stderr.splitlines()[0]
    assert p.returncode == 2 and first.startswith("kvmiso: assembling bad.S for long mode failed: ")
    assert "bad.S:4: Error: bad register name" in first


def test_a_mode_the_payload_does_not_declare_is_run_with_a_warning(kvm):
    p = kvmiso("run", "triplefault", "--mode", "real", "--timeout", "0.3")
    assert "kvmiso: warning: triplefault declares long, protected mode only; running it in real mode anyway" in p.stderr
    p = kvmiso("run", "hello", "--mode", "real")
    assert p.returncode == 0 and "warning" not in p.stderr


def test_bench_with_no_kind_is_bad_input(kvm):
    p = kvmiso("bench", "--kinds", "")
    assert p.returncode == 2 and "--kinds names no kind" in one_line(p)
    p = kvmiso("bench", "--kinds", " , ")
    assert p.returncode == 2


def test_compare_never_says_same_and_significant():
    tiny = Row("out", "c", 0, 1000.0, 1002.0, significant=True, t=-9.0)
    assert tiny.verdict() == "1.002x slower"
    assert Row("out", "c", 0, 1000.0, 1002.0).verdict() == "same"


def test_timeout_text_says_interrupts_disabled_only_after_a_cli(kvm):
    p = kvmiso("run", "spin", "--timeout", "0.3")
    assert p.returncode == 1 and "jmp ." in p.stderr and "interrupts disabled" not in p.stderr
    p = kvmiso("run", "hostile_cli_spin", "--timeout", "0.3")
    assert p.returncode == 1 and "right after CLI, with interrupts disabled" in p.stderr
