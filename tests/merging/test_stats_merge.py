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

from taskvec.errors import ConfigError, FileFormatError, MismatchError, PrivacyConfigError
from taskvec.io.files import digest, read_header, read_kind
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
    """Two DP vectors: each keeps its run's ledger and its own centre's clip, the merge solves the head from the
    summed statistics with the summed noise sds √(σ₁² + σ₂²)."""
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
        b, clip = 1.25 * (6 / vec["sufficient"]["features"]["dim"]) ** 0.5, vec["sufficient"]["clip"]
        assert 0 < clip <= b and vec["sufficient"]["centre"]["share"] == 0.1
        assert vec["sufficient"]["noise_std"]["sums"] == pytest.approx(z / 0.9**0.5 * clip / 0.45**0.5)
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


def _tampered(src: Path, out: Path, change: Any = None, tensors: Any = None) -> Path:
    """`src` with `change` applied to its `sufficient` record and `tensors` to its arrays (sha256 recomputed)."""
    h = read_header(src)
    meta = json.loads(json.dumps(h.meta))
    if change is not None:
        change(meta["sufficient"])
    arrays = load_file(str(src))
    if tensors is not None:
        tensors(arrays)
    return _saved(arrays, meta, out)


def _saved(arrays: dict[str, np.ndarray], meta: dict[str, Any], out: Path) -> Path:
    """`arrays` saved with `meta`, its sha256 that of the arrays (a forged but well-formed vector)."""
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    dtypes = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32"}
    meta["sha256"] = digest((k, dtypes[arrays[k].dtype], arrays[k].shape, arrays[k].tobytes()) for k in sorted(arrays))
    save_file(arrays, str(out), metadata={"format": "pt", "taskvec": json.dumps(meta)})
    return out


