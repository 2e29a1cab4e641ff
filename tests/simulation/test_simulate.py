"""`taskvec simulate` on a tiny model and generated data: report files, rows, resume, and the CLI demo path."""

from __future__ import annotations

import json
from dataclasses import MISSING, replace
from pathlib import Path

import pytest

from taskvec.errors import MismatchError, OutputExistsError
from taskvec.simulation.simulate import SimulationConfig, simulate
from taskvec.simulation.synthetic import write_classification_npz
from taskvec.training.evaluate import evaluate_model


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> tuple[SimulationConfig, dict]:
    root = tmp_path_factory.mktemp("sim")
    data = write_classification_npz(root / "data.npz", n_train=160, n_val=40, n_test=60, size=32, seed=3)
    cfg = SimulationConfig(data=str(data), out=str(root / "report"), sites=2, arch="test_vit", in_chans=1,
                           img_size=32, epochs=1, base_epochs=1, methods=["sum", "ties"], batch_size=32)
    simulate(cfg)
    return cfg, json.loads((root / "report" / "results.json").read_text())


def test_report_files_and_rows(sim) -> None:
    cfg, results = sim
    out = Path(cfg.out)
    for name in ("report.md", "results.json", "metric_by_method.png", "base.safetensors"):
        assert (out / name).stat().st_size > 0, name
    names = [r["name"] for r in results["rows"]]
    assert names == ["base", "site0", "site1", "centralised", "sum", "sum+cal", "ties", "ties+cal"]
    assert results["site_samples"] and sum(results["site_samples"]) == json.loads(
        (out / "centralised" / "metrics.json").read_text())["samples"]["train"]
    assert all(0 <= r["value"] <= 1 for r in results["rows"])
    report = (out / "report.md").read_text()
    assert all(f"| {n} |" in report for n in names)
    assert "public share" in report  # the base was trained, and the report says so


def test_rows_match_an_independent_evaluation(sim) -> None:
    cfg, results = sim
    from taskvec.models.spec import model_spec
    from taskvec.training.data import DataSplits, load_data

    out = Path(cfg.out)
    test = load_data(cfg.data, model_spec(out / "base.safetensors"), val_fraction=0.0).test
    row = next(r for r in results["rows"] if r["name"] == "site1")
    again = evaluate_model(out / "sites" / "site1", DataSplits(None, None, test), "test")
    assert again.metrics["auroc"] == pytest.approx(row["metrics"]["auroc"])
    assert results["test_samples"] == len(test) == 60


def test_resume_reuses_finished_sites_and_refuses_other_settings(sim) -> None:
    cfg, _ = sim
    out = Path(cfg.out)
    done = out / "sites" / "site0" / "model.safetensors"
    before = done.stat().st_mtime_ns
    (out / "sites" / "site1" / "model.safetensors").unlink()  # as if killed while site1 trained, before export
    (out / "vectors" / "site1.safetensors").unlink()
    simulate(cfg)
    assert done.stat().st_mtime_ns == before
    assert (out / "sites" / "site1" / "model.safetensors").exists()
    with pytest.raises(OutputExistsError, match="other settings"):
        simulate(replace(cfg, sites=3))
    mine = (out / "vectors" / "site1.safetensors").read_bytes()
    (out / "vectors" / "site1.safetensors").write_bytes((out / "vectors" / "site0.safetensors").read_bytes())
    with pytest.raises(MismatchError, match=r"site1\.safetensors: is not the vector of .*site1"):
        simulate(cfg)  # a vector replaced since is not merged in its site's place
    (out / "vectors" / "site1.safetensors").write_bytes(mine)


