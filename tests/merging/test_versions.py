"""Versions and lineage (ASYNC_SCHEMA.md): vectors against older versions merged onto the newest with staleness
weights, refusals naming versions, lineage across successive merges, incremental merges, `inspect`."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import dp_accounting as dpa
import numpy as np
import pytest
from dp_reference import pld_epsilon
from headers import vector_header
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from taskvec.cli.app import app
from taskvec.cli.console import error_message
from taskvec.errors import ConfigError, FileFormatError, MismatchError, PrivacyError
from taskvec.io.files import Header, dump_meta, read_header, read_kind
from taskvec.io.schema import ModelHeader, VectorSummary
from taskvec.merging.export import export_vector
from taskvec.merging.incremental import merge_incremental
from taskvec.merging.methods import combine, vector_seed, weight_methods
from taskvec.merging.stream import merge_vectors
from taskvec.privacy.ledger import (
    BASIC_COMPOSITION,
    GDP_COMPOSITION,
    PRV,
    PrivacyBudget,
    accountant_epsilon,
    check_merge_budget,
    dp_sgd_entry,
    gaussian_output_entries,
)

PARAMS = {"ties": {"density": 0.3}, "dare": {"density": 0.6}, "dare_ties": {"density": 0.7},
          "breadcrumbs": {"density": 0.6, "gamma": 0.1}, "trimmed_mean": {"trim": 0.34}}


def identity(p: Path) -> str:
    return str(read_kind(p, "model").meta["identity"])


def sha(p: Path) -> str:
    return str(read_kind(p, "vector").meta["sha256"])


class Rounds:
    """A consortium over three merges: v1 = v0 + (a, b); v2 = v1 + (c from v1); fine-tunes waiting for v3."""

    def __init__(self, tmp: Path, make_base: Callable[..., Path], make_finetuned: Callable[..., Path]) -> None:
        self.tmp, self.ft = tmp, make_finetuned
        self.v0 = make_base("test_vit")
        self.fts: dict[str, Path] = {}
        self.a, self.b = self.vector("a", self.v0, 1), self.vector("b", self.v0, 2)
        self.v1 = merge_vectors([self.a, self.b], self.v0, tmp / "v1.safetensors").path
        self.c = self.vector("c", self.v1, 3)
        self.v2 = merge_vectors([self.c], self.v1, tmp / "v2.safetensors", scale=0.5).path

    def vector(self, name: str, base: Path, seed: int, samples: int | None = None) -> Path:
        self.fts[name] = self.ft(base, seed, name=f"ft-{name}.safetensors")
        return export_vector(self.fts[name], base, self.tmp / f"{name}.safetensors", contributor=f"site-{name}",
                             samples=samples or 10 * seed).path


@pytest.fixture
def rounds(tmp_path: Path, make_base: Callable[..., Path], make_finetuned: Callable[..., Path]) -> Rounds:
    return Rounds(tmp_path, make_base, make_finetuned)


def stale(d: int, a: float) -> float:
    return float((1.0 + d) ** -a)


@pytest.mark.parametrize(("method", "a"), [("sum", 0.5), ("weighted", 0.5), ("sum", 1.0), ("mean", 0.0)])
def test_vectors_against_older_versions_are_applied_to_the_newest(rounds: Rounds, method: str, a: float) -> None:
    """v3 = v2 + λ·Σ wᵢ sᵢ (ftᵢ − vKᵢ) (÷ Σ wᵢ when normalised), sᵢ = (1 + 2 − Kᵢ)^(−a), from the files with numpy."""
    r = rounds
    new = {"d": (r.vector("d", r.v0, 4, samples=30), 0), "e": (r.vector("e", r.v1, 5, samples=70), 1),
           "f": (r.vector("f", r.v2, 6, samples=20), 2)}
    out = merge_vectors([v for v, _ in new.values()], r.v2, r.tmp / "v3.safetensors", method=method, scale=0.8,
                        staleness=a).path
    got, v2 = load_file(str(out)), load_file(str(r.v2))
    bases = {0: load_file(str(r.v0)), 1: load_file(str(r.v1)), 2: v2}
    samples = {"d": 30, "e": 70, "f": 20}
    w = {n: (samples[n] if method == "weighted" else 1.0) * stale(2 - k, a) for n, (_, k) in new.items()}
    norm = {"sum": 1.0, "mean": 3.0, "weighted": 120.0}[method]
    for key, t in v2.items():
        fts = {n: load_file(str(r.fts[n]))[key].astype(np.float64) for n in new}
        tau = sum(w[n] * (fts[n] - bases[k][key]) for n, (_, k) in new.items())
        np.testing.assert_allclose(got[key], t + 0.8 * tau / norm, rtol=1e-5, atol=1e-6, err_msg=key)
    rec = read_kind(out, "model").meta["merge"]
    assert rec["staleness"] == a
    assert [(v["base_version"], v["staleness"]) for v in rec["vectors"]] == [(0, 2), (1, 1), (2, 0)]
    assert [v["staleness_weight"] for v in rec["vectors"]] == pytest.approx([stale(2, a), stale(1, a), 1.0])


@pytest.mark.parametrize("method", weight_methods())
def test_every_method_combines_the_stale_vectors_scaled(rounds: Rounds, method: str) -> None:
    """Streaming (or by tensor, in chunks) with staleness equals `combine` on whole tensors with `scales`."""
    r = rounds
    vecs = [r.vector("d", r.v0, 4), r.vector("e", r.v1, 5), r.vector("f", r.v2, 6)]
    params = PARAMS.get(method, {})
    out = merge_vectors(vecs, r.v2, r.tmp / "v3.safetensors", method=method, params=params, scale=0.7, seed=2,
                        staleness=0.7).path
    got, v2 = load_file(str(out)), load_file(str(r.v2))
    vs = [load_file(str(v)) for v in vecs]
    metas = [read_kind(v, "vector").meta for v in vecs]
    for key, t in v2.items():
        seeds = [vector_seed(2, m["sha256"], key) for m in metas]
        comb = combine(method, [v[key] for v in vs], params, samples=[m["samples"] for m in metas], seeds=seeds,
                       scales=[stale(2, 0.7), stale(1, 0.7), 1.0])
        np.testing.assert_allclose(got[key], t + 0.7 * comb, rtol=1e-5, atol=1e-6, err_msg=key)


def test_staleness_zero_is_the_plain_merge(rounds: Rounds) -> None:
    r = rounds
    d = r.vector("d", r.v0, 4)
    plain = merge_vectors([d], r.v2, r.tmp / "p.safetensors", staleness=0).path
    got, v2, v0, ft = (load_file(str(p)) for p in (plain, r.v2, r.v0, r.fts["d"]))
    for key in v2:
        np.testing.assert_allclose(got[key], v2[key] + (ft[key] - v0[key]), rtol=1e-5, atol=1e-6)
    assert read_kind(plain, "model").meta["merge"]["vectors"][0]["staleness_weight"] == 1.0


def test_lineage_across_three_merges_and_inspect(rounds: Rounds) -> None:
    r = rounds
    e = r.vector("e", r.v2, 5)
    v3 = merge_vectors([e], r.v2, r.tmp / "v3.safetensors").path
    metas = [read_kind(p, "model").meta for p in (r.v0, r.v1, r.v2, v3)]
    ids = [m["identity"] for m in metas]
    assert [m.get("version", 0) for m in metas] == [0, 1, 2, 3]
    assert [m.get("parent") for m in metas[1:]] == ids[:3]
    assert metas[3]["lineage"] == [
        {"version": 0, "identity": ids[0]},
        {"version": 1, "identity": ids[1], "vectors": metas[1]["merge"]["vectors"]},
        {"version": 2, "identity": ids[2], "vectors": metas[2]["merge"]["vectors"]},
    ]
    assert [v["sha256"] for v in metas[3]["lineage"][1]["vectors"]] == [sha(r.a), sha(r.b)]
    assert metas[2]["merge"]["vectors"][0]["base_version"] == 1
    vec = read_kind(e, "vector").meta["base"]
    assert (vec["identity"], vec["version"], vec["lineage"]) == (ids[2], 2, ids[:2])
    out = CliRunner().invoke(app, ["inspect", str(v3)])
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.split())
    assert "version 3" in text
    for k, n in ((1, "2 vectors"), (2, "1 vectors")):
        assert f"v{k} {ids[k]} {n}" in text
    assert f"v0 {ids[0]} root" in text
    assert "from v2 (d=0, s=1)" in text
    out = CliRunner().invoke(app, ["inspect", str(e)])
    assert f"{ids[2]}(test_vit),version2" in "".join(out.output.split())  # the table may fold the identity


def test_unknown_base_is_refused_naming_the_versions(rounds: Rounds) -> None:
    r = rounds
    sibling = merge_vectors([r.a], r.v0, r.tmp / "sibling.safetensors").path  # another v1, not in v2's lineage
    x = r.vector("x", sibling, 7)
    with pytest.raises(MismatchError) as err:
        merge_vectors([x], r.v2, r.tmp / "v3.safetensors")
    msg = str(err.value)
    assert "x.safetensors" in msg and f"base.identity is {identity(sibling)[:12]}" in msg
    ids = [identity(p) for p in (r.v0, r.v1, r.v2)]
    assert f"versions v0 {ids[0][:12]}, v1 {ids[1][:12]}, v2 {ids[2][:12]}" in msg
    assert not (r.tmp / "v3.safetensors").exists()


def test_already_merged_vectors_are_refused_naming_the_version(rounds: Rounds) -> None:
    r = rounds
    for v, into, base in ((r.a, r.v1, r.v1), (r.a, r.v1, r.v2), (r.c, r.v2, r.v2)):
        k = read_kind(into, "model").meta["version"]
        with pytest.raises(MismatchError, match=rf"{v.name}: already merged into v{k} \({identity(into)[:12]}\)"):
            merge_vectors([v], base, r.tmp / "again.safetensors")


def _rewrite(path: Path, out: Path, change: Callable[[dict], None]) -> Path:
    """A copy of `path` whose taskvec metadata `change` edits (tensors unchanged)."""
    meta = read_header(path).meta
    change(meta)
    save_file(load_file(str(path)), str(out), metadata=dump_meta(meta))
    return out


@pytest.mark.parametrize(("field", "change"), [
    ("version", lambda m: m.update(version=-1)),
    ("lineage", lambda m: m["lineage"].pop()),
    ("lineage", lambda m: m["lineage"][1].update(version=2)),
    ("lineage", lambda m: m["lineage"][0].update(identity="zz")),
    ("lineage", lambda m: m["lineage"][1].update(vectors=[{"sha256": "no"}])),
    ("lineage", lambda m: m["lineage"][0].update(vectors=[])),
    ("parent", lambda m: m.update(parent=m["lineage"][0]["identity"])),
    ("merge.vectors", lambda m: m["merge"].update(vectors=[1])),
])
def test_malformed_lineage_is_a_file_format_error(rounds: Rounds, field: str, change: Callable[[dict], None]) -> None:
    e = rounds.vector("e", rounds.v2, 5)
    bad = _rewrite(rounds.v2, rounds.tmp / "bad.safetensors", change)
    # v2 has two lineage entries: v0 and v1
    with pytest.raises(FileFormatError, match=f"bad.safetensors: taskvec model metadata: {field} ") as err:
        read_kind(bad, "model")
    assert err.value.field == field
    with pytest.raises(FileFormatError):
        merge_vectors([e], bad, rounds.tmp / "m.safetensors")
    out = CliRunner().invoke(app, ["inspect", str(bad)])
    assert isinstance(out.exception, FileFormatError) and f"{field} " in str(out.exception)


def test_a_vector_must_record_where_its_base_sits(rounds: Rounds) -> None:
    r = rounds
    e = r.vector("e", r.v1, 5)
    ids = [identity(p) for p in (r.v0, r.v1)]
    wrong = _rewrite(e, r.tmp / "wrong.safetensors", lambda m: m["base"].update(version=0, lineage=[]))
    with pytest.raises(MismatchError, match="wrong.safetensors: records its base as v0") as err:
        merge_vectors([wrong], r.v2, r.tmp / "m.safetensors")
    assert err.value.field == "base.version"
    forged = _rewrite(e, r.tmp / "forged.safetensors", lambda m: m["base"].update(lineage=[ids[1]]))
    with pytest.raises(MismatchError) as err:
        merge_vectors([forged], r.v2, r.tmp / "m.safetensors")
    assert err.value.field == "base.lineage"
    bad = _rewrite(e, r.tmp / "bad.safetensors", lambda m: m["base"].update(lineage=[ids[0], ids[1]]))
    with pytest.raises(FileFormatError, match="base.lineage must list"):
        read_kind(bad, "vector")


@pytest.mark.parametrize("method", ["weighted", "ties"])
def test_incremental_merges_carry_versions_as_a_full_merge(rounds: Rounds, method: str) -> None:
    r = rounds
    vecs = [r.vector("d", r.v0, 4), r.vector("e", r.v1, 5), r.vector("f", r.v2, 6)]
    state = r.tmp / "state"
    merge_incremental(vecs[:1], r.v2, state, method=method, staleness=0.8)
    inc = merge_incremental(vecs, r.v2, state, method=method, staleness=0.8)
    full = merge_vectors(vecs, r.v2, r.tmp / "full.safetensors", method=method, staleness=0.8)
    a, b = load_file(str(inc.path)), load_file(str(full.path))
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
    mi, mf = read_kind(inc.path, "model").meta, read_kind(full.path, "model").meta
    assert (mi["version"], mi["parent"], mi["lineage"]) == (3, identity(r.v2), mf["lineage"])
    assert mi["merge"]["vectors"] == mf["merge"]["vectors"]
    with pytest.raises(MismatchError, match="staleness 0.8"):  # a state keeps its staleness exponent
        merge_incremental(vecs, r.v2, state, method=method, staleness=0.5)


def test_cli_staleness_option(rounds: Rounds) -> None:
    r = rounds
    d = r.vector("d", r.v0, 4)
    runner = CliRunner()
    help_text = " ".join(runner.invoke(app, ["merge", "--help"]).output.split())
    assert "FedBuff" in help_text and "FedAsync" in help_text
    bad = runner.invoke(app, ["merge", str(d), "--base", str(r.v2), "--out", str(r.tmp / "m.safetensors"),
                              "--staleness", "-1"])
    assert isinstance(bad.exception, ConfigError) and error_message(bad.exception).startswith("--staleness must be")
    ok = runner.invoke(app, ["merge", str(d), "--base", str(r.v2), "--out", str(r.tmp / "m.safetensors"),
                             "--staleness", "1"])
    assert ok.exit_code == 0, ok.output
    v = read_kind(r.tmp / "m.safetensors", "model").meta["merge"]["vectors"][0]
    assert (v["base_version"], v["staleness"], v["staleness_weight"]) == (0, 2, pytest.approx(1 / 3))
    assert json.loads(json.dumps(v))  # plain JSON


# --- privacy across rounds ------------------------------------------------------------------------------

def test_budget_composes_a_sites_releases_across_rounds(rounds: Rounds) -> None:
    """Export noise z = 2 in round 1 (merged into v3) and round 2 (from v3): ε composes over both (μ-GDP, against
    dp-accounting's PLD); a budget one round fits and two rounds exceed refuses round 2."""
    r = rounds
    noise = {"clip": 1.0, "noise_multiplier": 2.0, "delta": 1e-5}

    def release(name: str, base: Path, seed: int) -> Path:
        ft = r.ft(base, seed, name=f"ft-{name}.safetensors")
        return export_vector(ft, base, r.tmp / f"{name}.safetensors", contributor="site-s", **noise).path

    one = pld_epsilon([dpa.GaussianDpEvent(2.0)], 1e-5)
    two = pld_epsilon([dpa.GaussianDpEvent(2.0)] * 2, 1e-5)
    budget = PrivacyBudget(max_epsilon=(one + two) / 2, unit="site")
    v3 = merge_vectors([release("s1", r.v2, 8)], r.v2, r.tmp / "v3.safetensors", budget=budget).path
    first = read_kind(v3, "model").meta["merge"]["privacy_budget"]["contributors"]["site-s"]
    assert first["epsilon"] == pytest.approx(one, rel=0.02) and first["earlier"] == 0
    s2 = release("s2", v3, 9)
    with pytest.raises(PrivacyError, match=r"contributor 'site-s': ε = .* 2 vectors \(1 already in the base's "
                                           r"lineage\) from 2 runs composed, above `max_epsilon`"):
        merge_vectors([s2], v3, r.tmp / "v4.safetensors", budget=budget)
    loose = PrivacyBudget(max_epsilon=2 * two, unit="site")
    v4 = merge_vectors([s2], v3, r.tmp / "v4.safetensors", budget=loose).path
    both = read_kind(v4, "model").meta["merge"]["privacy_budget"]["contributors"]["site-s"]
    assert both["epsilon"] == pytest.approx(two, rel=0.02) and both["delta"] == 1e-5
    assert (both["vectors"], both["earlier"], both["runs"], both["composition"]) == (2, 1, 2, GDP_COMPOSITION)
    assert two < 2 * one  # tighter than adding


def _dp_sgd(z: float, q: float, steps: int, run: str) -> dict[str, Any]:
    eps = accountant_epsilon(PRV, z, q, steps, 1e-5)
    return dp_sgd_entry(epsilon=eps, delta=1e-5, accountant=PRV, noise_multiplier=z, sample_rate=q, steps=steps,
                        max_grad_norm=1.0, unit="image", run_id=run)


def _vector(ledger: list[dict[str, Any]], run: str) -> Header:
    return vector_header(f"{run}.safetensors", privacy=ledger, run=run)


def test_dp_sgd_rounds_compose_over_all_steps() -> None:
    """A site's DP-SGD runs of two rounds (one already in the lineage) compose in one PRV accountant over all
    their steps, as dp-accounting's PLD composes the same events; mixed mechanisms add."""
    r1, r2 = _dp_sgd(1.1, 0.05, 120, "r1"), _dp_sgd(0.9, 0.02, 300, "r2")
    earlier = [("v1 input", VectorSummary("0" * 64, "h", [r1], run_id="r1"))]
    rec = check_merge_budget([_vector([r2], "r2")], PrivacyBudget(unit="image"), earlier)["contributors"]["h"]
    want = pld_epsilon([dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.05, dpa.GaussianDpEvent(1.1)), 120),
                        dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.02, dpa.GaussianDpEvent(0.9)), 300)],
                       1e-5)
    assert rec["epsilon"] == pytest.approx(want, rel=0.02)
    assert rec["epsilon"] < r1["epsilon"] + r2["epsilon"]
    assert (rec["runs"], rec["earlier"], rec["delta"], rec["composition"]) == (2, 1, 1e-5, PRV)
    with pytest.raises(PrivacyError, match="1 already in the base's lineage"):
        check_merge_budget([_vector([r2], "r2")], PrivacyBudget(max_epsilon=r2["epsilon"] * 1.01, unit="image"),
                           earlier)
    # runs that are DP-SGD models also exported with noise: the smaller of the two tight compositions
    noised = [("v1 input", replace(earlier[0][1], privacy=[r1, *gaussian_output_entries([40.0], 1.0, 1e-5, "r1")]))]
    both = check_merge_budget([_vector([r2, *gaussian_output_entries([40.0], 1.0, 1e-5, "r2")], "r2")],
                              PrivacyBudget(unit="image"), noised)["contributors"]["h"]
    want = pld_epsilon([dpa.GaussianDpEvent(40.0)] * 2, 1e-5, dpa.NeighboringRelation.REPLACE_ONE)
    assert both["epsilon"] == pytest.approx(want, rel=0.02) and both["composition"] == GDP_COMPOSITION
    site = gaussian_output_entries([3.0], 1.0, 1e-5, "r3")  # site replace-one covers an image
    mixed = check_merge_budget([_vector(site, "r3")], PrivacyBudget(unit="image"), earlier)["contributors"]["h"]
    assert mixed["epsilon"] == pytest.approx(r1["epsilon"] + site[1]["epsilon"])
    assert (mixed["delta"], mixed["composition"]) == (2e-5, BASIC_COMPOSITION)


