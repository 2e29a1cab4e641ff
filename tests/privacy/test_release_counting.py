"""Every release counted, however files are copied (issue 22, points 3 and 4): exports of copies of one model
file, two trainings of one run folder, training entries no honest run writes, seeded noise, and older ledgers
without `model` or `seeded`. Composed ε is checked against the analytic μ-GDP formula and dp-accounting."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import dp_accounting as dpa
import pytest
import torch
from dp_reference import pld_epsilon as _pld
from headers import vector_header
from scipy.optimize import brentq
from scipy.stats import norm

from taskvec.errors import PrivacyError
from taskvec.io.files import read_kind
from taskvec.io.schema import VectorSummary
from taskvec.io.tensors import state_digest
from taskvec.merging.export import export_vector
from taskvec.merging.stream import merge_vectors
from taskvec.models.spec import load_model, model_spec, save_model
from taskvec.privacy.accounting import PRV, accountant_epsilon
from taskvec.privacy.ledger import (
    PrivacyBudget,
    check_merge_budget,
    dp_sgd_entry,
    gaussian_output_entries,
    name_model,
    summarize_ledger,
    validate_ledger,
    verify_ledger,
)

DELTA = 1e-5
NOISE: dict[str, Any] = {"clip": 1.0, "noise_multiplier": 1.0, "delta": DELTA}


def gdp_epsilon(noise_multipliers: list[float], delta: float = DELTA) -> float:
    """ε of Gaussian releases composed, from the μ-GDP trade-off curve alone (Dong, Roth & Su 2019, Cor. 2.13):
    δ(ε) = Φ(−ε/μ + μ/2) − e^ε·Φ(−ε/μ − μ/2), μ² = Σ z⁻²."""
    mu = math.sqrt(sum(z**-2 for z in noise_multipliers))
    return float(brentq(lambda e: norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2) - delta,
                        0.0, 100.0))


def pld_epsilon(events: list[Any], delta: float = DELTA) -> float:
    return _pld(events, delta)


def _model(base: Path, folder: Path, run_id: str, shift: float, privacy: list[dict[str, Any]] | None = None,
           ) -> tuple[Path, str]:
    """A fine-tuned taskvec model file (run id, ledger) in its own folder, as a training writes it."""
    module = load_model(base)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(shift)
    folder.mkdir(parents=True, exist_ok=True)
    identity = state_digest(module.state_dict())
    ledger = name_model(privacy, identity) if privacy else []
    path = folder / "model.safetensors"
    assert save_model(module, model_spec(base), path, extra={"parent": read_kind(base, "model").meta["identity"],
                                                              "run_id": run_id, "privacy": ledger}) == identity
    return path, identity


def _spent(merged: Path, who: str = "site") -> dict[str, Any]:
    return dict(read_kind(merged, "model").meta["merge"]["privacy_budget"]["contributors"][who])


def test_exports_of_a_copied_model_file_are_composed(make_base, tmp_path: Path) -> None:
    """A model file copied to a second folder and exported from both: two releases at z = 1 (ε 6.57 at δ 1e-5),
    not one each (4.38), whether both are merged at once or one is already in the base's lineage."""
    base = make_base()
    model, _ = _model(base, tmp_path / "a", "run-1", 0.01)
    (tmp_path / "b").mkdir()
    shutil.copy(model, tmp_path / "b" / "model.safetensors")
    va, vb = (export_vector(tmp_path / d / "model.safetensors", base, tmp_path / f"{d}.safetensors",
                            contributor="site", **NOISE) for d in "ab")
    assert va.privacy[0]["releases"] == vb.privacy[0]["releases"] == [1.0]  # each folder counts one release
    one, two = gdp_epsilon([1.0]), gdp_epsilon([1.0, 1.0])
    assert va.privacy[0]["epsilon"] == pytest.approx(one, rel=1e-4) and two > one + 2
    assert two == pytest.approx(pld_epsilon([dpa.GaussianDpEvent(1.0)] * 2), rel=0.02)

    with pytest.raises(PrivacyError, match=r"contributor 'site': ε = 6\.5.* 2 vectors from 2 runs composed"):
        merge_vectors([va.path, vb.path], base, tmp_path / "m.safetensors",
                      budget=PrivacyBudget((one + two) / 2, "site"))
    both = merge_vectors([va.path, vb.path], base, tmp_path / "m.safetensors", budget=PrivacyBudget(10.0, "site"))
    spent = _spent(both.path)
    assert spent["epsilon"] == pytest.approx(two, rel=1e-4) and (spent["vectors"], spent["runs"]) == (2, 2)

    v1 = merge_vectors([va.path], base, tmp_path / "v1.safetensors", budget=PrivacyBudget(10.0, "site")).path
    v2 = merge_vectors([vb.path], v1, tmp_path / "v2.safetensors", budget=PrivacyBudget(10.0, "site")).path
    assert _spent(v1)["epsilon"] == pytest.approx(one, rel=1e-4)
    spent = _spent(v2)
    assert spent["epsilon"] == pytest.approx(two, rel=1e-4) and spent["earlier"] == 1


