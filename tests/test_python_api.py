"""The README's Python API example runs as written (offline, tiny data), and `import taskvec` stays light."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]


def test_the_readme_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file

    import taskvec

    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), "README.md", "exec"), {})  # noqa: S102 - the documented example itself
    merged = taskvec.read_header(tmp_path / "merged.safetensors").meta
    spent = merged["merge"]["privacy_budget"]["contributors"]
    assert set(spent) == {"a", "b"} and all(0 < c["epsilon"] <= 8.0 for c in spent.values())
    assert len(merged["merge"]["vectors"]) == 2 and (tmp_path / "runs" / "a" / "split.json").exists()
    a, b = (load_file(str(tmp_path / f"{s}.safetensors")) for s in "ab")
    m, base = load_file(str(tmp_path / "merged.safetensors")), load_file(str(tmp_path / "base.safetensors"))
    for k in a:  # mean: base + (Δa + Δb) / 2
        want = base[k].float() + (a[k].float() + b[k].float()) / 2
        assert (m[k].float() - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max())), k


def test_import_taskvec_loads_no_torch() -> None:
    code = "import sys, taskvec; taskvec.__all__; print('torch' in sys.modules, 'timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.split() == ["False", "False"]
