"""Two stages under one budget: a site releases DP statistics (the `stats-head` mode's `gaussian-sum`), the
merger solves the head from them (version 1), the site then runs DP-SGD from version 1, and the merge onto
version 1 composes both of the site's releases in one ledger, as dp-accounting composes the two mechanisms."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dp_accounting as dpa
import pytest
from dp_reference import dp_sgd_steps, pld_epsilon
from safetensors.numpy import load_file, save_file
from synthetic_data import npz_file
from typer.testing import CliRunner

from taskvec.cli.app import app
from taskvec.errors import ConfigError, MismatchError, PrivacyError
from taskvec.io.files import read_header, read_kind
from taskvec.merging.export import export_vector
from taskvec.merging.stream import merge_vectors
from taskvec.models.spec import build_base, save_model
from taskvec.privacy.dpsgd import DPConfig
from taskvec.privacy.ledger import PrivacyBudget
from taskvec.registry.card import render_model_card
from taskvec.training.loop import FinetuneConfig, finetune


def _stage_one(tmp_path: Path, dp: bool = True, seed: int | None = None) -> tuple[Path, Path, Path]:
    """(data, version 1, stage 1's vector) of contributor `h`: its statistics at ε = 1 (or without DP; `seed`: from
    seeded noise), merged."""
    net, spec = build_base("test_efficientnet", num_classes=2, in_chans=1, img_size=32, dp_compatible=True, seed=0)
    base = tmp_path / "base.safetensors"
    save_model(net, spec, base)
    data = npz_file(tmp_path / "d.npz", n=40)
    probe = finetune(base, data, tmp_path / "probe", FinetuneConfig(
        train="stats-head:16", val_fraction=0.0, device="cpu", contributor="h",
        dp=DPConfig(max_grad_norm=1.0, delta=1e-5, target_epsilon=1.0, seed=seed) if dp else None))
    stats = export_vector(probe.model_path, base, tmp_path / "stats.safetensors").path
    v1 = merge_vectors([stats], base, tmp_path / "v1.safetensors", method="lda-head",
                       budget=PrivacyBudget(allow_seeded_noise=seed is not None)).path
    return data, v1, stats


def _body(v1: Path, data: Path, out: Path, target: float, contributor: str | None = "h", resume: bool = False) -> Path:
    return finetune(v1, data, out, FinetuneConfig(
        train="norm-bias", steps=6, val_fraction=0.0, device="cpu", contributor=contributor, resume=resume,
        dp=DPConfig(max_grad_norm=1.0, delta=1e-5, target_epsilon=target, include_lineage=True))).model_path


def test_statistics_then_dp_sgd_compose_in_the_merge_budget(tmp_path: Path) -> None:
    data, v1, stats = _stage_one(tmp_path)  # stage 1: the statistics head, one Gaussian release at ε = 1
    assert read_kind(v1, "model").model.number == 1

    # stage 2: DP-SGD of the norms, biases and head from version 1
    body = finetune(v1, data, tmp_path / "body", FinetuneConfig(
        train="norm-bias", steps=6, val_fraction=0.0, device="cpu", contributor="h",
        dp=DPConfig(max_grad_norm=1.0, delta=1e-5, target_epsilon=2.0)))
    vec = export_vector(body.model_path, v1, tmp_path / "body.safetensors").path

    (first,) = read_kind(stats, "vector").vector.ledger
    (second,) = read_kind(vec, "vector").vector.ledger
    assert (first["mechanism"], second["mechanism"]) == ("gaussian-sum", "dp-sgd")
    want = pld_epsilon([dpa.GaussianDpEvent(first["noise_multiplier"]),
                        dp_sgd_steps(second["noise_multiplier"], second["sample_rate"], second["steps"])], 1e-5)
    assert first["epsilon"] < want and second["epsilon"] < want  # composed, more than either alone

    merged = merge_vectors([vec], v1, tmp_path / "v2.safetensors", method="mean",
                           budget=PrivacyBudget(max_epsilon=want * 1.05, unit="image"))
    spent = merged.record["privacy_budget"]["contributors"]["h"]
    assert (spent["vectors"], spent["earlier"], spent["runs"]) == (2, 1, 2)
    assert spent["epsilon"] == pytest.approx(want, rel=0.03)
    with pytest.raises(PrivacyError, match="1 already in the base's lineage"):  # a budget below the composition
        merge_vectors([vec], v1, tmp_path / "v2b.safetensors", method="mean",
                      budget=PrivacyBudget(max_epsilon=second["epsilon"] * 1.01, unit="image"))


def test_a_run_that_includes_the_lineage_spends_what_stage_one_left(tmp_path: Path) -> None:
    """Stage 2 with `include_lineage` at a total ε of 2: its noise is calibrated so that it and the contributor's
    stage-1 release compose to 2 (dp-accounting's PLD), and a merge held to ε 2 accepts it."""
    data, v1, stats = _stage_one(tmp_path)
    model = _body(v1, data, tmp_path / "body", 2.0)
    vec = export_vector(model, v1, tmp_path / "body.safetensors").path
    (first,) = read_kind(stats, "vector").vector.ledger
    (second,) = read_kind(vec, "vector").vector.ledger
    both = pld_epsilon([dpa.GaussianDpEvent(first["noise_multiplier"]),
                        dp_sgd_steps(second["noise_multiplier"], second["sample_rate"], second["steps"])], 1e-5)
    assert 0.97 * 2.0 <= both <= 2.0 * 1.01 and second["steps"] == 6
    merged = merge_vectors([vec], v1, tmp_path / "v2.safetensors", method="mean",
                           budget=PrivacyBudget(max_epsilon=2.0, unit="image"))
    composed = merged.record["privacy_budget"]["contributors"]["h"]["epsilon"]
    assert 0.97 * 2.0 <= composed <= 2.0
    metrics = json.loads((model.parent / "metrics.json").read_text())
    so_far = [e["composed_epsilon"] for e in metrics["history"]]  # each epoch's total, growing to the run's
    assert len(so_far) > 1 and so_far == sorted(so_far) and first["epsilon"] < so_far[0]
    assert so_far[-1] == metrics["composed_epsilon"] == pytest.approx(composed, rel=1e-6)
    assert _body(v1, data, tmp_path / "body", 2.0, resume=True) == model  # the same prior: the run resumes

    # without a budget the merge still composes both releases (their one unit), and the model card says so
    free = merge_vectors([vec], v1, tmp_path / "v2free.safetensors", method="mean").path
    m = read_kind(free, "model").model
    assert m.merge is not None and m.merge.privacy_budget is not None
    assert m.merge.privacy_budget["composed_per"] == {"unit": "image", "relation": "add-remove"}
    assert m.merge.privacy_budget["contributors"]["h"]["epsilon"] == composed
    card = render_model_card(m, "org/model", {}, "v2")
    assert f"| h | {composed:.3g} | 1.0e-05 | 2 (1 in earlier versions) |" in card
    assert f"dp-sgd ε={second['epsilon']:.3g}" in card and f"{second['epsilon']:.3g}" != f"{composed:.3g}"


def test_a_run_that_includes_the_lineage_is_refused_before_it_starts(tmp_path: Path) -> None:
    data, v1, _ = _stage_one(tmp_path)
    with pytest.raises(PrivacyError, match="earlier releases already spend"):  # stage 1 spent 1 of a total 0.5
        _body(v1, data, tmp_path / "over", 0.5)
    with pytest.raises(PrivacyError, match="earlier releases already spend"):  # a second release of statistics
        finetune(v1, data, tmp_path / "stats2", FinetuneConfig(
            train="stats-head:16", val_fraction=0.0, device="cpu", contributor="h",
            dp=DPConfig(max_grad_norm=1.0, delta=1e-5, target_epsilon=0.9, include_lineage=True)))
    assert not (tmp_path / "stats2").exists()
    with pytest.raises(ConfigError, match="give `contributor`"):
        _body(v1, data, tmp_path / "nobody", 2.0, contributor=None)
    assert not (tmp_path / "over").exists() and not (tmp_path / "nobody").exists()
    other = _body(v1, data, tmp_path / "other", 2.0, contributor="k")  # nothing of `k` in the lineage: ε 2 alone
    (entry,) = read_kind(export_vector(other, v1, tmp_path / "k.safetensors").path, "vector").vector.ledger
    assert 0.97 * 2.0 <= entry["epsilon"] <= 2.0


def test_a_lineage_release_without_dp_cannot_be_calibrated_for(tmp_path: Path) -> None:
    data, v1, _ = _stage_one(tmp_path, dp=False)
    with pytest.raises(PrivacyError, match="has no DP-SGD or Gaussian-sum guarantee per image"):
        _body(v1, data, tmp_path / "body", 2.0)
    assert not (tmp_path / "body").exists()


def test_the_sites_own_earlier_releases_count_whatever_the_lineage_says(tmp_path: Path) -> None:
    """Version 1 comes from the merger: one whose lineage credits the site's stage-1 release to another name
    would have stage 2 calibrated as a first release (overspending the total, with a warning). Given as an earlier
    release, the site's own vector is counted whatever the lineage says, and once when the lineage lists it."""
    data, v1, stats = _stage_one(tmp_path)
    meta = json.loads(json.dumps(read_header(v1).meta))
    meta["merge"]["vectors"][0]["contributor"] = "x"  # a header edit: the model's identity (tensors) is unchanged
    forged = tmp_path / "v1-forged.safetensors"
    save_file(load_file(str(v1)), str(forged), metadata={"format": "pt", "taskvec": json.dumps(meta)})
    (first,) = read_kind(stats, "vector").vector.ledger

    def stage_two(base: Path, name: str, earlier: tuple[str, ...] = ()) -> tuple[dict[str, Any], Any, list[str]]:
        said: list[str] = []
        r = finetune(base, data, tmp_path / name, FinetuneConfig(
            train="norm-bias", steps=6, val_fraction=0.0, device="cpu", contributor="h",
            dp=DPConfig(max_grad_norm=1.0, delta=1e-5, target_epsilon=2.0, include_lineage=True, earlier=earlier)),
            on_warning=said.append)
        (entry,) = read_kind(r.model_path, "model").model.ledger
        return entry, r, said

    def total(entry: dict[str, Any]) -> float:
        return pld_epsilon([dpa.GaussianDpEvent(first["noise_multiplier"]),
                            dp_sgd_steps(entry["noise_multiplier"], entry["sample_rate"], entry["steps"])], 1e-5)

    fooled, _, said = stage_two(forged, "fooled")
    assert total(fooled) > 2.1 and any("lineage holds no release of contributor 'h'" in w for w in said)
    kept, result, said = stage_two(forged, "kept", (str(stats),))
    assert 0.97 * 2.0 <= total(kept) <= 2.0 * 1.01
    assert result.composed_epsilon == pytest.approx(total(kept), rel=0.01)
    assert any("in the base's lineage under contributor 'x'; counted from the file" in w for w in said)
    honest, _, _ = stage_two(v1, "honest")
    once, _, said = stage_two(v1, "once", (str(stats),))
    assert once["noise_multiplier"] == honest["noise_multiplier"] == kept["noise_multiplier"]
    assert not [w for w in said if "lineage" in w]
    args = ["finetune", "--base", str(forged), "--data", str(data), "--train", "norm-bias", "--steps", "6",
            "--val-fraction", "0", "--device", "cpu", "--contributor", "h", "--earlier-release", str(stats)]
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "cli"), "--dp", "--target-epsilon", "2",
                                 "--epsilon-includes-lineage"])
    assert r.exit_code == 0, r.output
    said = " ".join(r.output.split())
    assert f"with the earlier releases it counted, ε = {result.composed_epsilon:.2f} in total" in said
    assert f"with the earlier releases ε {result.composed_epsilon:.3g}" in said  # the last epoch's line
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "cli2")])
    assert r.exit_code == 2 and "--earlier-release set up DP-SGD: add --dp" in " ".join(r.output.split())