def test_calibrate_select_and_contributions_on_a_merged_version(tmp_path: Path, make_base: Callable[..., Path],
                                                                make_finetuned: Callable[..., Path]) -> None:
    """The validation-data hooks merge onto a version as a plain merge does: the chosen λ (and method) give the
    same tensors, version and lineage as merging with them directly."""
    from synthetic_data import image_folder

    from taskvec.merging.calibrate import Calibrator

    v0 = make_base("test_vit", num_classes=2)
    val = image_folder(tmp_path / "val", n_per_class=6, seed=9)

    def vector(base: Path, seed: int) -> Path:
        ft = make_finetuned(base, seed, scale=0.05)
        return export_vector(ft, base, tmp_path / f"x{seed}.safetensors", contributor=f"s{seed}", samples=seed).path

    v1 = merge_vectors([vector(v0, 1)], v0, tmp_path / "v1.safetensors").path
    stale, fresh = vector(v0, 2), vector(v1, 3)
    cal = merge_vectors([stale, fresh], v1, tmp_path / "cal.safetensors", method="mean",
                        calibrate=Calibrator(val, grid=(0.0, 0.5, 1.0), device="cpu"),
                        contributions=Calibrator(val, device="cpu"))
    sel = merge_vectors([stale, fresh], v1, tmp_path / "sel.safetensors",
                        select=Calibrator(val, grid=(1.0,), device="cpu"))
    chosen = read_kind(sel.path, "model").meta["merge"]["selection"]["chosen"]
    for i, (got, method, scale) in enumerate(((cal, "mean", cal.scale), (sel, chosen["method"], chosen["scale"]))):
        plain = merge_vectors([stale, fresh], v1, tmp_path / f"plain{i}.safetensors", method=method, scale=scale)
        a, b = load_file(str(got.path)), load_file(str(plain.path))
        for k in b:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=k)
        mg, mp = read_kind(got.path, "model").meta, read_kind(plain.path, "model").meta
        assert (mg["version"], mg["lineage"], mg["merge"]["vectors"]) == (2, mp["lineage"], mp["merge"]["vectors"])
    assert [v["staleness_weight"] for v in cal.vectors] == pytest.approx([2**-0.5, 1.0])
    assert len(cal.record["contributions"]["sites"]) == 2


