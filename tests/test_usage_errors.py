"""Mistyped options and values get kbvq's one line, `error: ...`, exit status 2, from the real entry point.

Run as a subprocess: click's usage errors are handled in `main()`, which a CliRunner (calling `app`)
would bypass. None of these commands imports torch, so each takes a fraction of a second.
"""

import subprocess
import sys

import pytest

KBVQ = [sys.executable, "-m", "kbvq_cli.app"]


def kbvq(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(KBVQ + list(args), capture_output=True, text=True)


@pytest.mark.parametrize("args, message", [
    (["vq", "--bits", "abc"], "error: invalid value for '--bits': "),
    (["vq", "--bitz", "2"], "error: no such option: --bitz"),
    (["table"], "error: missing argument 'number'"),
    (["nonsense"], "error: no such command 'nonsense'"),
])
def test_usage_errors_are_one_line(args, message):
    result = kbvq(*args)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(message), line
    help_of = " ".join(["python -m kbvq_cli.app", *args[:1]]) if args[0] != "nonsense" else "python -m kbvq_cli.app"
    assert line.endswith(f"; see `{help_of} --help`"), line


def test_help_and_plain_kbvq_still_print_the_help():
    result = kbvq("--help")
    assert result.returncode == 0 and "calibrate" in result.stdout and "klt-svd" in result.stdout
    vq_help = kbvq("vq", "--help")
    assert vq_help.returncode == 0 and "--bits" in vq_help.stdout
    bare = kbvq()
    assert bare.returncode == 2 and "Usage:" in bare.stderr and "calibrate" in bare.stderr  # click's own status


def test_a_kbvq_error_keeps_status_2_through_main(tmp_path):
    result = kbvq("vq", "--run", str(tmp_path / "run"), "--bits", "5")
    assert result.returncode == 2
    assert result.stderr.startswith("error: vq settings.bits=5 is out of range") and len(result.stderr.splitlines()) == 1
