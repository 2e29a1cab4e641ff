"""`merge --method lda-head` / `ridge-head`: statistics vectors summed and the head solved once, equal to the head
of the pooled data computed independently, whatever the order, and incrementally; DP vectors' noise sds summed;
what it refuses before writing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from stats_reference import lda_reference, pooled_features, ridge_reference
from synthetic_data import npz_file

from taskvec.errors import ConfigError, MismatchError, PrivacyConfigError
from taskvec.io.files import read_header, read_kind
from taskvec.merging.export import export_vector
from taskvec.merging.incremental import merge_incremental
from taskvec.merging.stream import merge_vectors
from taskvec.models.spec import ModelSpec, build_base, save_model
from taskvec.privacy.dpsgd import DPConfig
from taskvec.training import sufficient
from taskvec.training.data import ImageDataset, load_data
from taskvec.training.loop import FinetuneConfig, finetune

HEAD = ("classifier.weight", "classifier.bias")


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], ImageDataset, Path]:
    """A base, three sites' statistics vectors (uneven sizes, one without class 0), their pooled data and the
    first site's run folder."""
    tmp = tmp_path_factory.mktemp("sites")
    net, spec = build_base("test_efficientnet", num_classes=2, in_chans=1, img_size=32, seed=0)
    base = tmp / "base.safetensors"
    save_model(net, spec, base)
    train = load_data(npz_file(tmp / "d.npz", n=60), ModelSpec.from_dict(spec.to_dict()), val_fraction=0.0).train
    assert train is not None
    ones = [i for i, y in enumerate(train.targets) if y == 1]
    parts = [list(range(0, 30)), list(range(30, 52)), [i for i in ones if i >= 52]]
    vectors = []
    for j, idx in enumerate(parts):
        run = finetune(base, train.subset(idx), tmp / f"run{j}",
                       FinetuneConfig(train="stats-head:6", val_fraction=0.0, device="cpu", contributor=f"s{j}"))
        vectors.append(export_vector(run.model_path, base, tmp / f"v{j}.safetensors").path)
    return base, vectors, train.subset([i for p in parts for i in p]), tmp / "run0"


@pytest.mark.parametrize("method, reference, strength", [("lda-head", lda_reference, sufficient.DEFAULT_SHRINK),
                                                         ("ridge-head", ridge_reference, sufficient.DEFAULT_RIDGE)])
def test_the_merged_head_is_the_pooled_data_head(sites: Any, tmp_path: Path, method: str, reference: Any,
                                                 strength: float) -> None:
    base, vectors, pooled, _ = sites
    merge_vectors(vectors, base, tmp_path / "m.safetensors", method=method)
    feats, labels = pooled_features(base, pooled)
    record = read_kind(vectors[0], "vector").meta["sufficient"]
    proj = sufficient.projection(record["features"]["projection"]["seed"], feats.shape[1], 6)
    weight, bias = reference(feats, labels, 2, proj, strength)
    got = load_file(str(tmp_path / "m.safetensors"))
    np.testing.assert_allclose(got["classifier.weight"], weight, rtol=1e-3, atol=1e-4 * np.abs(weight).max())
    np.testing.assert_allclose(got["classifier.bias"], bias, rtol=1e-3, atol=1e-4)
    before = load_file(str(base))
    assert all(np.array_equal(v, before[k]) for k, v in got.items() if k not in HEAD)
    merged = read_kind(tmp_path / "m.safetensors", "model").meta["merge"]
    assert merged["method"] == method and len(merged["vectors"]) == 3


@pytest.mark.parametrize("method", ["lda-head", "ridge-head"])
def test_the_merged_head_equals_one_run_on_the_pooled_data(sites: Any, tmp_path: Path, method: str) -> None:
    """To float precision: three sites' summed statistics give the head that one site holding all their images
    releases (the same code path, so only the order of the float64 sums differs)."""
    base, vectors, pooled, _ = sites
    run = finetune(base, pooled, tmp_path / "pooled", FinetuneConfig(train="stats-head:6", val_fraction=0.0,
                                                                      device="cpu"))
    one = export_vector(run.model_path, base, tmp_path / "one.safetensors").path
    merge_vectors(vectors, base, tmp_path / "sites.safetensors", method=method)
    merge_vectors([one], base, tmp_path / "pooled.safetensors", method=method)
    got, want = (load_file(str(tmp_path / f"{n}.safetensors")) for n in ("sites", "pooled"))
    for k in HEAD:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6 * float(np.abs(want[k]).max()))


def test_order_and_increments_do_not_change_the_head(sites: Any, tmp_path: Path) -> None:
    base, vectors, *_ = sites
    merge_vectors(vectors, base, tmp_path / "a.safetensors", method="lda-head")
    merge_vectors(vectors[::-1], base, tmp_path / "b.safetensors", method="lda-head")
    merge_incremental(vectors[:2], base, tmp_path / "state", method="lda-head")
    inc = merge_incremental(vectors, base, tmp_path / "state", method="lda-head")
    assert inc.mode == "incremental" and len(inc.added) == 1
    a, b, c = (load_file(str(p)) for p in (tmp_path / "a.safetensors", tmp_path / "b.safetensors", inc.path))
    for k in HEAD:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(c[k], a[k], rtol=1e-6, atol=1e-7)


def test_the_vector_carries_the_statistics_alone(sites: Any, tmp_path: Path) -> None:
    base, vectors, _, run = sites
    h = read_kind(vectors[0], "vector")
    record = read_kind(run / "statistics.safetensors", "statistics").meta["sufficient"]
    assert set(h.tensors) == set(sufficient.KEYS.values()) and h.meta["sufficient"] == record
    assert all(t.dtype == "F64" for t in h.tensors.values()) and h.meta["privacy"] == []
    stats = load_file(str(run / "statistics.safetensors"))
    assert all(np.array_equal(v, stats[k]) for k, v in load_file(str(vectors[0])).items())
    with pytest.raises(PrivacyConfigError, match="^clip does not apply to a statistics vector"):
        export_vector(run, base, tmp_path / "w.safetensors", clip=1.0, noise_multiplier=1.0, delta=1e-5)
    assert not (tmp_path / "w.safetensors").exists()