def test_a_merge_that_changed_nothing_may_have_its_parents_identity() -> None:
    """λ = 0 (calibration found the vectors no help) gives the parent's content; twice, a grandparent's."""
    a, b = "a" * 64, "b" * 64
    one = {"identity": a, "model": {}, "version": 1, "parent": a, "lineage": [{"identity": a, "version": 0}],
           "merge": {"vectors": []}}
    assert ModelHeader.from_json(one).versions() == [a, a]
    chain = [{"identity": a, "version": 0}, {"identity": b, "version": 1, "vectors": []}]
    two = {**one, "version": 2, "parent": b, "lineage": chain}
    assert ModelHeader.from_json(two).versions() == [a, b, a]
    three = {**two, "lineage": [chain[0], {**chain[1], "identity": a}], "parent": a}
    assert ModelHeader.from_json(three).versions() == [a, a, a]


def test_a_merge_at_lambda_zero_repeats_its_parents_identity(rounds: Rounds) -> None:
    """λ = 0 (a calibration may choose it) writes the parent's tensors: the same identity twice in a lineage is
    valid, and a vector is placed by the version it records."""
    r = rounds
    same = merge_vectors([r.vector("d", r.v2, 4)], r.v2, r.tmp / "v3.safetensors", scale=0.0).path
    meta = read_kind(same, "model").meta
    assert meta["identity"] == identity(r.v2) and meta["version"] == 3
    from_v3, from_v2 = r.vector("e", same, 5), r.vector("f", r.v2, 6)
    assert read_kind(from_v3, "vector").meta["base"]["version"] == 3
    v4 = merge_vectors([from_v3, from_v2], same, r.tmp / "v4.safetensors").path
    rec = read_kind(v4, "model").meta["merge"]["vectors"]
    assert [(v["base_version"], v["staleness"]) for v in rec] == [(3, 0), (2, 1)]
