"""Running the CLI as an attacker's victim would: exit code, stderr, peak memory of the child process.

The peak is the child's own `VmHWM` (read from /proc as it exits): `ru_maxrss` of a child starts at its
parent's peak on Linux, so under a large pytest process it would measure pytest, not the command."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

MAX_RSS_BYTES = 1 << 30


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    peak_rss: int  # bytes, the child's own peak resident set (wait4)


_CHILD = (
    "import atexit, runpy, sys\n"
    "out = sys.argv[1]\n"
    "def hwm():\n"
    "    kb = next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
    "    open(out, 'w').write(kb)\n"
    "atexit.register(hwm)\n"
    "sys.argv = ['taskvec', *sys.argv[2:]]\n"
    "runpy.run_module('taskvec.cli.app', run_name='__main__')\n"
)


def cli(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> Run:
    """`taskvec ARGS` in a child process, with its exit code, output and own peak resident memory."""
    with tempfile.TemporaryDirectory() as tmp:
        hwm = Path(tmp) / "hwm"
        p = subprocess.run([sys.executable, "-c", _CHILD, str(hwm), *map(str, args)], cwd=cwd, capture_output=True,
                           text=True, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})}, timeout=600)
        return Run(p.returncode, p.stdout, p.stderr, int(hwm.read_text()) * 1024)


def assert_refused(r: Run, *fragments: str, code: int | None = None) -> None:
    """A non-zero exit, exactly one `error:` line on stderr naming `fragments`, no traceback, bounded memory."""
    assert r.code != 0, r.stdout
    if code is not None:
        assert r.code == code, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    for f in fragments:
        assert f in lines[0], lines[0]
    assert r.peak_rss < MAX_RSS_BYTES, r.peak_rss
