"""The privacy ledger: every ε (unit, relation) against Google's dp-accounting, recomputation, unit-aware and
composed budgets, and the release records of repeated exports."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import dp_accounting as dpa
import pytest
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant
from dp_reference import dp_sgd_test_entry as _dp_sgd
from dp_reference import pld_epsilon
from headers import vector_header

from taskvec.errors import PrivacyConfigError, PrivacyError
from taskvec.io.files import Header, read_kind
from taskvec.merging.export import export_vector
from taskvec.privacy.ledger import (
    PRV,
    RELEASES_FILE,
    PrivacyBudget,
    accountant_epsilon,
    check_merge_budget,
    dp_sgd_entry,
    gaussian_epsilon,
    gaussian_output_entries,
    name_model,
    validate_ledger,
    verify_ledger,
)

REPLACE = dpa.NeighboringRelation.REPLACE_ONE


@pytest.mark.parametrize("z", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("delta", [1e-5, 1e-3])
def test_analytic_gaussian_matches_pld(z: float, delta: float) -> None:
    assert gaussian_epsilon(z, delta) == pytest.approx(pld_epsilon(dpa.GaussianDpEvent(z), delta), rel=0.02)


@pytest.mark.parametrize("zs", [[1.0], [2.0, 3.0, 1.5]])
def test_export_entries_match_pld_for_each_relation(zs: list[float]) -> None:
    """Site add-remove (sensitivity C) and site replace-one (2C, dp-accounting's REPLACE_ONE), releases composed."""
    add_remove, replace_one = gaussian_output_entries(zs, 1.0, 1e-5, "run")
    event = dpa.ComposedDpEvent([dpa.GaussianDpEvent(z) for z in zs])
    assert (add_remove["relation"], replace_one["relation"]) == ("add-remove", "replace-one")
    assert add_remove["epsilon"] == pytest.approx(pld_epsilon(event, 1e-5), rel=0.02)
    assert replace_one["epsilon"] == pytest.approx(pld_epsilon(event, 1e-5, REPLACE), rel=0.02)
    assert add_remove["steps"] == len(zs) and add_remove["releases"] == zs
    assert verify_ledger([add_remove, replace_one], "v") == [add_remove, replace_one]


@pytest.mark.parametrize("unit", ["image", "patient"])
@pytest.mark.parametrize("kind", ["prv", "rdp"])
def test_dp_sgd_entries_recompute_and_match_dp_accounting(unit: str, kind: str) -> None:
    from taskvec.privacy.accounting import PRV, RDP

    e = _dp_sgd(unit, PRV if kind == "prv" else RDP)
    acc: Any = PLDAccountant(value_discretization_interval=1e-3) if kind == "prv" else RdpAccountant()
    acc.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.05, dpa.GaussianDpEvent(1.1)), 120))
    assert e["relation"] == "add-remove" and e["unit"] == unit
    assert e["epsilon"] == pytest.approx(float(acc.get_epsilon(1e-5)), rel=0.02)
    verify_ledger([e], "v")


def _entry(**kw: Any) -> dict[str, Any]:
    e = gaussian_output_entries([2.0], 1.0, 1e-5, "r")[0]
    e.update(kw)
    return e


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"noise_multiplier": 0.0}, "without noise"),
        ({"noise_multiplier": None}, "without noise"),
        ({"clip": None}, "no clipping bound"),
        ({"unit": "hospital"}, "unknown unit"),
        ({"relation": "swap"}, "unknown relation"),
        ({"mechanism": "laplace"}, "unknown mechanism"),
        ({"epsilon": math.inf}, "finite"),
        ({"delta": 0.0}, "delta"),
        ({"steps": 0}, "steps"),
        ({"releases": [2.0, 2.0]}, "releases"),
        ({"noise_multiplier": 10**400}, "without noise"),  # JSON integers beyond what a float holds
        ({"epsilon": 10**400}, "finite"),
        ({"steps": 10**400}, r"steps must be an integer in \[1, 1e\+09\]"),
        ({"steps": 10**12}, r"steps must be an integer in \[1, 1e\+09\]"),
    ],
)
def test_validate_ledger_refuses_bad_entries(bad: dict[str, Any], match: str) -> None:
    with pytest.raises(PrivacyError, match=match):
        validate_ledger([_entry(**bad)], "v.safetensors")


