"""Incremental merging: a version built vector by vector equals the full merge of the same vectors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file

from taskvec.errors import MismatchError, TaskvecError
from taskvec.io.files import read_kind
from taskvec.merging.export import export_vector
from taskvec.merging.incremental import merge_incremental
from taskvec.merging.methods import MERGE_METHODS, weight_methods
from taskvec.merging.stream import merge_vectors

torch = pytest.importorskip("torch")


@pytest.fixture
def setup(tmp_path: Path, make_base: Callable[..., Path], make_finetuned: Callable[..., Path]):
    base = make_base(arch="test_resnet")  # has BatchNorm statistics too
    vecs = []
    for i, samples in enumerate([100, 300, 50, 550]):
        ft = make_finetuned(base, seed=i + 1)
        out = tmp_path / f"v{i}.safetensors"
        export_vector(ft, base, out, contributor=f"site{i}", samples=samples)
        vecs.append(out)
    return base, vecs


def _close(a: Path, b: Path) -> None:
    sa, sb = load_file(str(a)), load_file(str(b))
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, msg=k)


STREAMING = [m for m in weight_methods() if MERGE_METHODS[m].recipe().streams]


def test_streaming_methods_are_the_ones_without_consensus() -> None:
    assert set(STREAMING) == {"sum", "mean", "weighted", "dare", "breadcrumbs", "model_stock"}


@pytest.mark.parametrize("method", STREAMING)
def test_incremental_equals_full_merge(setup, tmp_path: Path, method: str) -> None:
    base, vecs = setup
    state = tmp_path / "state"
    r1 = merge_incremental(vecs[:2], base, state, method=method, scale=0.7, seed=5)
    assert (r1.version, r1.mode) == (1, "recomputed")
    r2 = merge_incremental(vecs, base, state, method=method, scale=0.7, seed=5)
    assert (r2.version, r2.mode) == (2, "incremental")
    assert r2.path == state / "merged-v2.safetensors"
    full = tmp_path / "full.safetensors"
    f = merge_vectors(vecs, base, full, method=method, scale=0.7, seed=5)
    _close(r2.path, full)
    meta = read_kind(r2.path, "model").meta
    # the same plan is recorded whole, privacy budget included, in both cases
    assert {k: v for k, v in meta["merge"].items() if k != "version"} == f.record | {"vectors": f.record["vectors"]}
    assert meta["merge"]["privacy_budget"]["max_epsilon"] is None
    assert [v["sha256"] for v in meta["merge"]["vectors"]] == [read_kind(v, "vector").meta["sha256"] for v in vecs]
    assert meta["merge"]["version"] == 2
    history = json.loads((state / "history.json").read_text())["versions"]
    assert [len(v["vectors"]) for v in history] == [2, 4]
    assert history[1]["added"] == [read_kind(v, "vector").meta["sha256"] for v in vecs[2:]]


def test_incremental_reads_only_new_vectors(setup, tmp_path: Path) -> None:
    base, vecs = setup
    state = tmp_path / "state"
    merge_incremental(vecs[:2], base, state, method="mean")
    for v in vecs[:2]:  # the old vectors are not read again: removing their bytes must not matter
        v.write_bytes(v.read_bytes()[:-16] + bytes(16))
    with pytest.raises(TaskvecError):
        merge_vectors(vecs, base, tmp_path / "x.safetensors", method="mean")
    r = merge_incremental(vecs, base, state, method="mean")
    assert r.mode == "incremental" and len(r.added) == 2


def test_up_to_date_and_scale_change(setup, tmp_path: Path) -> None:
    base, vecs = setup
    state = tmp_path / "state"
    merge_incremental(vecs, base, state)
    again = merge_incremental(vecs, base, state)
    assert (again.mode, again.version) == ("up to date", 1)
    assert not (state / "merged-v2.safetensors").exists()
    scaled = merge_incremental(vecs, base, state, scale=0.5, out=tmp_path / "out.safetensors")
    assert scaled.version == 2 and scaled.added == []
    full = tmp_path / "full.safetensors"
    merge_vectors(vecs, base, full, scale=0.5)
    _close(tmp_path / "out.safetensors", full)


def test_dropped_vector_recomputes(setup, tmp_path: Path) -> None:
    base, vecs = setup
    state = tmp_path / "state"
    merge_incremental(vecs, base, state, method="mean")
    r = merge_incremental(vecs[1:], base, state, method="mean")
    assert r.mode == "recomputed" and r.notes
    full = tmp_path / "full.safetensors"
    merge_vectors(vecs[1:], base, full, method="mean")
    _close(r.path, full)


def test_ties_recomputes_each_time(setup, tmp_path: Path) -> None:
    base, vecs = setup
    state = tmp_path / "state"
    merge_incremental(vecs[:2], base, state, method="ties")
    r = merge_incremental(vecs, base, state, method="ties")
    assert (r.mode, r.version) == ("recomputed", 2)
    full = tmp_path / "full.safetensors"
    merge_vectors(vecs, base, full, method="ties")
    _close(r.path, full)


def test_state_is_bound_to_its_recipe(setup, tmp_path: Path, make_base: Callable[..., Path]) -> None:
    base, vecs = setup
    state = tmp_path / "state"
    merge_incremental(vecs[:2], base, state, method="mean")
    with pytest.raises(TaskvecError, match="method 'mean'"):
        merge_incremental(vecs, base, state, method="sum")
    other = make_base(arch="test_vit", name="other.safetensors")
    ft = tmp_path / "ft_other.safetensors"
    from safetensors.torch import save_file

    save_file(load_file(str(other)), str(ft))
    export_vector(ft, other, tmp_path / "o.safetensors", contributor="o")
    with pytest.raises(MismatchError, match="new `state`"):
        merge_incremental([tmp_path / "o.safetensors"], other, state, method="mean")