def test_every_earlier_release_counts_and_each_one_left_out_is_said(tmp_path: Path) -> None:
    """The caller's own `prior` composes with what the lineage and the files add (the total is P, stage 1 and the
    run by dp-accounting); a lineage release of the contributor that the run does not count, and a file released
    under another name, are warned about."""
    data, v1, stats = _stage_one(tmp_path)
    (first,) = read_kind(stats, "vector").vector.ledger
    said: list[str] = []

    def run(name: str, contributor: str = "h", **dp: Any) -> Any:
        return finetune(v1, data, tmp_path / name, FinetuneConfig(
            train="norm-bias", steps=6, val_fraction=0.0, device="cpu", contributor=contributor,
            dp=DPConfig(max_grad_norm=1.0, delta=1e-5, **{"target_epsilon": 4.0, **dp})), on_warning=said.append)

    prior = (2.0, 1.0, 1)  # an earlier Gaussian release the caller counts itself (ε 2.4 alone)
    for name, dp in (("lineage", {"include_lineage": True}), ("file", {"earlier": (str(stats),)})):
        result = run(name, prior=(prior,), **dp)
        (entry,) = read_kind(result.model_path, "model").model.ledger
        total = pld_epsilon([dpa.GaussianDpEvent(prior[0]), dpa.GaussianDpEvent(first["noise_multiplier"]),
                             dp_sgd_steps(entry["noise_multiplier"], entry["sample_rate"], entry["steps"])], 1e-5)
        assert 0.97 * 4.0 <= total <= 4.0 * 1.01, name
        assert result.composed_epsilon == pytest.approx(total, rel=0.01)
    run("alone", target_epsilon=2.0)  # neither the lineage nor a file asked for: nothing to count or warn about
    assert not [w for w in said if "contributor" in w]
    run("as-k", target_epsilon=2.0, earlier=(str(_forged_other_name(stats, tmp_path)),))
    assert [w for w in said if "contributor" in w] == [
        f"{tmp_path / 'as-k.safetensors'}: released as contributor 'k', this run as 'h': counted here, but a merge "
        "budgets the two names apart"]  # the lineage's release of `h` is this file's (one identity): counted
    probe = finetune(v1, data, tmp_path / "probe2", FinetuneConfig(  # another release of `h`, not in the lineage
        train="stats-head:16", val_fraction=0.0, device="cpu", contributor="h",
        dp=DPConfig(max_grad_norm=1.0, delta=1e-5, target_epsilon=1.0)))
    again = export_vector(probe.model_path, v1, tmp_path / "stats2.safetensors").path
    said.clear()
    run("partial", target_epsilon=4.0, earlier=(str(again),))
    assert any(f"lineage lists release(s) of contributor 'h' that this run does not count (v1 input "
               f"{read_kind(stats, 'vector').vector.sha256[:12]})" in w for w in said)