def test_validate_ledger_refuses_missing_fields() -> None:
    e = _entry()
    del e["relation"]
    with pytest.raises(PrivacyError, match="lacks relation"):
        validate_ledger([e])
    assert validate_ledger([_entry()]) == [_entry()]


def test_a_ledger_holds_one_training() -> None:
    """A second training entry could only lower the ε a budget reads from the vector (the smallest covering
    entry counts): no honest run writes one, so it is refused; a training and its export noise stay together."""
    honest = _dp_sgd("image", PRV)
    loud = _dp_sgd("image", PRV, z=1000.0)
    with pytest.raises(PrivacyError, match="v.safetensors: privacy entries 0, 1 are each a training"):
        validate_ledger([honest, loud], "v.safetensors")
    assert validate_ledger([honest, *gaussian_output_entries([2.0], 1.0, 1e-5, "r")])


def test_parameters_no_accountant_takes_are_a_privacy_error() -> None:
    """A δ of 1e-300 in a Gaussian-sum entry makes the PRV accountant raise; the ledger names entry and file."""
    e = dp_sgd_entry(mechanism="gaussian-sum", epsilon=accountant_epsilon(PRV, 3.79, 1.0, 1, 1e-5), delta=1e-5,
                     accountant=PRV, noise_multiplier=3.79, sample_rate=1.0, steps=1, max_grad_norm=1.0,
                     unit="image", run_id="r")
    verify_ledger([e], "v.safetensors")
    with pytest.raises(PrivacyError, match=r"v.safetensors: privacy entry 0 \(gaussian-sum\)") as err:
        verify_ledger([{**e, "delta": 1e-300}], "v.safetensors")
    assert err.value.field == "epsilon"


@pytest.mark.parametrize("z", [0.025, 0.026, 0.028])
def test_prv_past_its_range_gives_way_to_rdp_never_below_the_exact_epsilon(z: float) -> None:
    """One Gaussian release at rate 1, whose exact ε is the analytic Gaussian's (against PLD above): PRV's ε
    saturates near 709.8 below it (0.026, 0.028), or its integration fails with a warning (0.025). ε is then RDP's,
    at least the exact one, with no warning; a header naming PRV there is refused."""
    import warnings

    from taskvec.privacy.accounting import PRV_MAX_EPSILON, RDP, dp_sgd_epsilon

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eps, accountant = dp_sgd_epsilon([(z, 1.0, 1)], 1e-5)
    assert accountant == RDP and eps >= gaussian_epsilon(z, 1e-5) > PRV_MAX_EPSILON
    e = dp_sgd_entry(mechanism="gaussian-sum", epsilon=709.79, delta=1e-5, accountant=PRV, noise_multiplier=z,
                     sample_rate=1.0, steps=1, max_grad_norm=1.0, unit="image", run_id="r")
    with pytest.raises(PrivacyError, match=r"v: privacy entry 0 \(gaussian-sum\): the PRV accountant"):
        verify_ledger([e], "v")
    assert verify_ledger([{**e, "epsilon": eps, "accountant": RDP}], "v")


@pytest.mark.parametrize("field, value", [("epsilon", 0.5), ("noise_multiplier", 4.0), ("delta", 1e-3)])
def test_tampered_entry_is_refused_naming_file_and_field(field: str, value: float) -> None:
    e = _entry(**{field: value})
    if field == "noise_multiplier":
        e["releases"] = [value]  # consistent with itself, but not with the recorded ε
    with pytest.raises(PrivacyError, match="v.safetensors: privacy entry 0 .* claims epsilon") as err:
        verify_ledger([e], "v.safetensors")
    assert err.value.field == "epsilon" and err.value.path == "v.safetensors"