def test_one_folder_is_one_history_and_copies_of_a_history_all_count(make_base, tmp_path: Path) -> None:
    """Exports of one folder prove they are one history (each list a prefix of the last, one release per
    length): the last export's ε. A folder copied after its first export, then exported once more in each
    place: both second exports list [2, 1], which alone would claim 2 releases for 3; every list counts."""
    base = make_base()
    model, _ = _model(base, tmp_path / "a", "run-1", 0.01)
    first = export_vector(model, base, tmp_path / "a1.safetensors", contributor="site", clip=1.0,
                          noise_multiplier=2.0, delta=DELTA)
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # the model and its release record
    a2, b2 = (export_vector(tmp_path / d / "model.safetensors", base, tmp_path / f"{d}2.safetensors",
                            contributor="site", **NOISE) for d in "ab")
    assert a2.privacy[0]["releases"] == b2.privacy[0]["releases"] == [2.0, 1.0]

    history = merge_vectors([first.path, a2.path], base, tmp_path / "h.safetensors", budget=PrivacyBudget(20.0, "site"))
    spent = _spent(history.path)
    assert spent["epsilon"] == pytest.approx(gdp_epsilon([2.0, 1.0]), rel=1e-4)
    assert (spent["runs"], spent["composition"]) == (1, "single run")

    copies = merge_vectors([a2.path, b2.path], base, tmp_path / "c.safetensors", budget=PrivacyBudget(20.0, "site"))
    spent = _spent(copies.path)
    true = gdp_epsilon([2.0, 1.0, 1.0])  # a1 (their shared past), a2 and b2
    assert spent["epsilon"] == pytest.approx(gdp_epsilon([2.0, 1.0, 2.0, 1.0]), rel=1e-4) and spent["epsilon"] >= true


def _dp_sgd(run: str = "run-1", z: float = 1.1, q: float = 0.05, steps: int = 120, **kw: Any) -> dict[str, Any]:
    return dp_sgd_entry(epsilon=accountant_epsilon(PRV, z, q, steps, DELTA), delta=DELTA, accountant=PRV,
                        noise_multiplier=z, sample_rate=q, steps=steps, max_grad_norm=1.0, unit="image", run_id=run,
                        **kw)


