"""`taskvec merge`: its defaults are the library's, and the command does what its help says."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_app import command, defaults, invoke
from safetensors.torch import load_file


def test_default_method_is_the_librarys_mean(make_base, make_finetuned, tmp_path: Path) -> None:
    from taskvec.merging.methods import DEFAULT_METHOD
    from taskvec.merging.plan import MergePlan

    assert defaults("merge")["method"] == DEFAULT_METHOD == MergePlan.method == "mean"
    base = make_base()
    vectors = []
    for i in range(3):
        vectors.append(tmp_path / f"v{i}.safetensors")
        code, _, err = invoke("export", make_finetuned(base, i), "--base", base, "--out", vectors[-1])
        assert code == 0, err
    out_path = tmp_path / ("a-long-folder-name" * 5) / "m.safetensors"  # the line is longer than 80 columns
    code, out, err = invoke("merge", *vectors, "--base", base, "--out", out_path)
    assert code == 0 and f"wrote {out_path}: mean of 3 vectors" in out, err  # never broken across lines
    merged, b = load_file(str(out_path)), load_file(str(base))
    deltas = [load_file(str(v)) for v in vectors]
    for k, t in b.items():
        if t.is_floating_point():  # base + (τ1 + τ2 + τ3) / 3, from the vector files themselves
            want = t + sum(d[k] for d in deltas) / 3
            torch.testing.assert_close(merged[k], want, rtol=1e-5, atol=1e-6)


def test_simulate_and_merge_share_the_staleness_help() -> None:
    helps = {name: next(p.help for p in command(name).params if p.name == "staleness") for name in ("merge",
                                                                                                    "simulate")}
    assert helps["merge"] == helps["simulate"] and "(1 + d)^(-a)" in helps["merge"]


@pytest.mark.parametrize("name", ["merge", "simulate"])
def test_staleness_default_is_the_librarys(name: str) -> None:
    from taskvec.io.lineage import DEFAULT_STALENESS

    assert defaults(name)["staleness"] == DEFAULT_STALENESS