def test_dp_runs_reach_their_budget_and_are_reported(tmp_path: Path) -> None:
    from taskvec.io.files import read_kind

    data = write_classification_npz(tmp_path / "data.npz", n_train=120, n_val=30, n_test=40, size=32, seed=4)
    cfg = SimulationConfig(data=str(data), out=str(tmp_path / "r"), sites=2, arch="test_vit", in_chans=1, img_size=32,
                           epochs=1, base_epochs=1, methods=["sum"], calibrate=False, epsilons=[2.0])
    res = simulate(cfg)
    dp_rows = [r for r in res.rows if r["epsilon"] == 2.0]
    assert [r["name"] for r in dp_rows] == ["site0-eps2", "site1-eps2", "centralised-eps2", "sum-eps2"]
    for i in range(2):
        (entry,) = read_kind(tmp_path / "r" / "vectors-eps2" / f"site{i}.safetensors", "vector").meta["privacy"]
        assert entry["mechanism"] == "dp-sgd" and entry["epsilon"] <= 2.0 * 1.0001
    assert (tmp_path / "r" / "utility_vs_epsilon.png").stat().st_size > 0
    assert "| site0-eps2 | local | 2 |" in (tmp_path / "r" / "report.md").read_text()


def test_the_command_line_has_the_library_defaults() -> None:
    """One default per setting: `taskvec simulate` and `SimulationConfig` agree (the CLI's ε list applies with --dp)."""
    import inspect
    from dataclasses import fields

    from taskvec.cli.simulate import simulate as command

    cli = {name: p.default.default for name, p in inspect.signature(command).parameters.items()}
    lib = {f.name: f.default if f.default_factory is MISSING else f.default_factory() for f in fields(SimulationConfig)}
    shared = (set(cli) & set(lib)) - {"data", "out", "methods"}  # no --methods: every method
    assert {"arch", "sites", "split", "epochs", "jobs", "img_size", "lr"} <= shared
    assert {k: cli[k] for k in shared} == {k: lib[k] for k in shared}


def test_seeds_report_mean_and_sd_of_independent_runs(tmp_path: Path) -> None:
    import statistics

    from taskvec.simulation.simulate import simulate_seeds

    data = write_classification_npz(tmp_path / "data.npz", n_train=80, n_val=20, n_test=30, size=32, seed=5)
    cfg = SimulationConfig(data=str(data), out=str(tmp_path / "r"), sites=2, arch="test_vit", in_chans=1, img_size=32,
                           epochs=1, base_epochs=1, methods=["sum"], calibrate=False, batch_size=16)
    res = simulate_seeds(cfg, [0, 1])
    per_seed = [json.loads((tmp_path / "r" / f"seed{s}" / "results.json").read_text())["rows"] for s in (0, 1)]
    assert per_seed[0][1]["value"] != per_seed[1][1]["value"]  # the seed changes splits and training
    for row in res.rows:
        values = [next(r["value"] for r in rows if r["name"] == row["name"]) for rows in per_seed]
        assert row["value"] == pytest.approx(statistics.mean(values))
        assert row["value_sd"] == pytest.approx(statistics.stdev(values))
        assert row["seeds"] == 2
    report = (tmp_path / "r" / "report.md").read_text()
    assert " ± " in report and "seeds 0, 1" in report
    assert (tmp_path / "r" / "metric_by_method.png").stat().st_size > 0