def _header(name: str, contributor: str, run: str | None, privacy: list[dict[str, Any]]) -> Header:
    """A vector header holding what check_merge_budget reads."""
    return vector_header(name, contributor=contributor, run=run, privacy=privacy)


def test_budgets_name_their_unit() -> None:
    image = _dp_sgd("image", "opacus-prv (Gopi et al. 2021)", z=3.0, steps=20)
    assert image["epsilon"] < 2
    h = [_header("img.safetensors", "a", "r", [image])]
    check_merge_budget(h, PrivacyBudget(2.0, "image"))
    with pytest.raises(PrivacyError, match="contributor 'a': no guarantee per patient .* group privacy"):
        check_merge_budget(h, PrivacyBudget(2.0, "patient"))
    with pytest.raises(PrivacyConfigError, match="^unit must name") as err:
        check_merge_budget(h, PrivacyBudget(2.0))
    assert err.value.field == "unit"
    add_remove, replace_one = gaussian_output_entries([2.0], 1.0, 1e-5, "s")
    site = [_header("site.safetensors", "b", "s", [add_remove, replace_one])]
    rec = check_merge_budget(site, PrivacyBudget(10.0, "patient"))  # any change of the data: sensitivity 2C
    assert rec["contributors"]["b"]["epsilon"] == pytest.approx(replace_one["epsilon"])
    rec = check_merge_budget(site, PrivacyBudget(10.0, "site"))
    assert rec["contributors"]["b"]["epsilon"] == pytest.approx(add_remove["epsilon"])
    with pytest.raises(PrivacyError, match="per patient"):  # the site add-remove ε alone bounds no patient
        check_merge_budget([_header("s.safetensors", "b", "s", [add_remove])], PrivacyBudget(10.0, "patient"))


def test_budget_composes_the_vectors_of_one_contributor() -> None:
    a1 = gaussian_output_entries([2.0], 1.0, 1e-5, "r1")
    a2 = gaussian_output_entries([2.0, 3.0], 1.0, 1e-5, "r1")  # the run's second export composes the first
    b = gaussian_output_entries([2.0], 1.0, 1e-5, "r2")
    one_run = [_header("x1", "a", "r1", a1), _header("x2", "a", "r1", a2)]
    rec = check_merge_budget(one_run, PrivacyBudget(5.0, "site"))
    assert rec["contributors"]["a"] == {"epsilon": a2[0]["epsilon"], "delta": 1e-5, "vectors": 2, "runs": 1,
                                        "earlier": 0, "composition": "single run"}
    two_runs = [_header("x1", "a", "r1", a1), _header("y", "a", "r2", b)]
    rec = check_merge_budget(two_runs, PrivacyBudget(5.0, "site"))
    # two Gaussian releases of the site's data compose exactly (μ-GDP), tighter than adding ε and δ
    tight = pld_epsilon(dpa.ComposedDpEvent([dpa.GaussianDpEvent(2.0)] * 2), 1e-5)
    assert rec["contributors"]["a"]["epsilon"] == pytest.approx(tight, rel=0.02)
    assert tight < 2 * a1[0]["epsilon"]
    assert rec["contributors"]["a"]["delta"] == pytest.approx(1e-5)
    with pytest.raises(PrivacyError, match=r"contributor 'a': ε = .* 2 vectors from 2 runs composed, above"):
        check_merge_budget(two_runs, PrivacyBudget(1.2 * a1[0]["epsilon"], "site"))
    apart = [_header("x1", "a", "r1", a1), _header("y", "b", "r2", b)]  # other contributors: parallel
    check_merge_budget(apart, PrivacyBudget(1.2 * a1[0]["epsilon"], "site"))
    (dp,) = name_model([_dp_sgd("patient", "opacus-prv (Gopi et al. 2021)")], "ab" * 32)
    both = [_header("m1", "c", "r3", [dp]), _header("m2", "c", "r3", [dp, *b])]  # one DP-SGD model, twice
    assert check_merge_budget(both, PrivacyBudget(50.0, "patient"))["contributors"]["c"]["epsilon"] == dp["epsilon"]