def test_two_trainings_of_one_run_folder_are_composed(make_base, tmp_path: Path) -> None:
    """Two DP-SGD trainings from copies of one run folder: the same run id and entries identical but for the
    model each names. Composed over both runs' steps (against dp-accounting's PLD), not counted once; vectors
    of one model (plain, and noised from a copy of its file) are one training."""
    base = make_base()
    entry = _dp_sgd()
    (m1, id1), (m2, id2) = (_model(base, tmp_path / d, "run-1", s, [entry]) for d, s in (("a", 0.01), ("b", 0.02)))
    l1, l2 = (read_kind(m, "model").meta["privacy"] for m in (m1, m2))
    assert id1 != id2 and l1 == [{**entry, "model": id1}]
    assert [{k: v for k, v in e.items() if k != "model"} for e in l1 + l2] == [entry, entry]
    vectors = [export_vector(m, base, tmp_path / f"v{i}.safetensors", contributor="site").path
               for i, m in enumerate((m1, m2))]
    (tmp_path / "c").mkdir()  # a copy of one model file, exported again (noised): the same training
    noised = export_vector(shutil.copy(m1, tmp_path / "c" / "model.safetensors"), base, tmp_path / "n1.safetensors",
                           contributor="site", clip=1.0, noise_multiplier=50.0, delta=DELTA).path

    once = merge_vectors([vectors[0], noised], base, tmp_path / "once.safetensors", budget=PrivacyBudget(unit="image"))
    assert _spent(once.path)["epsilon"] == pytest.approx(entry["epsilon"])  # one model: one training

    step = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.05, dpa.GaussianDpEvent(1.1)), 120)
    want = pld_epsilon([step, step])
    assert want > entry["epsilon"] * 1.2
    with pytest.raises(PrivacyError, match="contributor 'site': ε = .* 2 vectors from 2 runs composed"):
        merge_vectors(vectors, base, tmp_path / "m.safetensors", budget=PrivacyBudget(entry["epsilon"] * 1.1, "image"))
    spent = _spent(merge_vectors(vectors, base, tmp_path / "m.safetensors", budget=PrivacyBudget(unit="image")).path)
    assert spent["epsilon"] == pytest.approx(want, rel=0.02)
    assert (spent["runs"], spent["composition"]) == (2, PRV)


@pytest.mark.parametrize("mechanism", ["dp-sgd", "gaussian-sum"])
@pytest.mark.parametrize("field, value, match", [
    ("unit", "site", "add-remove per image or patient, got add-remove per site, which no training records"),
    ("relation", "replace-one", "add-remove per image or patient, got replace-one per image, which no training"),
])
def test_training_entries_no_run_writes_are_refused(mechanism: str, field: str, value: str, match: str) -> None:
    """A training entry relabelled site or replace-one (its ε recomputed all the same) would cover every unit."""
    e = {**_dp_sgd(mechanism=mechanism), field: value}
    with pytest.raises(PrivacyError, match=f"^v.safetensors: privacy entry 0: a {mechanism} entry must be {match}"
                       ) as err:
        verify_ledger([e], "v.safetensors")
    assert err.value.field == field
    header = vector_header(privacy=[e])
    with pytest.raises(PrivacyError, match="add-remove per image or patient"):
        check_merge_budget([header], PrivacyBudget(10.0, "patient"))


@pytest.mark.parametrize("field, value", [("model", "not-a-digest"), ("model", 7), ("seeded", "yes"),
                                          ("seeded", 1)])
def test_model_and_seeded_fields_are_typed(field: str, value: Any) -> None:
    with pytest.raises(PrivacyError, match=f"privacy entry 0: {field} must be") as err:
        validate_ledger([{**_dp_sgd(), field: value}], "v")
    assert err.value.field == field


def test_name_model_names_the_training_entries_only() -> None:
    ledger = [_dp_sgd(), *gaussian_output_entries([2.0], 1.0, DELTA, "run-1")]
    named = name_model(ledger, "cd" * 32)
    assert [e.get("model") for e in named] == ["cd" * 32, None, None]
    assert "model" not in ledger[0]  # a new ledger


def test_seeded_noise_is_refused_unless_the_merge_allows_it() -> None:
    seeded = _dp_sgd(seeded=True)
    assert seeded["seeded"] is True and _dp_sgd()["seeded"] is False
    assert summarize_ledger([seeded]).endswith("from seeded noise: not secret")
    header = vector_header("s.safetensors", privacy=[seeded], run="run-1")
    for budget in (PrivacyBudget(), PrivacyBudget(10.0, "image")):
        with pytest.raises(PrivacyError, match=r"^s.safetensors: privacy entry 0 \(dp-sgd\) drew its noise from a "
                                               r"given seed") as err:
            check_merge_budget([header], budget)
        assert err.value.field == "seeded"
    rec = check_merge_budget([header], PrivacyBudget(10.0, "image", allow_seeded_noise=True))
    assert rec["allow_seeded_noise"] is True and rec["contributors"]["h"]["epsilon"] == seeded["epsilon"]
    clean = vector_header("c.safetensors", privacy=[_dp_sgd("run-2")], run="run-2")
    earlier = [("v1 input", VectorSummary("0" * 64, "h", [seeded], run_id="run-1"))]
    with pytest.raises(PrivacyError, match="^v1 input: privacy entry 0 .* given seed"):  # already in the lineage
        check_merge_budget([clean], PrivacyBudget(10.0, "image"), earlier)