@pytest.mark.parametrize("field, change", [
    ("sufficient.features.backbone", lambda r: r["features"].update(backbone="0" * 64)),
    ("sufficient.features.projection.seed", lambda r: r["features"]["projection"].update(seed=7)),
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


@pytest.mark.parametrize("field, change", [
    ("features.dim", lambda r: r["features"].update(dim="many")),
    ("centre", lambda r: r.update(centre={"share": 0.1, "point": [0.0] * 5})),  # P is 6
    ("centre", lambda r: r.update(centre={"share": 0.1, "point": [float("nan")] * 6})),
    ("centre", lambda r: r.update(centre={"share": 1.0, "point": [0.0] * 6})),
])
def test_a_malformed_record_is_refused_naming_the_field(sites: Any, tmp_path: Path, field: str, change: Any) -> None:
    base, vectors, *_ = sites
    bad = _tampered(vectors[0], tmp_path / "bad.safetensors", change)
    with pytest.raises(FileFormatError, match=f"sufficient.{field} is missing or invalid") as err:
        merge_vectors([bad], base, tmp_path / "m.safetensors", method="lda-head")
    assert err.value.field == f"sufficient.{field}"


@pytest.mark.parametrize("error, message, tensors", [
    (FileFormatError, "sufficient.counts holds a negative count without noise",
     lambda t: t.update({"sufficient.counts": -t["sufficient.counts"]})),
    (FileFormatError, "sufficient.moments is not a positive semidefinite matrix",
     lambda t: t.update({"sufficient.moments": -t["sufficient.moments"]})),
    (MismatchError, "tensor sufficient.counts has dtype F32, statistics are F64",
     lambda t: t.update({k: v.astype(np.float32) for k, v in t.items()})),
])
def test_statistics_no_data_gives_are_refused(sites: Any, tmp_path: Path, error: type, message: str,
                                              tensors: Any) -> None:
    """Without noise a count is never negative and second moments are positive semidefinite; statistics are
    float64. Each lie is refused with nothing written (they merged into a head before)."""
    base, vectors, *_ = sites
    bad = _tampered(vectors[1], tmp_path / "bad.safetensors", tensors=tensors)
    with pytest.raises(error, match=message):
        merge_vectors([vectors[0], bad], base, tmp_path / "m.safetensors", method="lda-head")
    assert not (tmp_path / "m.safetensors").exists()


def test_noise_sds_and_clip_are_those_of_the_release(sites: Any, tmp_path: Path) -> None:
    """A vector's `noise_std` and `clip` must be what its ledger's release implies: a site cannot claim more
    noise than it added (which would shrink every site's head) or noise without a release."""
    base, vectors, pooled, _ = sites
    dp = DPConfig(max_grad_norm=1.0, delta=1e-5, noise_multiplier=2.0)
    run = finetune(base, pooled, tmp_path / "run", FinetuneConfig(train="stats-head:6", val_fraction=0.0,
                                                                  device="cpu", dp=dp))
    honest = export_vector(run.model_path, base, tmp_path / "dp.safetensors").path
    merge_vectors([honest], base, tmp_path / "ok.safetensors", method="lda-head")

    def tighter(r: dict[str, Any]) -> None:  # another site's centre clip, its noise consistent with it
        r.update(clip=r["clip"] / 2, noise_std=sufficient.noise_std(2.0 / 0.9**0.5, r["clip"] / 2))

    other = _tampered(honest, tmp_path / "other.safetensors", tighter,
                      lambda a: a.update({"sufficient.log_norms": a["sufficient.log_norms"] + 1}))  # another vector
    merge_vectors([honest, other], base, tmp_path / "ok2.safetensors", method="lda-head")  # clips may differ
    implied = "its release .* implies"
    lies = {
        "noise_std": (honest, lambda r: r["noise_std"].update(sums=10 * r["noise_std"]["sums"]), implied),
        "clip": (honest, lambda r: r.update(clip=r["clip"] * 100), implied),  # above the features' bound
        "centre ": (honest, lambda r: r["centre"].update(share=1 - 1e-12), "a statistics head's centre release is"),
        "clip ": (honest, lambda r: r.update(clip=1e-200), implied),  # below the centre's smallest clip
        "centre": (vectors[0], lambda r: r.update(centre={"share": 0.1, "point": [0.0] * 6}),
                   "it records no DP release"),
        "noise_std ": (vectors[0], lambda r: r.update(noise_std=dict.fromkeys(sufficient.KEYS, 1e6)),
                       "it records no DP release"),
    }
    for name, (src, change, message) in lies.items():
        bad = _tampered(src, tmp_path / "bad.safetensors", change)
        with pytest.raises(FileFormatError, match=f"sufficient.{name.strip()} is .*, but {message}") as err:
            merge_vectors([bad], base, tmp_path / "m.safetensors", method="lda-head")
        assert err.value.field == f"sufficient.{name.strip()}" and not (tmp_path / "m.safetensors").exists()


def test_statistics_onto_a_version_that_holds_statistics_are_refused(sites: Any, tmp_path: Path) -> None:
    """Its head came from earlier statistics; solving from the new ones alone would drop them."""
    base, vectors, *_ = sites
    merge_vectors(vectors[:2], base, tmp_path / "v1.safetensors", method="lda-head")
    assert [v["statistics"] for v in read_kind(tmp_path / "v1.safetensors", "model").meta["merge"]["vectors"]] \
        == [True, True]
    with pytest.raises(MismatchError, match="its head was already solved from sufficient statistics") as err:
        merge_vectors(vectors[2:], tmp_path / "v1.safetensors", tmp_path / "v2.safetensors", method="lda-head")
    assert err.value.field == "base" and not (tmp_path / "v2.safetensors").exists()


def test_the_solved_layer_is_the_bases_classifier(sites: Any, tmp_path: Path) -> None:
    """A record naming another layer of the base (its backbone identity recomputed to match) would let the
    merge overwrite that layer: refused."""
    from taskvec.merging.heads import backbone_identity

    base, vectors, *_ = sites
    bh = read_kind(base, "model")
    other = next(k[:-len(".weight")] for k, t in bh.tensors.items() if k.endswith(".weight") and k not in HEAD
                 and len(t.shape) in (2, 4) and bh.tensors.get(k[:-len("weight")] + "bias") is not None)
    keys = [f"{other}.weight", f"{other}.bias"]
    k, dim = bh.tensors[keys[0]].shape[0], int(np.prod(bh.tensors[keys[0]].shape[1:]))
    p = min(6, dim)

    def change(r: dict[str, Any]) -> None:  # a record that fits that layer's shapes
        r.update(head=keys)
        r["features"].update(backbone=backbone_identity(bh, keys), dim=dim)
        r["features"]["projection"].update(dim=p, seed=None if p == dim else 1)

    def tensors(t: dict[str, np.ndarray]) -> None:
        t.update({"sufficient.counts": np.ones(k), "sufficient.sums": np.zeros((k, p)),
                  "sufficient.moments": np.eye(p)})

    bad = _tampered(vectors[0], tmp_path / "bad.safetensors", change, tensors)
    with pytest.raises(MismatchError, match=rf"sufficient.head is .*{other}.* a statistics head solves "
                                            r"\['classifier.weight', 'classifier.bias'\]") as err:
        merge_vectors([bad], base, tmp_path / "m.safetensors", method="lda-head")
    assert err.value.field == "sufficient.head" and not (tmp_path / "m.safetensors").exists()
    arch = _tampered(vectors[0], tmp_path / "arch.safetensors", lambda r: r["features"].update(arch="resnet50"))
    with pytest.raises(MismatchError, match="sufficient.features.arch is resnet50"):
        merge_vectors([arch], base, tmp_path / "m.safetensors", method="lda-head")


def test_a_weight_vector_carrying_a_statistic_is_refused_by_name(sites: Any, make_finetuned: Any,
                                                                 tmp_path: Path) -> None:
    base, *_ = sites
    weights = export_vector(make_finetuned(base, 1), base, tmp_path / "w.safetensors").path
    bad = _saved(load_file(str(weights)) | {"sufficient.counts": np.ones(2, np.float32)},
                 json.loads(json.dumps(read_header(weights).meta)), tmp_path / "bad.safetensors")
    with pytest.raises(MismatchError, match="extra keys sufficient.counts"):
        merge_vectors([bad], base, tmp_path / "m.safetensors", method="mean")
    assert not (tmp_path / "m.safetensors").exists()
