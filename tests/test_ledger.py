"""The privacy ledger: schema, ε against Google's dp-accounting, composition of repeated exports, budgets."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import dp_accounting as dpa
import pytest
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

from taskvec.errors import PrivacyError
from taskvec.io.files import read_kind
from taskvec.merging.export import export_vector
from taskvec.privacy.ledger import (
    RELEASES_FILE,
    check_budget,
    gaussian_epsilon,
    gaussian_output_entry,
    strongest_guarantee,
    validate_ledger,
)


def pld_epsilon(event: Any, delta: float) -> float:
    acc = PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(event)
    return float(acc.get_epsilon(delta))


@pytest.mark.parametrize("z", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("delta", [1e-5, 1e-3])
def test_analytic_gaussian_matches_pld(z: float, delta: float) -> None:
    assert gaussian_epsilon(z, delta) == pytest.approx(pld_epsilon(dpa.GaussianDpEvent(z), delta), rel=0.02)


def test_composed_releases_match_pld() -> None:
    zs = [2.0, 3.0, 1.5]
    earlier = [{"noise_multiplier": z} for z in zs[:-1]]
    entry = gaussian_output_entry(zs[-1], 1.0, 1e-5, "run", earlier)
    ref = pld_epsilon(dpa.ComposedDpEvent([dpa.GaussianDpEvent(z) for z in zs]), 1e-5)
    assert entry["epsilon"] == pytest.approx(ref, rel=0.02)
    assert entry["steps"] == 3 and entry["earlier_releases"] == earlier
    assert entry["epsilon"] > gaussian_epsilon(zs[-1], 1e-5)


def _entry(**kw: Any) -> dict[str, Any]:
    e = gaussian_output_entry(2.0, 1.0, 1e-5, "r")
    e.update(kw)
    return e


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"noise_multiplier": 0.0}, "without noise"),
        ({"noise_multiplier": None}, "without noise"),
        ({"clip": None}, "no clipping bound"),
        ({"unit": "hospital"}, "unknown unit"),
        ({"mechanism": "laplace"}, "unknown mechanism"),
        ({"epsilon": math.inf}, "finite"),
        ({"delta": 0.0}, "delta"),
        ({"steps": 0}, "steps"),
    ],
)
def test_validate_ledger_refuses_bad_entries(bad: dict[str, Any], match: str) -> None:
    with pytest.raises(PrivacyError, match=match):
        validate_ledger([_entry(**bad)], "v.safetensors")


def test_validate_ledger_refuses_missing_fields() -> None:
    e = _entry()
    del e["accountant"]
    with pytest.raises(PrivacyError, match="lacks accountant"):
        validate_ledger([e])
    assert validate_ledger([_entry()]) == [_entry()]


def test_budget() -> None:
    weak, strong = _entry(epsilon=8.0), _entry(epsilon=1.0)
    assert strongest_guarantee([weak, strong]) == strong
    check_budget([("a", [weak, strong]), ("b", [strong])], max_epsilon=1.5, require_dp=True)
    with pytest.raises(PrivacyError, match="a: its best guarantee is ε = 8"):
        check_budget([("a", [weak])], max_epsilon=3.0, require_dp=False)
    with pytest.raises(PrivacyError, match="no DP guarantee"):
        check_budget([("a", [])], max_epsilon=None, require_dp=True)
    with pytest.raises(PrivacyError, match="no DP guarantee"):
        check_budget([("a", [])], max_epsilon=10.0, require_dp=False)
    check_budget([("a", [])], max_epsilon=None, require_dp=False)


def test_repeated_exports_compose(make_base, make_finetuned, tmp_path: Path) -> None:
    base = make_base()
    ft = make_finetuned(base, 1)
    zs = [1.0, 2.0]
    reports = [
        export_vector(ft, base, tmp_path / f"v{i}.safetensors", clip=1.0, noise_multiplier=z, delta=1e-5, seed=i)
        for i, z in enumerate(zs)
    ]
    first, second = (r.privacy[-1] for r in reports)
    assert first["steps"] == 1 and first["epsilon"] == pytest.approx(gaussian_epsilon(1.0, 1e-5))
    ref = pld_epsilon(dpa.ComposedDpEvent([dpa.GaussianDpEvent(z) for z in zs]), 1e-5)
    assert second["steps"] == 2 and second["epsilon"] == pytest.approx(ref, rel=0.02)
    assert second["earlier_releases"][0]["vector"] == reports[0].sha256
    assert any("release 2 of this run" in w for w in reports[1].warnings)
    assert read_kind(reports[1].path, "vector").meta["privacy"] == reports[1].privacy
    assert (ft.parent / RELEASES_FILE).exists()
    other = make_finetuned(base, 2)  # another fine-tune in the same folder is another run
    r = export_vector(other, base, tmp_path / "w.safetensors", clip=1.0, noise_multiplier=1.0, delta=1e-5)
    assert r.privacy[-1]["steps"] == 1


def test_noised_export_after_clear_export_is_refused(make_base, make_finetuned, tmp_path: Path) -> None:
    base = make_base()
    ft = make_finetuned(base, 3)
    export_vector(ft, base, tmp_path / "clear.safetensors")
    with pytest.raises(PrivacyError, match="already exported without export-time noise"):
        export_vector(ft, base, tmp_path / "noised.safetensors", clip=1.0, noise_multiplier=1.0, delta=1e-5)


def test_dp_sgd_ledger_round_trips_through_export_and_merge(make_base, tmp_path: Path) -> None:
    """A model carrying a dp-sgd entry: its vector inherits it, export noise adds a site entry, the merge
    lists each contributor's guarantee, and budgets are enforced before any tensor is read."""
    import torch

    from taskvec.merging.stream import merge_vectors
    from taskvec.models.spec import load_model, model_spec, save_model
    from taskvec.privacy.ledger import dp_sgd_entry

    base = make_base()
    bid = read_kind(base, "model").meta["identity"]
    entries = []
    for i, eps in enumerate([2.0, 6.0]):
        entries.append(dp_sgd_entry(epsilon=eps, delta=1e-5, accountant="opacus-prv (Gopi et al. 2021)",
                                    noise_multiplier=1.0, sample_rate=0.1, steps=100, max_grad_norm=1.0,
                                    unit="patient", run_id=f"run{i}"))
        module = load_model(base)
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.01 * (i + 1))
        save_model(module, model_spec(base), tmp_path / f"m{i}.safetensors",
                   extra={"parent": bid, "run_id": f"run{i}", "privacy": [entries[-1]]})
    v0 = export_vector(tmp_path / "m0.safetensors", base, tmp_path / "v0.safetensors")
    v1 = export_vector(tmp_path / "m1.safetensors", base, tmp_path / "v1.safetensors",
                       clip=10.0, noise_multiplier=1.0, delta=1e-5, seed=0)
    assert v0.privacy == [entries[0]]
    assert v1.privacy[0] == entries[1] and v1.privacy[1]["unit"] == "site"
    assert v1.privacy[1]["run_id"] == "run1"
    vecs = [v0.path, v1.path]
    r = merge_vectors(vecs, base, tmp_path / "merged.safetensors", max_epsilon=6.5, require_dp=True)
    meta = read_kind(r.path, "model").meta
    assert [v["privacy"] for v in meta["merge"]["vectors"]] == [v0.privacy, v1.privacy]
    assert meta["merge"]["privacy_budget"] == {"max_epsilon": 6.5, "require_dp": True}
    site_eps = gaussian_epsilon(1.0, 1e-5)  # below the dp-sgd entry's 6.0: the strongest guarantee of v1
    with pytest.raises(PrivacyError, match=f"v1.safetensors: its best guarantee is ε = {site_eps:.4g} per site"):
        merge_vectors(vecs, base, tmp_path / "m2.safetensors", max_epsilon=3.0)
    assert not (tmp_path / "m2.safetensors").exists()


def test_merge_refuses_tampered_ledger(make_base, make_finetuned, tmp_path: Path) -> None:
    from taskvec.io.files import dump_meta
    from taskvec.merging.stream import merge_vectors

    base = make_base()
    v = export_vector(make_finetuned(base, 5), base, tmp_path / "v.safetensors", clip=1.0, noise_multiplier=1.0,
                      delta=1e-5).path
    h = read_kind(v, "vector")
    meta = copy.deepcopy(h.meta)
    meta["privacy"][0]["noise_multiplier"] = 0
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(v)), str(v), metadata=dump_meta(meta))
    with pytest.raises(PrivacyError, match="without noise"):
        merge_vectors([v], base, tmp_path / "m.safetensors", require_dp=True)