def _forged_other_name(vector: Path, tmp_path: Path) -> Path:
    """The vector's header rewritten to name contributor `k` (a header edit: identity and ledger unchanged)."""
    meta = json.loads(json.dumps(read_header(vector).meta))
    meta["contributor"] = "k"
    out = tmp_path / "as-k.safetensors"
    save_file(load_file(str(vector)), str(out), metadata={"format": "pt", "taskvec": json.dumps(meta)})
    return out


def test_an_earlier_release_from_seeded_noise_counts_only_in_seeded_runs(tmp_path: Path) -> None:
    data, v1, stats = _stage_one(tmp_path, seed=0)

    def stage_two(name: str, seed: int | None) -> Path:
        return finetune(v1, data, tmp_path / name, FinetuneConfig(
            train="norm-bias", steps=6, val_fraction=0.0, device="cpu", contributor="h",
            dp=DPConfig(max_grad_norm=1.0, delta=1e-5, target_epsilon=2.0, earlier=(str(stats),), seed=seed))
        ).model_path

    with pytest.raises(PrivacyError, match="noise came from a given seed, so it is not secret"):
        stage_two("secret", None)
    assert not (tmp_path / "secret").exists()
    stage_two("seeded", 1)  # a test run: its own noise is not secret either


def test_a_run_resumes_with_another_path_to_its_earlier_releases(tmp_path: Path, monkeypatch: Any) -> None:
    """Interrupted after its first epoch, a run resumes given the same earlier release by another path; an option
    that changed is named by its dotted name."""
    data, v1, stats = _stage_one(tmp_path)
    monkeypatch.chdir(tmp_path)

    def stage_two(earlier: str, target: float = 2.0, resume: bool = True, on_epoch: Any = None) -> Path:
        return finetune(v1, data, tmp_path / "body", FinetuneConfig(
            train="norm-bias", steps=8, val_fraction=0.0, device="cpu", contributor="h", resume=resume,
            dp=DPConfig(max_grad_norm=1.0, delta=1e-5, target_epsilon=target, earlier=(earlier,))),
            on_epoch=on_epoch).model_path

    def stop(record: Any) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stage_two(stats.name, resume=False, on_epoch=stop)
    with pytest.raises(MismatchError, match=r"started with dp.target_epsilon 2.0 \(now 3.0\)"):
        stage_two(str(stats), 3.0)
    assert stage_two(str(stats)).exists()  # the same file by its full path: the same options