def test_no_budget_composes_per_the_one_unit_the_guarantees_name() -> None:
    a1, b = (gaussian_output_entries([2.0], 1.0, 1e-5, r)[:1] for r in ("r1", "r2"))  # per site, add-remove
    two_runs = [_header("x1", "a", "r1", a1), _header("y", "a", "r2", b)]
    rec = check_merge_budget(two_runs, PrivacyBudget())
    assert rec["composed_per"] == {"unit": "site", "relation": "add-remove"}
    assert rec["contributors"]["a"] == check_merge_budget(two_runs, PrivacyBudget(unit="site"))["contributors"]["a"]
    image = _dp_sgd("image", "opacus-prv (Gopi et al. 2021)", z=3.0, steps=20)
    mixed = [*two_runs, _header("z", "c", "r3", [image])]  # no unit that every guarantee covers
    rec = check_merge_budget(mixed, PrivacyBudget())
    assert rec["composed_per"] is None and rec["contributors"] == {}
    both = gaussian_output_entries([2.0], 1.0, 1e-5, "r4")  # site add-remove and replace-one (covers an image)
    rec = check_merge_budget([_header("w", "d", "r4", both), _header("z", "c", "r3", [image])], PrivacyBudget())
    assert rec["composed_per"] == {"unit": "image", "relation": "add-remove"}
    assert (rec["contributors"]["c"]["epsilon"], rec["contributors"]["d"]["epsilon"]) == (
        image["epsilon"], both[1]["epsilon"])


def test_require_dp_and_no_budget() -> None:
    clear = [_header("c.safetensors", "a", None, [])]
    rec = check_merge_budget(clear, PrivacyBudget())
    assert rec["contributors"] == {} and rec["composed_per"] is None
    for budget in (PrivacyBudget(require_dp=True), PrivacyBudget(10.0, "site")):
        with pytest.raises(PrivacyError, match="c.safetensors: carries no DP guarantee"):
            check_merge_budget(clear, budget)


def test_repeated_exports_compose(make_base, make_finetuned, tmp_path: Path) -> None:
    base = make_base()
    ft = make_finetuned(base, 1)
    zs = [1.0, 2.0]
    reports = [export_vector(ft, base, tmp_path / f"v{i}.safetensors", clip=1.0, noise_multiplier=z, delta=1e-5)
               for i, z in enumerate(zs)]
    first, second = (r.privacy[0] for r in reports)
    assert first["steps"] == 1 and first["epsilon"] == pytest.approx(gaussian_epsilon(1.0, 1e-5))
    ref = pld_epsilon(dpa.ComposedDpEvent([dpa.GaussianDpEvent(z) for z in zs]), 1e-5)
    assert second["steps"] == 2 and second["epsilon"] == pytest.approx(ref, rel=0.02)
    assert any("release 2 of this run" in w for w in reports[1].warnings)
    assert read_kind(reports[1].path, "vector").meta["privacy"] == reports[1].privacy
    assert (ft.parent / RELEASES_FILE).exists()
    other = make_finetuned(base, 2)  # another fine-tune in the same folder is another run
    r = export_vector(other, base, tmp_path / "w.safetensors", clip=1.0, noise_multiplier=1.0, delta=1e-5)
    assert r.privacy[0]["steps"] == 1


