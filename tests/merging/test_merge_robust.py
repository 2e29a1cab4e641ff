"""A bad site cannot spoil the merge: diagnostics flag scaled, sign-flipped and noise vectors, the merge can
leave them out, robust methods stay near the honest result; contributions and selection on validation data."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from taskvec.io.files import read_kind
from taskvec.merging.diagnose import diagnose
from taskvec.merging.export import export_vector
from taskvec.merging.stream import merge_vectors


@pytest.fixture
def consortium(make_base: Callable[..., Path], tmp_path: Path) -> tuple[Path, Callable[[str, int], Path]]:
    """Honest sites share one direction (the task) plus their own noise; `site(kind, i)` exports one vector."""
    base = make_base("test_vit")
    b = load_file(str(base))
    g = torch.Generator().manual_seed(0)
    common = {k: 0.01 * torch.randn(v.shape, generator=g) for k, v in b.items() if v.is_floating_point()}

    def site(kind: str, i: int) -> Path:
        g = torch.Generator().manual_seed(100 + i)
        own = {k: c + 0.005 * torch.randn(c.shape, generator=g) for k, c in common.items()}
        delta = {
            "honest": own,
            "scaled": {k: 50 * v for k, v in own.items()},
            "flipped": {k: -v for k, v in own.items()},
            "noise": {k: 0.011 * torch.randn(v.shape, generator=g) for k, v in own.items()},
        }[kind]
        ft = tmp_path / f"ft-{kind}{i}.safetensors"
        save_file({k: (v + delta[k]).contiguous() if k in delta else v for k, v in b.items()}, str(ft))
        return export_vector(ft, base, tmp_path / f"{kind}{i}.safetensors", contributor=f"{kind}{i}",
                             samples=10).path

    return base, site


@pytest.mark.parametrize(("kind", "reason"), [("scaled", "× the median norm"),
                                              ("flipped", "points against the median direction"),
                                              ("noise", "under a quarter of the median cosine")])
def test_poisoned_vector_is_flagged_and_excluded(consortium, tmp_path: Path, kind: str, reason: str) -> None:
    base, site = consortium
    honest = [site("honest", i) for i in range(4)]
    bad = site(kind, 9)
    found = diagnose([read_kind(p, "vector") for p in [*honest, bad]])
    assert [d.flag is not None for d in found] == [False] * 4 + [True]
    assert reason in str(found[-1].flag)
    assert all(d.cosine > 0.5 and d.sign_agreement > 0.6 for d in found[:4])
    out = tmp_path / "m.safetensors"
    r = merge_vectors([*honest, bad], base, out, method="mean", exclude_outliers=True)
    assert [e["contributor"] for e in r.record["excluded"]] == [f"{kind}9"]
    assert len(r.record["diagnostics"]) == 5 and r.record["exclude_outliers"] is True
    ref = merge_vectors(honest, base, tmp_path / "ref.safetensors", method="mean")
    assert r.identity == ref.identity  # the same bytes as merging the honest vectors only
    assert [v["contributor"] for v in read_kind(out, "model").meta["merge"]["vectors"]] == [f"honest{i}"
                                                                                           for i in range(4)]


def test_diagnostics_by_hand(consortium) -> None:
    base, site = consortium
    paths = [site("honest", 0), site("honest", 1), site("flipped", 2)]
    headers = [read_kind(p, "vector") for p in paths]
    vs = [load_file(str(p)) for p in paths]
    keys = sorted(vs[0])
    flat = np.stack([np.concatenate([v[k].reshape(-1).double().numpy() for k in keys]) for v in vs])
    med = np.median(flat, axis=0)
    found = diagnose(headers)
    for d, x in zip(found, flat):
        assert d.norm == pytest.approx(np.linalg.norm(x), rel=1e-6)
        assert d.cosine == pytest.approx(x @ med / np.linalg.norm(x) / np.linalg.norm(med), rel=1e-6)
        live = med != 0
        assert d.sign_agreement == pytest.approx(np.mean(np.sign(x[live]) == np.sign(med[live])))


def test_robust_methods_stay_near_the_honest_merge(consortium, tmp_path: Path) -> None:
    base, site = consortium
    honest = [site("honest", i) for i in range(4)]
    b = load_file(str(base))

    def delta(path: Path) -> torch.Tensor:
        m = load_file(str(path))
        return torch.cat([(m[k] - b[k]).reshape(-1) for k in sorted(b) if b[k].is_floating_point()])

    clean = delta(merge_vectors(honest, base, tmp_path / "clean.safetensors", method="mean").path)
    for kind in ("scaled", "flipped", "noise"):
        bad = site(kind, 9)
        err = {}
        for method in ("median", "trimmed_mean", "mean"):
            d = delta(merge_vectors([*honest, bad], base, tmp_path / f"{kind}-{method}.safetensors",
                                    method=method, params={"trim": 0.2} if method == "trimmed_mean" else None).path)
            err[method] = float((d - clean).norm() / clean.norm())
        assert err["median"] < 0.3 and err["trimmed_mean"] < 0.3, (kind, err)
        if kind != "noise":  # the mean is pulled further away (0.4 to 10 times the clean merge's norm)
            assert err["mean"] > 0.39 and err["mean"] > max(err["median"], err["trimmed_mean"]), (kind, err)


def test_cli_help_lists_methods_and_refuses_parameters(consortium, tmp_path: Path, monkeypatch, capsys) -> None:
    from typer.testing import CliRunner

    from taskvec.cli.app import app, main
    from taskvec.merging.methods import MERGE_METHODS

    runner = CliRunner()
    help_text = " ".join(runner.invoke(app, ["merge", "--help"], terminal_width=200).output.split())
    for m in MERGE_METHODS.values():
        assert m.name in help_text and m.reference.split(",")[0] in help_text
    assert "gamma in [0, 1)" in help_text and "trim in [0, 0.5)" in help_text
    base, site = consortium
    v = site("honest", 0)
    out = tmp_path / "m.safetensors"
    for args, printed in ((["--method", "breadcrumbs", "--param", "gamma=2"], "--param gamma must be"),
                          (["--method", "ties", "--density", "0"], "--density must be"),
                          (["--method", "mean", "--param", "trim=0.1"], "--param trim is not a parameter of"),
                          (["--param", "density"], "--param takes NAME=VALUE")):
        monkeypatch.setattr(sys, "argv", ["taskvec", "merge", str(v), "--base", str(base), "--out", str(out), *args])
        with pytest.raises(SystemExit) as e:
            main()
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"error: {printed}") and len(err.splitlines()) == 1, err
        assert not out.exists()


def test_cli_diagnose_and_exclude(consortium, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from taskvec.cli.app import app

    base, site = consortium
    vecs = [*(site("honest", i) for i in range(3)), site("scaled", 9)]
    out = tmp_path / "m.safetensors"
    r = CliRunner().invoke(app, ["merge", *map(str, vecs), "--base", str(base), "--out", str(out),
                                 "--exclude-outliers", "--method", "median"], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "diagnostics against the coordinate-wise median" in r.output
    assert "excluded scaled9" in r.output and "median of 3 vectors" in r.output


@pytest.fixture(scope="module")
def small_consortium(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], Path]:
    """Three sites fine-tune a tiny ViT (no BatchNorm, so scores are exactly reproducible) on their own images."""
    from synthetic_data import image_folder

    from taskvec.models.spec import build_base, save_model
    from taskvec.training.loop import FinetuneConfig, finetune

    tmp = tmp_path_factory.mktemp("consortium")
    torch.manual_seed(0)
    base = tmp / "base.safetensors"
    save_model(*build_base("test_vit", "classification", 2, 3, 32), base)
    vecs = []
    for seed in (1, 2, 3):
        data = image_folder(tmp / f"site{seed}", n_per_class=8, seed=seed)
        cfg = FinetuneConfig(epochs=2, batch_size=8, lr=3e-3, device="cpu", seed=seed, val_fraction=0)
        run = finetune(base, data, tmp / f"run{seed}", cfg)
        vecs.append(export_vector(run.run_dir, base, tmp / f"v{seed}.safetensors", contributor=f"site{seed}").path)
    return base, vecs, image_folder(tmp / "val", n_per_class=10, seed=9)


def _score(path: Path, val: Path) -> float:
    from taskvec.training.evaluate import evaluate_model

    return float(evaluate_model(path, val, "all", device="cpu").metrics["auroc"])


def test_contributions_are_leave_one_out_scores(small_consortium, tmp_path: Path) -> None:
    from taskvec.merging.calibrate import Calibrator

    base, vecs, val = small_consortium
    out = tmp_path / "m.safetensors"
    r = merge_vectors(vecs, base, out, method="mean", scale=0.8, contributions=Calibrator(val, device="cpu"))
    rec = read_kind(out, "model").meta["merge"]["contributions"]
    assert rec == r.record["contributions"] and rec["metric"] == "auroc" and rec["scale"] == 0.8
    assert rec["with_all"] == pytest.approx(_score(out, val))
    for i, s in enumerate(rec["sites"]):
        rest = [v for j, v in enumerate(vecs) if j != i]
        without = _score(merge_vectors(rest, base, tmp_path / f"wo{i}.safetensors", method="mean", scale=0.8).path,
                         val)
        assert s["contributor"] == f"site{i + 1}" and s["without"] == pytest.approx(without)
        assert s["value"] == pytest.approx(rec["with_all"] - without)


def test_selection_picks_the_best_method_and_lambda(small_consortium, tmp_path: Path) -> None:
    from taskvec.merging.calibrate import Calibrator
    from taskvec.merging.methods import weight_methods

    base, vecs, val = small_consortium
    out = tmp_path / "m.safetensors"
    r = merge_vectors(vecs, base, out, method="sum", select=Calibrator(val, grid=(0.5, 1.0, 1.5), device="cpu"))
    sel = read_kind(out, "model").meta["merge"]["selection"]
    rows = {row["method"]: row for row in sel["candidates"]}
    assert set(rows) == set(weight_methods()) and "optimistic" in sel["note"]
    assert all("skipped" not in row for row in sel["candidates"])
    best = max(sel["candidates"], key=lambda row: row["value"])  # the first of equals, as selection does
    assert sel["chosen"] == {"method": best["method"], "scale": best["scale"], "value": best["value"]}
    assert (r.method, r.scale) == (best["method"], best["scale"])
    ref = merge_vectors(vecs, base, tmp_path / "ref.safetensors", method=r.method, scale=r.scale)
    assert ref.identity == r.identity  # the chosen merge, as a plain merge would make it
    assert _score(out, val) == pytest.approx(best["value"])


def test_cli_contributions_prints_the_table(small_consortium, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from taskvec.cli.app import app

    base, vecs, val = small_consortium
    out = tmp_path / "m.safetensors"
    r = CliRunner().invoke(app, ["merge", *map(str, vecs), "--base", str(base), "--out", str(out),
                                 "--method", "mean", "--contributions", str(val)], terminal_width=200)
    assert r.exit_code == 0, r.output
    rec = read_kind(out, "model").meta["merge"]["contributions"]
    assert f"auroc {rec['with_all']:.4f} with all vectors" in " ".join(r.output.split())
    for s in rec["sites"]:
        assert s["contributor"] in r.output and f"{s['value']:.4f}" in r.output


def test_merge_imports_no_torch(consortium) -> None:
    """The merge is numpy from reading to writing: no torch import cost on the merger's critical path."""
    import subprocess

    base, site = consortium
    vecs = [str(site("honest", i)) for i in range(3)]
    for method in ("mean", "ties"):
        code = (
            "import sys; from typer.testing import CliRunner; from taskvec.cli.app import app; "
            f"r = CliRunner().invoke(app, ['merge', *{vecs!r}, '--base', {str(base)!r}, '--method', {method!r}, "
            f"'--out', {str(base.parent / (method + '.safetensors'))!r}]); assert r.exit_code == 0, r.output; "
            "assert 'torch' not in sys.modules and 'timm' not in sys.modules, 'heavy import'"
        )
        subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
