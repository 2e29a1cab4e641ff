"""`taskvec.registry.merge_inputs`, called directly: the vectors and version a merge of a registry takes, the
same as `taskvec merge --registry` takes."""
# ruff: noqa: F811 (pytest fixtures imported from registry_fixtures)

from __future__ import annotations

from pathlib import Path

import pytest
from registry_fixtures import created, sites  # noqa: F401 (fixtures)
from typer.testing import CliRunner

from taskvec.cli.app import app
from taskvec.io.files import read_kind
from taskvec.merging.stream import merge_vectors
from taskvec.registry import MergeInputs, RegistryError, TrustError, TrustPolicy, merge_inputs

pytest.importorskip("torch")
OPEN = TrustPolicy(allow_unsigned=True)


def _shas(paths: list[Path]) -> list[str]:
    return [read_kind(p, "vector").meta["sha256"] for p in paths]


def _cli_merge(registry: Path, out: Path) -> str:
    res = CliRunner().invoke(app, ["merge", "--registry", str(registry), "--out", str(out), "--method", "mean",
                                   "--allow-unsigned"])
    assert res.exit_code == 0, res.output
    return " ".join(res.output.split())


def test_onto_the_newest_version_only_what_it_lacks(sites, tmp_path: Path) -> None:
    base, vector = sites
    reg = created(str(tmp_path / "reg"), base)
    first = [reg.push(vector(i)).entry for i in (0, 1)]
    got = merge_inputs(reg, policy=OPEN, into=tmp_path / "in0")
    assert got.version is not None and got.version.version == 0 and not got.up_to_date
    assert got.base.read_bytes() == base.read_bytes() and got.already_merged == [] and got.warnings == []
    assert _shas(got.vectors) == [e.sha256 for e in first]
    v1 = merge_vectors(got.vectors, got.base, tmp_path / "v1.safetensors", method="mean").path
    reg.publish_version(v1)

    late = [reg.push(vector(2, b=v1)).entry, reg.push(vector(3)).entry]  # from v1, and one still from v0
    got = merge_inputs(reg, policy=OPEN, into=tmp_path / "in1")
    assert got.version is not None and got.version.version == 1 and got.base.read_bytes() == v1.read_bytes()
    assert [(e.sha256, n) for e, n in got.already_merged] == [(e.sha256, 1) for e in first]
    assert _shas(got.vectors) == [e.sha256 for e in late]
    assert got.warnings and "v1 is unsigned" in got.warnings[0]
    out = tmp_path / "cli.safetensors"  # the command line takes the same vectors onto the same version
    assert "2 vectors already merged (into v1) are left out" in _cli_merge(tmp_path / "reg", out)
    meta = read_kind(out, "model").meta
    assert meta["parent"] == got.version.identity
    assert [v["sha256"] for v in meta["merge"]["vectors"]] == _shas(got.vectors)

    reg.publish_version(out)
    done = merge_inputs(reg, policy=OPEN, into=tmp_path / "in2")
    assert done.up_to_date and done.vectors == [] and len(done.already_merged) == 4
    assert "up to date" in _cli_merge(tmp_path / "reg", tmp_path / "none.safetensors")


def test_a_given_base_takes_every_selected_vector(sites, tmp_path: Path) -> None:
    base, vector = sites
    reg = created(str(tmp_path / "reg"), base)
    entries = [reg.push(vector(i)).entry for i in (0, 1, 2)]
    mine = vector(3)
    got = merge_inputs(reg, policy=OPEN, into=tmp_path / "in", base=base, vectors=[mine],
                       contributors=["site0", "site2"])
    assert got == MergeInputs([mine, *got.vectors[1:]], base, None, [], [])
    assert _shas(got.vectors) == _shas([mine]) + [entries[0].sha256, entries[2].sha256]
    assert not got.up_to_date
    assert merge_inputs(reg, policy=OPEN, into=tmp_path / "in", base=base, since="2999-01-01").vectors == []


def test_refusals(sites, tmp_path: Path) -> None:
    base, vector = sites
    reg = created(str(tmp_path / "reg"), base)
    reg.push(vector(0))
    with pytest.raises(RegistryError, match="no vectors from site9"):
        merge_inputs(reg, policy=OPEN, into=tmp_path / "in", contributors=["site9"])
    with pytest.raises(TrustError, match="no key you trust vouches for 'merger'"):  # the unsigned v0
        merge_inputs(reg, policy=TrustPolicy(), into=tmp_path / "in")
    with pytest.raises(TrustError):  # the unsigned vector, with a base of the caller's
        merge_inputs(reg, policy=TrustPolicy(), into=tmp_path / "in", base=base)
    assert not list((tmp_path / "in").glob("*"))
    with pytest.raises(TypeError):
        merge_inputs(reg, OPEN, tmp_path / "in")  # type: ignore[misc]  # keyword-only