def test_epsilon_solves_for_the_budget_left(make_base, make_finetuned, tmp_path: Path) -> None:
    base = make_base()
    ft = make_finetuned(base, 1)
    r1 = export_vector(ft, base, tmp_path / "a.safetensors", clip=1.0, noise_multiplier=2.0, delta=1e-5)
    assert r1.privacy[0]["epsilon"] < 3.0
    r2 = export_vector(ft, base, tmp_path / "b.safetensors", clip=1.0, epsilon=3.0, delta=1e-5)
    assert r2.privacy[0]["epsilon"] == pytest.approx(3.0, rel=1e-6)  # both exports together, not just this one
    zs = r2.privacy[0]["releases"]
    assert pld_epsilon(dpa.ComposedDpEvent([dpa.GaussianDpEvent(z) for z in zs]), 1e-5) == pytest.approx(3.0, rel=0.02)
    with pytest.raises(PrivacyConfigError, match="^epsilon 3 is already spent"):
        export_vector(ft, base, tmp_path / "c.safetensors", clip=1.0, epsilon=3.0, delta=1e-5)
    assert not (tmp_path / "c.safetensors").exists()


def test_export_order_traps(make_base, make_finetuned, tmp_path: Path) -> None:
    base = make_base()
    ft = make_finetuned(base, 3)
    export_vector(ft, base, tmp_path / "clear.safetensors")
    with pytest.raises(PrivacyError, match="already exported without export-time noise"):
        export_vector(ft, base, tmp_path / "noised.safetensors", clip=1.0, noise_multiplier=1.0, delta=1e-5)
    ft2 = make_finetuned(base, 4)
    export_vector(ft2, base, tmp_path / "n.safetensors", clip=1.0, noise_multiplier=1.0, delta=1e-5)
    with pytest.raises(PrivacyError, match="exported with noise before .* Pass `force`") as err:
        export_vector(ft2, base, tmp_path / "c.safetensors")
    assert err.value.field == "force" and not (tmp_path / "c.safetensors").exists()
    r = export_vector(ft2, base, tmp_path / "c.safetensors", force=True)
    assert any("no longer hold" in w for w in r.warnings)