def test_centralised_run_has_the_sites_example_gradients_under_the_default_schedule() -> None:
    from taskvec.privacy.dpsgd import DPConfig
    from taskvec.simulation.simulate import central_steps
    from taskvec.training.loop import FinetuneConfig
    from taskvec.training.schedule import DP_STEPS

    # sites of 160: batch 160 // 8 = 20, max(200, 10 epochs of 8 steps) = 200 steps; the union of 480: batch 32
    assert central_steps([160, 160, 160], FinetuneConfig(train="all")) == -(-3 * 20 * 200 // 32)
    dp = FinetuneConfig(train="all", dp=DPConfig(1.0, 1e-5, target_epsilon=8.0))  # Poisson batches q·n, DP_STEPS steps
    assert central_steps([100, 60], dp) == DP_STEPS  # q·100·T + q·60·T = q·160·T
    assert central_steps([100, 60], FinetuneConfig(epochs=2)) is None
    assert central_steps([100, 60], FinetuneConfig(steps=7)) == 7


def test_a_statistics_head_simulation_exports_and_merges_its_sites(tmp_path: Path) -> None:
    """`train stats-head:P` sites export statistics vectors (with the count their run released, none declared at
    export) and the `lda-head` merge of them is evaluated like any other."""
    from taskvec.io.files import read_kind

    data = write_classification_npz(tmp_path / "data.npz", n_train=120, n_val=30, n_test=40, size=32, seed=5)
    cfg = SimulationConfig(data=str(data), out=str(tmp_path / "r"), sites=2, arch="test_convnext", img_size=32,
                           base_epochs=1, train="stats-head:8", methods=["lda-head"], calibrate=False)
    res = simulate(cfg)
    assert [r["name"] for r in res.rows if r["group"] == "merged"] == ["lda-head"]
    for i in range(2):
        vector = read_kind(tmp_path / "r" / "vectors" / f"site{i}.safetensors", "vector").vector
        site = next(r for r in res.rows if r["name"] == f"site{i}")
        assert vector.sufficient is not None and vector.samples == site["samples"]


def test_a_pixel_statistics_simulation_merges_to_the_centralised_head(tmp_path: Path) -> None:
    """Segmentation sites over an FPN decoder (`--decoder fpn`) release per-pixel statistics; without DP their
    `lda-head` merge is the centralised run's head, so both score the same on the test split. An unknown decoder
    is refused before anything is written."""
    from synthetic_data import seg_folder

    from taskvec.errors import ConfigError
    from taskvec.io.files import read_kind

    data = seg_folder(tmp_path / "seg", n=24, size=32)
    cfg = SimulationConfig(data=str(data), out=str(tmp_path / "r"), task="segmentation", decoder="fpn", sites=2,
                           arch="test_efficientnet", img_size=32, base_epochs=1, train="stats-head:16",
                           methods=["lda-head"], calibrate=False)
    res = simulate(cfg)
    assert read_kind(tmp_path / "r" / "base.safetensors", "model").meta["model"]["decoder"]["arch"] == "fpn"
    rows = {r["name"]: r for r in res.rows}
    assert rows["lda-head"]["metrics"]["dice"] == pytest.approx(rows["centralised"]["metrics"]["dice"], abs=1e-6)
    assert rows["lda-head"]["metrics"]["dice"] != pytest.approx(rows["base"]["metrics"]["dice"], abs=1e-3)
    with pytest.raises(ConfigError, match="decoder must be one of"):
        simulate(replace(cfg, decoder="deeplab", out=str(tmp_path / "bad")))
    assert not (tmp_path / "bad").exists()


def test_one_seed_reports_no_spread() -> None:
    from taskvec.simulation.simulate import aggregate_rows

    row = {"name": "mean", "group": "merged", "epsilon": None, "value": 0.8, "metrics": {"auroc": 0.8}}
    (one,) = aggregate_rows([[row]])
    assert one["value"] == 0.8 and one["value_sd"] is None and one["metrics_sd"] == {"auroc": None}
    (two,) = aggregate_rows([[row], [row | {"value": 0.6, "metrics": {"auroc": 0.6}}]])
    assert two["value_sd"] == pytest.approx(0.1414, abs=1e-4) and two["metrics_sd"]["auroc"] == two["value_sd"]



@pytest.mark.parametrize(("text", "problem"), [("garbage", "cannot be read"), ("[1]", "not a JSON object"),
                                               ('"str"', "not a JSON object")])
def test_an_edited_simulation_record_is_refused(tmp_path: Path, text: str, problem: str) -> None:
    from taskvec.errors import FileFormatError
    from taskvec.simulation.simulate import open_simulation

    (tmp_path / "sim").mkdir()
    (tmp_path / "sim" / "simulation.json").write_text(text)
    cfg = SimulationConfig(data=str(tmp_path / "d.npz"), out=str(tmp_path / "sim"), arch="test_vit")
    with pytest.raises(FileFormatError, match=rf"simulation\.json: (not what taskvec writes there \()?{problem}"):
        open_simulation(cfg)
    assert (tmp_path / "sim" / "simulation.json").read_text() == text
