"""Typed headers (`taskvec.io.schema`): what every writer writes reads back to the same JSON, files written
before a field existed still read, unknown keys survive, and a bad field is an error that names it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from safetensors.numpy import load_file, save_file

from taskvec.errors import FileFormatError
from taskvec.io.files import read_kind
from taskvec.io.schema import FORMAT_VERSION, ModelHeader, VectorHeader, VectorSummary
from taskvec.merging.export import export_vector
from taskvec.merging.stream import merge_vectors


@pytest.fixture
def files(make_base, make_finetuned, tmp_path: Path) -> dict[str, Path]:
    base = make_base()
    vectors = []
    for seed in (1, 2):
        v = tmp_path / f"v{seed}.safetensors"
        export_vector(make_finetuned(base, seed), base, v, contributor=f"site{seed}", samples=10 + seed)
        vectors.append(v)
    noised = tmp_path / "noised.safetensors"
    export_vector(make_finetuned(base, 3), base, noised, clip=1.0, noise_multiplier=2.0, delta=1e-5)
    merged = tmp_path / "merged.safetensors"
    merge_vectors(vectors, base, merged, method="mean")
    return {"base": base, "vector": vectors[0], "noised": noised, "merged": merged}


def _rewrite(src: Path, dest: Path, meta: dict[str, Any]) -> Path:
    save_file(load_file(str(src)), str(dest), metadata={"format": "pt", "taskvec": json.dumps(meta)})
    return dest


def test_every_written_header_reads_back_to_the_same_json(files: dict[str, Path]) -> None:
    for name, path in files.items():
        h = read_kind(path, "vector" if name in ("vector", "noised") else "model")
        typed = h.vector if h.kind == "vector" else h.model
        assert typed.to_json() == h.meta, name
        assert typed.format_version == FORMAT_VERSION and h.meta["format_version"] == FORMAT_VERSION


def test_attributes_hold_what_the_writers_recorded(files: dict[str, Path]) -> None:
    base = read_kind(files["base"], "model").model
    v = read_kind(files["vector"], "vector").vector
    assert (v.contributor, v.samples, v.base.identity, v.base.number, v.base.lineage) == (
        "site1", 11, base.identity, 0, [])
    assert v.noise_multiplier is None and v.privacy == [] and v.norm is not None and "pre_clip" in v.norm
    noised = read_kind(files["noised"], "vector").vector
    assert noised.noise_multiplier is not None and noised.noise_multiplier > 0 and noised.clip == 1.0
    assert noised.samples is None and "pre_clip" not in (noised.norm or {})  # nothing un-noised in a DP release
    assert [e["mechanism"] for e in noised.privacy] == ["gaussian-output", "gaussian-output"]
    m = read_kind(files["merged"], "model").model
    assert (m.number, m.parent, m.versions()) == (1, base.identity, [base.identity, m.identity])
    assert m.merge is not None and m.merge.method == "mean"
    assert [s.contributor for s in m.merge.vectors] == ["site1", "site2"]
    assert [s.samples for s in m.merge.vectors] == [11, 12]
    assert m.merged_vectors() == {s.sha256: 1 for s in m.merge.vectors}
    child = m.child_lineage()
    assert [(e.version, e.identity) for e in child] == [(0, base.identity), (1, m.identity)]
    assert child[1].vectors == m.merge.vectors


def test_headers_written_before_versions_and_provenance_fields_read(files: dict[str, Path], tmp_path: Path) -> None:
    meta = read_kind(files["vector"], "vector").meta
    old = {k: v for k, v in meta.items() if k not in ("source", "norm", "statistics", "train", "subset", "factors")}
    old["base"] = {"identity": meta["base"]["identity"]}  # no version, no lineage
    v = read_kind(_rewrite(files["vector"], tmp_path / "old.safetensors", old), "vector").vector
    assert (v.base.number, v.base.lineage, v.statistics, v.run_id, v.factors) == (0, None, [], None, None)
    model = {k: v for k, v in read_kind(files["base"], "model").meta.items() if k != "source"}
    m = read_kind(_rewrite(files["base"], tmp_path / "oldbase.safetensors", model), "model").model
    assert (m.number, m.lineage, m.merge, m.source) == (0, None, None, None)


def test_unknown_keys_are_kept_and_written_back(files: dict[str, Path], tmp_path: Path) -> None:
    meta = read_kind(files["merged"], "model").meta
    meta = {**meta, "hospital_note": {"ward": 3},
            "merge": {**meta["merge"], "vectors": [{**meta["merge"]["vectors"][0], "site_tag": "x"}]}}
    m = read_kind(_rewrite(files["merged"], tmp_path / "new.safetensors", meta), "model").model
    assert m.extra == {"hospital_note": {"ward": 3}} and m.merge is not None
    assert m.merge.vectors[0].extra == {"site_tag": "x"}
    assert m.to_json() == meta


@pytest.mark.parametrize(("kind", "change", "field"), [
    ("vector", {"sha256": "abc"}, "sha256"),
    ("vector", {"contributor": 3}, "contributor"),
    ("vector", {"samples": -1}, "samples"),
    ("vector", {"samples": True}, "samples"),
    ("vector", {"labels": "ab"}, "labels"),
    ("vector", {"privacy": {}}, "privacy"),
    ("vector", {"base": {"identity": "z" * 64}}, "base.identity"),
    ("vector", {"base": {"identity": "a" * 64, "version": "1"}}, "base.version"),
    ("vector", {"factors": []}, "factors"),
    ("model", {"identity": None}, "identity"),
    ("model", {"model": []}, "model"),
    ("model", {"parent": "p"}, "parent"),
    ("model", {"version": 1.5}, "version"),
    ("model", {"training": "fast"}, "training"),
    ("model", {"merge": {"vectors": [{"sha256": "a" * 64}]}}, "merge.vectors"),
    ("model", {"merge": {"method": 1}}, "merge.method"),
    # fields inspect, the registry index and the merge read: a wrong type is refused when the file is read
    ("vector", {"created": 5}, "created"),
    ("vector", {"dtype": ["F32"]}, "dtype"),
    ("vector", {"task": 1}, "task"),
    ("vector", {"subset": "yes"}, "subset"),
    ("vector", {"factors": {"head.weight": 5}}, "factors"),
    ("vector", {"factors": {"head.weight": {"rank": "8"}}}, "factors"),
    ("vector", {"factors": {"head.weight": {"rank": 0}}}, "factors"),
    ("vector", {"samples": 10**400}, "samples"),
    ("vector", {"source": {"run_id": [1]}}, "source"),
    ("vector", {"norm": {"pre_clip": "abc"}}, "norm"),
    ("vector", {"norm": "xpre_clipx"}, "norm"),
    ("vector", {"clip": "1"}, "clip"),
    ("vector", {"noise_multiplier": float("inf")}, "noise_multiplier"),
    ("vector", {"privacy": [1]}, "privacy"),
    ("vector", {"privacy": [{"mechanism": "gaussian-output", "epsilon": 0.01}]}, "privacy"),
    ("vector", {"declared_public": "samples"}, "declared_public"),
    ("model", {"created": [1]}, "created"),
    ("model", {"model": {"labels": 5}}, "model"),
    ("model", {"run_id": 5}, "run_id"),
    ("model", {"source": {"run_id": {}}}, "source"),
    ("model", {"privacy": [1]}, "privacy"),
    ("model", {"merge": {"scale": "x"}}, "merge.scale"),
    ("model", {"merge": {"privacy_budget": 3}}, "merge.privacy_budget"),
    ("model", {"merge": {"vectors": [{"sha256": "a" * 64, "contributor": "s", "privacy": [1]}]}}, "merge.vectors"),
    ("model", {"merge": {"vectors": [{"sha256": "a" * 64, "contributor": "s", "run_id": [1]}]}}, "merge.vectors"),
    ("model", {"merge": {"vectors": [{"sha256": "a" * 64, "contributor": "s", "staleness_weight": "x"}]}},
     "merge.vectors"),
])
def test_a_bad_field_is_an_error_naming_it(files: dict[str, Path], tmp_path: Path, kind: str,
                                           change: dict[str, Any], field: str) -> None:
    src = files["vector" if kind == "vector" else "base"]
    meta = {**read_kind(src, kind).meta, **change}
    bad = _rewrite(src, tmp_path / "bad.safetensors", meta)
    with pytest.raises(FileFormatError, match=f"bad.safetensors: taskvec {kind} metadata: {field} ") as err:
        read_kind(bad, kind)
    assert err.value.field == field


def test_missing_required_fields_are_named() -> None:
    with pytest.raises(FileFormatError, match="^sha256 is missing") as err:
        VectorHeader.from_json({"base": {"identity": "a" * 64}, "contributor": "x"})
    assert err.value.field == "sha256"
    with pytest.raises(FileFormatError, match="^model is missing"):
        ModelHeader.from_json({"identity": "a" * 64})
    with pytest.raises(FileFormatError, match="^contributor is missing"):
        VectorSummary.from_json({"sha256": "a" * 64})
    with pytest.raises(FileFormatError, match="^metadata is not an object"):
        ModelHeader.from_json([])


def test_ledger_entries_read_back_to_the_same_json_and_name_a_bad_field() -> None:
    from taskvec.errors import PrivacyError
    from taskvec.io.schema import LedgerEntry
    from taskvec.privacy.ledger import PRV, accountant_epsilon, dp_sgd_entry, gaussian_output_entries

    sgd = dp_sgd_entry(epsilon=accountant_epsilon(PRV, 1.1, 0.05, 120, 1e-5), delta=1e-5, accountant=PRV,
                       noise_multiplier=1.1, sample_rate=0.05, steps=120, max_grad_norm=0.5, unit="patient",
                       run_id="r1")
    old = {k: v for k, v in sgd.items() if k not in ("model", "seeded")}  # written before those fields
    for e in (sgd, old, *gaussian_output_entries([2.0, 3.0], 1.0, 1e-5, None)):
        typed = LedgerEntry.from_json(e)
        assert typed.to_json() == e
    typed = LedgerEntry.from_json(sgd)
    assert (typed.mechanism, typed.unit, typed.steps, typed.clip, typed.seeded, typed.params) == (
        "dp-sgd", "patient", 120, 0.5, False, {"max_grad_norm": 0.5})
    assert LedgerEntry.from_json(old).seeded is None
    for change, fld in (({"unit": "ward"}, "unit"), ({"noise_multiplier": 0}, "noise_multiplier"),
                        ({"max_grad_norm": None}, "clip"), ({"steps": 1.5}, "steps"), ({"delta": 1}, "delta")):
        with pytest.raises(PrivacyError) as err:
            LedgerEntry.from_json({**sgd, **change})
        assert err.value.field == fld
    with pytest.raises(PrivacyError, match="^lacks epsilon"):
        LedgerEntry.from_json({k: v for k, v in sgd.items() if k != "epsilon"})