def test_release_is_recorded_before_the_vector_and_under_a_lock(make_base, make_finetuned, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import threading

    from taskvec.merging import export

    base = make_base()
    ft = make_finetuned(base, 5)
    record = ft.parent / RELEASES_FILE

    def failing_save(*a: Any, **k: Any) -> None:
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(export, "save_tensors", failing_save)
        with pytest.raises(OSError):
            export_vector(ft, base, tmp_path / "v.safetensors", clip=1.0, noise_multiplier=1.0, delta=1e-5)
    (runs,) = json.loads(record.read_text())["runs"].values()
    assert len(runs) == 1  # counted although the vector never appeared: over-counting is the safe side

    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            export_vector(ft, base, tmp_path / f"t{i}.safetensors", clip=1.0, noise_multiplier=1.0, delta=1e-5)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    (runs,) = json.loads(record.read_text())["runs"].values()
    assert len(runs) == 4  # no release lost
    steps = sorted(read_kind(tmp_path / f"t{i}.safetensors", "vector").meta["privacy"][0]["steps"] for i in range(3))
    assert steps == [2, 3, 4]


def test_noised_header_holds_nothing_private(make_base, tmp_path: Path) -> None:
    """An empty site (the base itself) and a real site: their noised headers differ only where they must."""
    import json

    import torch

    from taskvec.models.spec import load_model, model_spec, save_model

    base = make_base()
    bid = read_kind(base, "model").meta["identity"]
    sites = {}
    for name, shift in (("empty", 0.0), ("real", 0.05)):
        module = load_model(base)
        with torch.no_grad():
            for p in module.parameters():
                p.add_(shift * torch.randn_like(p))
        (tmp_path / name).mkdir()
        ident = save_model(module, model_spec(base), tmp_path / name / "model.safetensors", extra={
            "parent": bid, "run_id": f"{name}-run", "privacy": [],
            "training": {"samples": 0 if name == "empty" else 120, "contributor": "site"}})
        declared = {"samples": 120} if name == "real" else {}
        r = export_vector(tmp_path / name, base, tmp_path / f"{name}.safetensors", clip=1.0, noise_multiplier=1.0,
                          delta=1e-5, **declared)
        meta = read_kind(r.path, "vector").meta
        text = json.dumps(meta)
        assert "pre_clip" not in text and "post_clip" not in text
        if name == "real":
            assert ident not in text and f"{r.pre_clip_norm:.6g}" not in text and r.pre_clip_norm > 1
        sites[name] = meta
    empty, real = sites["empty"], sites["real"]
    assert real["samples"] == 120 and real["declared_public"] == ["samples"] == real["privacy"][0]["declared_public"]
    assert empty["samples"] is None and empty["declared_public"] == []
    differ = {k for k in empty.keys() | real.keys() if empty.get(k) != real.get(k)}
    # sha256: of the noised tensors; created: the clock; source and privacy: the run ids (random, not data)
    assert differ <= {"sha256", "created", "source", "privacy", "samples", "declared_public"}
    for a, b in zip(empty["privacy"], real["privacy"]):
        assert {k for k in a if a[k] != b[k]} == {"run_id", "declared_public"}
    assert empty["source"] == {"run_id": "empty-run"} and real["source"] == {"run_id": "real-run"}


def test_dp_sgd_ledger_round_trips_through_export_and_merge(make_base, tmp_path: Path) -> None:
    """A model carrying a dp-sgd entry: its vector inherits it, export noise adds site entries, the merge
    records each contributor's composed ε, and budgets are enforced before any tensor is read."""
    import torch

    from taskvec.merging.stream import merge_vectors
    from taskvec.models.spec import load_model, model_spec, save_model
    from taskvec.privacy.accounting import PRV

    base = make_base()
    bid = read_kind(base, "model").meta["identity"]
    entries = []
    for i, z in enumerate([1.5, 0.8]):
        entries.append(_dp_sgd("patient", PRV, z=z))
        entries[-1]["run_id"] = f"run{i}"
        module = load_model(base)
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.01 * (i + 1))
        save_model(module, model_spec(base), tmp_path / f"m{i}.safetensors",
                   extra={"parent": bid, "run_id": f"run{i}", "privacy": [entries[-1]]})
    v0 = export_vector(tmp_path / "m0.safetensors", base, tmp_path / "v0.safetensors", contributor="a")
    v1 = export_vector(tmp_path / "m1.safetensors", base, tmp_path / "v1.safetensors", contributor="b",
                       clip=10.0, noise_multiplier=2.0, delta=1e-5)
    assert v0.privacy == [entries[0]]
    assert v1.privacy[0] == entries[1] and [e["unit"] for e in v1.privacy[1:]] == ["site", "site"]
    assert v1.privacy[1]["run_id"] == "run1"
    vecs = [v0.path, v1.path]
    budget = PrivacyBudget(5.0, "patient", require_dp=True)
    r = merge_vectors(vecs, base, tmp_path / "merged.safetensors", budget=budget)
    meta = read_kind(r.path, "model").meta
    assert [v["privacy"] for v in meta["merge"]["vectors"]] == [v0.privacy, v1.privacy]
    spent = meta["merge"]["privacy_budget"]
    assert spent["unit"] == "patient" and spent["max_epsilon"] == budget.max_epsilon
    site_eps = gaussian_epsilon(1.0, 1e-5)  # replace-one export noise (z/2), below the dp-sgd entry's ε
    assert site_eps < entries[1]["epsilon"]
    assert spent["contributors"]["b"]["epsilon"] == pytest.approx(site_eps)
    assert spent["contributors"]["a"]["epsilon"] == pytest.approx(entries[0]["epsilon"])
    with pytest.raises(PrivacyError, match=f"contributor 'b': ε = {site_eps:.4g} per patient"):
        merge_vectors(vecs, base, tmp_path / "m2.safetensors", budget=PrivacyBudget(4.0, "patient"))
    assert not (tmp_path / "m2.safetensors").exists()


