"""Asynchronous rounds: the schedule (who arrives when, from which version), a short simulation under label
skew that beats one-shot merging, re-basing checked in the files, and resuming."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from taskvec.errors import ConfigError
from taskvec.io.files import read_header
from taskvec.simulation.schedule import SPEED_RANGE, Schedule, default_speeds, plan_schedule
from taskvec.simulation.simulate import SimulationConfig, simulate
from taskvec.simulation.synthetic import write_classification_npz

SPEEDS = [1.0, 1.5, 3.0]


def test_schedule_of_three_sites_worked_by_hand() -> None:
    s = plan_schedule(SPEEDS, rounds=3, buffer=3)
    # site0 arrives at 1, 2, 3; site1 at 1.5, 3, 4.5; site2 at 3, 6, 9 (ties in site order)
    assert [(a.site, a.start, a.end, a.base_version) for a in s.arrivals] == [
        (0, 0, 1, 0), (1, 0, 1.5, 0), (0, 1, 2, 0),  # -> v1 at t = 2
        (0, 2, 3, 1), (1, 1.5, 3, 0), (2, 0, 3, 0),  # -> v2 at t = 3, which sites restarting at 3 train from
        (1, 3, 4.5, 2), (2, 3, 6, 2), (2, 6, 9, 2),  # -> v3 at t = 9 (site0 is done after 3 arrivals)
    ]
    assert [(p.version, p.time, p.arrivals) for p in s.versions] == [(1, 2, (0, 1, 2)), (2, 3, (3, 4, 5)),
                                                                    (3, 9, (6, 7, 8))]


def _check(s: Schedule) -> None:
    """Every property a schedule promises, computed independently of how it was planned."""
    n = len(s.speeds)
    for site in range(n):
        mine = [a for a in s.arrivals if a.site == site]
        assert [a.round for a in mine] == list(range(s.rounds))  # exactly R arrivals (so at most R)
        assert mine[0].start == 0 and all(b.start == a.end for a, b in zip(mine, mine[1:], strict=False))
        assert all(a.end == pytest.approx(a.start + s.speeds[site]) for a in mine)
    first = [next(a for a in s.arrivals if a.site == i) for i in range(n)]
    assert [a.site for a in sorted(first, key=lambda a: a.end)] == sorted(range(n), key=lambda i: s.speeds[i])
    assert [a.end for a in s.arrivals] == sorted(a.end for a in s.arrivals)
    merged = [i for p in s.versions for i in p.arrivals]
    assert merged == list(range(len(s.arrivals)))  # each arrival merged once, in arrival order
    assert all(len(p.arrivals) == s.buffer for p in s.versions[:-1]) and 0 < len(s.versions[-1].arrivals) <= s.buffer
    assert [p.version for p in s.versions] == list(range(1, len(s.versions) + 1))
    for p in s.versions:
        assert p.time == s.arrivals[p.arrivals[-1]].end
    for a in s.arrivals:  # trained from the newest version published when it started
        newest = max((p.version for p in s.versions if p.time <= a.start), default=0)
        assert a.base_version == newest, a


@pytest.mark.parametrize(("speeds", "rounds", "buffer"), [
    (SPEEDS, 3, 3), (SPEEDS, 3, 1), (SPEEDS, 2, 2), ([2.0, 2.0, 2.0, 2.0], 3, 4), ([1.0], 4, 3),
    (default_speeds(5, 0), 3, 2), (default_speeds(8, 1), 2, 5),
])
def test_schedule_properties(speeds: list[float], rounds: int, buffer: int) -> None:
    _check(plan_schedule(speeds, rounds, buffer))


def test_default_speeds_follow_the_seed() -> None:
    a, b = default_speeds(4, 0), default_speeds(4, 1)
    assert a == default_speeds(4, 0) and a != b
    assert all(SPEED_RANGE[0] <= s < SPEED_RANGE[1] for s in a + b)


@pytest.mark.parametrize(("speeds", "rounds", "buffer", "field"), [
    ([1.0, 0.0], 2, 2, "speeds"), ([], 2, 2, "speeds"), ([1.0], 0, 2, "rounds"), ([1.0], 2, 0, "buffer"),
    ([1.0, 2.0], 5_001, 2, "rounds"), ([1.0], 10**9, 1, "rounds"),
])
def test_bad_schedule_settings_name_the_parameter(speeds: list[float], rounds: int, buffer: int, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        plan_schedule(speeds, rounds, buffer)
    assert e.value.field == field and str(e.value).startswith(field)


@pytest.fixture(scope="module")
def rounds_sim(tmp_path_factory: pytest.TempPathFactory) -> tuple[SimulationConfig, dict]:
    """3 label-skewed sites (Dirichlet 0.3) of a tiny ConvNeXt, 3 arrivals each at speeds 1, 1.5, 3."""
    root = tmp_path_factory.mktemp("rounds")
    data = write_classification_npz(root / "data.npz", n_train=300, n_val=40, n_test=100, size=32, seed=3)
    cfg = SimulationConfig(data=str(data), out=str(root / "report"), sites=3, split="dirichlet:0.3",
                           arch="test_convnext", in_chans=1, img_size=32, epochs=2, base_epochs=1, lr=1e-3,
                           batch_size=32, methods=["mean"], calibrate=False, rounds=3, speeds=SPEEDS)
    simulate(cfg)
    return cfg, json.loads((root / "report" / "results.json").read_text())


def test_rounds_beat_one_shot_merging_under_label_skew(rounds_sim) -> None:
    cfg, results = rounds_sim
    rows = {r["name"]: r for r in results["rows"]}
    versions = [r for r in results["rows"] if r["group"] == "async"]
    assert [(r["version"], r["arrivals"]) for r in versions] == [(1, 3), (2, 6), (3, 9)]
    one_shot, final = rows["mean"]["value"], versions[-1]["value"]
    assert final >= one_shot + 0.05, (final, one_shot)
    out = Path(cfg.out)
    assert (out / "utility_vs_arrivals.png").stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "| async-v3@9 | async |" in report and "site0→v0 site1→v0 site0→v0 site0→v1" in report


def test_each_arrival_fine_tunes_from_its_version_and_exports_against_it(rounds_sim) -> None:
    cfg, results = rounds_sim
    out = Path(cfg.out)
    schedule = plan_schedule(SPEEDS, 3, 3)
    version_files = [out / "base.safetensors", *(out / "rounds" / f"v{n}.safetensors" for n in (1, 2, 3))]
    identity = [read_header(p).meta["identity"] for p in version_files]
    vectors = []
    for a in schedule.arrivals:
        vec = (out / "vectors" / f"site{a.site}.safetensors" if a.round == 0 else
               out / "rounds" / f"site{a.site}-r{a.round + 1}.safetensors")
        vectors.append(read_header(vec).meta)
        assert vectors[-1]["base"]["identity"] == identity[a.base_version]
        assert vectors[-1]["contributor"] == f"site{a.site}"
        if a.round:
            model = read_header(out / "rounds" / f"site{a.site}-r{a.round + 1}" / "model.safetensors").meta
            assert model["parent"] == identity[a.base_version], a
    seen_stale: list[int] = []
    for p in schedule.versions:
        merged = read_header(version_files[p.version]).meta
        assert merged["parent"] == identity[p.version - 1] and merged["merge"]["method"] == cfg.round_method
        assert [v["sha256"] for v in merged["merge"]["vectors"]] == [vectors[i]["sha256"] for i in p.arrivals]
        stale = [p.version - 1 - schedule.arrivals[i].base_version for i in p.arrivals]
        assert [v["staleness"] for v in merged["merge"]["vectors"]] == stale
        assert [v["staleness_weight"] for v in merged["merge"]["vectors"]] == pytest.approx(
            [(1 + d) ** -cfg.staleness for d in stale])
        seen_stale += stale
    assert max(seen_stale) == 1  # site1's second arrival trained on v0 and was merged onto v1


def test_a_buffer_holding_one_vector_twice_is_refused_naming_why(rounds_sim, tmp_path: Path) -> None:
    import shutil

    from taskvec.errors import MismatchError
    from taskvec.simulation.rounds import _check_distinct

    cfg, _ = rounds_sim
    first, other = (Path(cfg.out) / "vectors" / f"site{i}.safetensors" for i in (0, 1))
    twin = shutil.copy(first, tmp_path / "site0-r2.safetensors")
    with pytest.raises(MismatchError, match="site0-r2.safetensors: fine-tuning again from the same version gave the "
                                            "same vector as .*site0.safetensors"):
        _check_distinct([first, other, twin])
    _check_distinct([first, other])


def test_rounds_resume_from_their_files(rounds_sim) -> None:
    cfg, _ = rounds_sim
    rounds = Path(cfg.out) / "rounds"
    kept = [rounds / "v1.safetensors", rounds / "site0-r2" / "model.safetensors", rounds / "site1-r2.safetensors"]
    before = [p.stat().st_mtime_ns for p in kept]
    (rounds / "v3.safetensors").unlink()  # as if killed while site2 trained its last round
    (rounds / "site2-r3.safetensors").unlink()
    for p in (rounds / "site2-r3").iterdir():
        if p.name != "checkpoint.safetensors":
            p.unlink()
    simulate(cfg)
    assert [p.stat().st_mtime_ns for p in kept] == before
    assert (rounds / "v3.safetensors").exists() and (rounds / "site2-r3.safetensors").exists()
    with pytest.raises(ConfigError, match="speeds must give one relative time per site"):
        simulate(replace(cfg, speeds=[1.0]))
    for name, value in (("speeds", SPEEDS), ("buffer", 2)):  # without rounds they would be ignored
        with pytest.raises(ConfigError, match=f"^{name} shapes the asynchronous rounds; give rounds too"):
            simulate(replace(cfg, **{"rounds": None, "speeds": None, name: value}))


def test_a_simulation_recorded_before_rounds_existed_resumes(tmp_path: Path) -> None:
    data = write_classification_npz(tmp_path / "data.npz", n_train=60, n_val=20, n_test=20, size=32, seed=5)
    cfg = SimulationConfig(data=str(data), out=str(tmp_path / "r"), sites=2, arch="test_vit", in_chans=1, img_size=32,
                           epochs=1, base_epochs=1, methods=["sum"], calibrate=False, batch_size=16)
    simulate(cfg)
    record = tmp_path / "r" / "simulation.json"
    new = ("rounds", "speeds", "buffer", "staleness", "round_method")
    record.write_text(json.dumps({k: v for k, v in asdict(cfg).items() if k not in new}))
    model = tmp_path / "r" / "sites" / "site0" / "model.safetensors"
    before = model.stat().st_mtime_ns
    simulate(cfg)
    assert model.stat().st_mtime_ns == before


def test_dp_rounds_report_each_sites_epsilon_composed_over_its_arrivals(tmp_path: Path) -> None:
    """site0 arrives twice before version 1, site1 twice into version 2: site0's ε must come from the lineage."""
    from taskvec.privacy.ledger import PrivacyBudget, check_merge_budget

    data = write_classification_npz(tmp_path / "data.npz", n_train=60, n_val=20, n_test=30, size=32, seed=4)
    cfg = SimulationConfig(data=str(data), out=str(tmp_path / "r"), sites=2, arch="test_vit", in_chans=1, img_size=32,
                           epochs=1, base_epochs=1, methods=["mean"], calibrate=False, epsilons=[2.0], rounds=2,
                           speeds=[1.0, 2.0], buffer=2)
    res = simulate(cfg)
    final = next(r for r in res.rows if r["group"] == "async" and r["final"] and r["epsilon"] == 2.0)
    rounds = tmp_path / "r" / "rounds-eps2"
    files = {0: [tmp_path / "r" / "vectors-eps2" / "site0.safetensors", rounds / "site0-r2.safetensors"],
             1: [tmp_path / "r" / "vectors-eps2" / "site1.safetensors", rounds / "site1-r2.safetensors"]}
    for site, paths in files.items():
        headers = [read_header(p) for p in paths]
        runs = [next(e["epsilon"] for e in h.meta["privacy"] if e["mechanism"] == "dp-sgd") for h in headers]
        composed = final["composed_epsilon"][f"site{site}"]
        assert max(runs) < composed <= sum(runs) * 1.0001  # both runs count, no worse than adding them
        direct = check_merge_budget(headers, PrivacyBudget(unit="image"))["contributors"][f"site{site}"]
        assert composed == pytest.approx(direct["epsilon"])  # the lineage found every release
    assert "site0" not in read_header(rounds / "v2.safetensors").meta["merge"]["privacy_budget"]["contributors"]
    assert "| 2 | " in (tmp_path / "r" / "report.md").read_text().split("composed over all its arrivals")[1]