def test_entries_without_model_or_seeded_still_read() -> None:
    """Ledgers written before `model` and `seeded`: valid, not seeded, and each vector its own training (two
    vectors of one old DP-SGD run are composed: never under-counted); old lineage summaries read too."""
    old = {k: v for k, v in _dp_sgd().items() if k not in ("model", "seeded")}
    assert verify_ledger([old], "old") == [old]
    vectors = [vector_header(f"{i}.safetensors", privacy=[old], run="run-1") for i in range(2)]
    alone = check_merge_budget(vectors[:1], PrivacyBudget(10.0, "image"))["contributors"]["h"]
    assert alone["epsilon"] == old["epsilon"]
    step = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.05, dpa.GaussianDpEvent(1.1)), 120)
    twice = check_merge_budget(vectors, PrivacyBudget(10.0, "image"))["contributors"]["h"]
    assert twice["epsilon"] == pytest.approx(pld_epsilon([step, step]), rel=0.02) and twice["runs"] == 2
    earlier = [("v1 input", VectorSummary("0" * 64, "h", [old], run_id="run-1"))]
    rec = check_merge_budget(vectors[:1], PrivacyBudget(10.0, "image"), earlier)["contributors"]["h"]
    assert rec["epsilon"] == pytest.approx(twice["epsilon"]) and rec["earlier"] == 1


@pytest.mark.parametrize("unit", ["patient", "image"])
def test_an_export_entry_relabelled_to_an_individual_is_refused(unit: str) -> None:
    """A clipped site delta moves by up to 2C when one patient changes: an export entry per patient or image at
    add-remove (sensitivity C, its ε recomputed all the same) would claim half the true sensitivity."""
    entry = {**gaussian_output_entries([1.0], 1.0, DELTA, "run-1")[0], "unit": unit}
    with pytest.raises(PrivacyError, match=f"a gaussian-output entry must be .* per site, got add-remove per {unit}"):
        verify_ledger([entry], "v")
    honest = gaussian_output_entries([1.0], 1.0, DELTA, "run-1")[1]
    with pytest.raises(PrivacyError, match="sensitivity must be 2 × clip for replace-one") as err:
        verify_ledger([{**honest, "sensitivity": 1.0}], "v")
    assert err.value.field == "sensitivity"


def test_one_run_under_two_contributor_names_is_refused(make_base, tmp_path: Path) -> None:
    """A copied model file exported as 'siteA' and as 'siteA-copy' would be held to two budgets of one release
    each (4.38) where the site spent 6.57: refused, here and against the base's lineage."""
    base = make_base()
    model, _ = _model(base, tmp_path / "a", "run-1", 0.01)
    (tmp_path / "b").mkdir()
    shutil.copy(model, tmp_path / "b" / "model.safetensors")
    va, vb = (export_vector(tmp_path / d / "model.safetensors", base, tmp_path / f"{d}.safetensors",
                            contributor=name, **NOISE) for d, name in (("a", "siteA"), ("b", "siteA-copy")))
    with pytest.raises(PrivacyError, match="^run run-1 is released under contributors siteA, siteA-copy") as e:
        merge_vectors([va.path, vb.path], base, tmp_path / "m.safetensors", budget=PrivacyBudget(5.0, "site"))
    assert e.value.field == "contributor"
    v1 = merge_vectors([va.path], base, tmp_path / "v1.safetensors", budget=PrivacyBudget(5.0, "site")).path
    with pytest.raises(PrivacyError, match="^run run-1 is released under contributors siteA, siteA-copy"):
        merge_vectors([vb.path], v1, tmp_path / "v2.safetensors", budget=PrivacyBudget(5.0, "site"))