def test_merge_refuses_tampered_ledger(make_base, make_finetuned, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from taskvec.io.files import dump_meta
    from taskvec.merging.stream import merge_vectors

    base = make_base()
    v = export_vector(make_finetuned(base, 5), base, tmp_path / "v.safetensors", clip=1.0, noise_multiplier=1.0,
                      delta=1e-5).path
    meta = copy.deepcopy(read_kind(v, "vector").meta)
    meta["privacy"][0]["epsilon"] = 0.5  # a better ε than the parameters give
    save_file(load_file(str(v)), str(v), metadata=dump_meta(meta))
    with pytest.raises(PrivacyError, match="v.safetensors: privacy entry 0 .* claims epsilon 0.5"):
        merge_vectors([v], base, tmp_path / "m.safetensors")  # refused with no budget at all
    assert not (tmp_path / "m.safetensors").exists()


def test_incremental_merge_checks_and_records_the_budget(make_base, make_finetuned, tmp_path: Path) -> None:
    from taskvec.merging.incremental import merge_incremental

    base = make_base()
    vecs = [export_vector(make_finetuned(base, i), base, tmp_path / f"v{i}.safetensors", clip=1.0,
                          noise_multiplier=2.0, delta=1e-5, contributor=f"s{i}").path for i in range(3)]
    budget = PrivacyBudget(5.0, "patient")
    state = tmp_path / "state"
    r = merge_incremental(vecs[:2], base, state, budget=budget)
    spent = read_kind(r.path, "model").meta["merge"]["privacy_budget"]
    assert spent["max_epsilon"] == 5.0 and set(spent["contributors"]) == {"s0", "s1"}
    with pytest.raises(PrivacyError, match="contributor .s0.*above `max_epsilon` 1"):
        merge_incremental(vecs, base, state, budget=PrivacyBudget(1.0, "patient"))
    assert not (state / "merged-v2.safetensors").exists()
    r = merge_incremental(vecs, base, state, budget=budget)
    assert r.version == 2 and r.mode == "incremental"
    assert set(read_kind(r.path, "model").meta["merge"]["privacy_budget"]["contributors"]) == {"s0", "s1", "s2"}


def test_incremental_state_checks_its_own_recipe(make_base, make_finetuned, tmp_path: Path) -> None:
    """With history.json gone, a state built under another recipe is refused, not reused silently."""
    from taskvec.errors import TaskvecError
    from taskvec.merging.incremental import merge_incremental

    base = make_base()
    vecs = [export_vector(make_finetuned(base, i), base, tmp_path / f"v{i}.safetensors").path for i in range(2)]
    state = tmp_path / "state"
    merge_incremental(vecs[:1], base, state, method="sum")
    (state / "history.json").unlink()
    with pytest.raises(TaskvecError, match="accumulator.safetensors: not a merge state of this recipe"):
        merge_incremental(vecs, base, state, method="dare", seed=3)


@pytest.mark.parametrize("bad", [{"noise_multiplier": -5.0, "clip": 1.0}, {"noise_multiplier": "NaN", "clip": 1.0},
                                 {"noise_multiplier": 2.0, "clip": None}, "abc", {"clip": 1.0}])
def test_a_corrupted_release_record_is_refused_before_it_is_composed(bad: Any, make_base, make_finetuned,
                                                                      tmp_path: Path) -> None:
    """An earlier export's entry that is not a positive noise multiplier and clip would compose into a wrong ε (a
    negative one silently, a string as an internal error): the export refuses the record and writes nothing."""
    import json

    base = make_base()
    ft = make_finetuned(base, 5)
    export_vector(ft, base, tmp_path / "v1.safetensors", clip=1.0, noise_multiplier=1.0, delta=1e-5)
    record = ft.parent / RELEASES_FILE
    d = json.loads(record.read_text())
    (key,) = d["runs"]
    d["runs"][key] = [bad]
    record.write_text(json.dumps(d))
    with pytest.raises(PrivacyError, match="unreadable release record .*release 0"):
        export_vector(ft, base, tmp_path / "v2.safetensors", clip=1.0, noise_multiplier=1.0, delta=1e-5)
    assert not (tmp_path / "v2.safetensors").exists()
