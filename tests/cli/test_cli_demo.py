"""`taskvec demo` writes everything under --out (its data too), refuses a folder holding something else before
writing, and a rerun says in one line that it reuses the finished runs; git ignores the quick start's output."""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

import pytest
from cli_app import invoke

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def small_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo's flow at a test's size: fewer images, one epoch, one merge method."""
    import taskvec.simulation.simulate as sim
    import taskvec.simulation.synthetic as synthetic

    monkeypatch.setattr(synthetic, "write_classification_npz", functools.partial(
        synthetic.write_classification_npz, n_train=60, n_val=12, n_test=24))
    monkeypatch.setattr(sim, "SimulationConfig", functools.partial(
        sim.SimulationConfig, epochs=1, base_epochs=1, methods=["mean"], calibrate=False, batch_size=16,
        device="cpu"))


def test_demo_writes_only_under_out_and_says_when_it_reuses(small_demo, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = invoke("demo", "--out", "demo", "--sites", "2")
    assert code == 0, out + err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # the data is inside, not beside it
    assert (tmp_path / "demo" / "data.npz").is_file() and (tmp_path / "demo" / "report.md").is_file()
    assert "reusing" not in out

    code, again, err = invoke("demo", "--out", "demo", "--sites", "2")
    assert code == 0, again + err
    reuse = [line for line in again.splitlines() if "reusing" in line]
    assert len(reuse) == 1 and "reusing 4 finished runs" in reuse[0], again  # base, two sites, centralised
    assert "fine-tuning" not in again and "training the base" not in again

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, _, err = invoke("demo", "--out", other)
    assert code != 0 and "not a taskvec simulation" in err
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_git_ignores_the_quick_starts_output() -> None:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "--no-index", "taskvec-demo/report.md", "taskvec-demo/data.npz"],
                             cwd=REPO, capture_output=True, text=True)
    assert ignored.stdout.split() == ["taskvec-demo/report.md", "taskvec-demo/data.npz"]