def test_dp_vectors_keep_the_run_ledger_and_no_count_and_their_noise_sums(sites: Any, tmp_path: Path) -> None:
    """Two DP vectors: each keeps its run's ledger, the merge solves the head from the summed statistics with
    the summed noise sds √(σ₁² + σ₂²)."""
    base, _, pooled, _ = sites
    paths, sds = [], []
    for j, z in enumerate((2.0, 3.0)):
        dp = DPConfig(max_grad_norm=1.0, delta=1e-5, noise_multiplier=z)
        run = finetune(base, pooled, tmp_path / f"run{j}", FinetuneConfig(train="stats-head:6", val_fraction=0.0,
                                                                          device="cpu", dp=dp))
        paths.append(export_vector(run.model_path, base, tmp_path / f"v{j}.safetensors").path)
        vec = read_kind(paths[-1], "vector").meta
        (entry,) = read_kind(run.model_path, "model").meta["privacy"]
        assert vec["samples"] is None and vec["privacy"] == [entry] and entry["mechanism"] == "gaussian-sum"
        b = 1.25 * (6 / vec["sufficient"]["features"]["dim"]) ** 0.5
        assert vec["sufficient"]["noise_std"]["sums"] == pytest.approx(z * b / 0.45**0.5)
        sds.append(vec["sufficient"]["noise_std"])
    merge_vectors(paths, base, tmp_path / "m.safetensors", method="lda-head")
    merged = read_kind(tmp_path / "m.safetensors", "model").meta["merge"]
    assert [v["privacy"] for v in merged["vectors"]] == [read_kind(p, "vector").meta["privacy"] for p in paths]
    total = {k: sum(load_file(str(p))[key] for p in paths) for k, key in sufficient.KEYS.items()}
    record = read_kind(paths[0], "vector").meta["sufficient"]["features"]
    proj = sufficient.projection(record["projection"]["seed"], record["dim"], 6)
    summed = {k: (sds[0][k] ** 2 + sds[1][k] ** 2) ** 0.5 for k in sds[0]}
    weight, bias = sufficient.solve_lda(total, proj, sufficient.DEFAULT_SHRINK, summed)
    got = load_file(str(tmp_path / "m.safetensors"))
    np.testing.assert_allclose(got["classifier.weight"], weight, rtol=1e-5, atol=1e-6 * np.abs(weight).max())
    np.testing.assert_allclose(got["classifier.bias"], bias, rtol=1e-5, atol=1e-6)
    assert all(p.exists() for p in paths)


def _tampered(src: Path, out: Path, change: Any) -> Path:
    h = read_header(src)
    meta = json.loads(json.dumps(h.meta))
    change(meta["sufficient"])
    save_file(load_file(str(src)), str(out), metadata={"format": "pt", "taskvec": json.dumps(meta)})
    return out


@pytest.mark.parametrize("field, change", [
    ("sufficient.features.backbone", lambda r: r["features"].update(backbone="0" * 64)),
    ("sufficient.features.projection.seed", lambda r: r["features"]["projection"].update(seed=7)),
    ("sufficient.clip", lambda r: r.update(clip=3.0)),
])
def test_statistics_of_other_features_are_never_summed(sites: Any, tmp_path: Path, field: str, change: Any) -> None:
    base, vectors, *_ = sites
    bad = _tampered(vectors[1], tmp_path / "bad.safetensors", change)
    with pytest.raises(MismatchError, match=f"sufficient.{field.split('.', 1)[1]} is") as err:
        merge_vectors([vectors[0], bad], base, tmp_path / "m.safetensors", method="lda-head")
    assert err.value.field == field and not (tmp_path / "m.safetensors").exists()
    if field.endswith("backbone"):  # alone too: another backbone's features than the base's
        with pytest.raises(MismatchError, match="describe another backbone"):
            merge_vectors([bad], base, tmp_path / "m.safetensors", method="lda-head")


def test_mixed_kinds_and_wrong_methods_are_refused(sites: Any, make_finetuned: Any, tmp_path: Path) -> None:
    base, vectors, *_ = sites
    weights = export_vector(make_finetuned(base, 1), base, tmp_path / "w.safetensors").path
    out = tmp_path / "m.safetensors"
    with pytest.raises(MismatchError, match="carries weight deltas, .* sufficient statistics") as err:
        merge_vectors([vectors[0], weights], base, out, method="lda-head")
    assert err.value.field == "sufficient"
    with pytest.raises(ConfigError, match="carries sufficient statistics, which a head-solving method merges, not "
                                          "mean") as cerr:
        merge_vectors(vectors, base, out, method="mean")
    assert cerr.value.field == "method"
    with pytest.raises(ConfigError, match="solves a head from sufficient statistics"):
        merge_vectors([weights], base, out, method="lda-head")
    assert not out.exists()


def test_a_malformed_record_is_refused_naming_the_field(sites: Any, tmp_path: Path) -> None:
    from taskvec.errors import FileFormatError

    base, vectors, *_ = sites
    bad = _tampered(vectors[0], tmp_path / "bad.safetensors", lambda r: r["features"].update(dim="many"))
    with pytest.raises(FileFormatError, match="sufficient.features.dim is missing or invalid") as err:
        merge_vectors([bad], base, tmp_path / "m.safetensors", method="lda-head")
    assert err.value.field == "sufficient.features.dim"
