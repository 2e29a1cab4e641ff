"""Running the CLI as an attacker's victim would: exit code, stderr, peak memory of the child process."""

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


def cli(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> Run:
    """`taskvec ARGS` in a child process; its peak RSS comes from `os.wait4`, so it is this child's alone."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen([sys.executable, "-m", "taskvec.cli.app", *map(str, args)], cwd=cwd, stdout=out,
                             stderr=err, stdin=subprocess.DEVNULL,
                             env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Run(p.returncode, out.read().decode(), err.read().decode(), usage.ru_maxrss * 1024)


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
