"""Streaming merge against a reference that loads everything; checks, provenance and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from taskvec.errors import ConfigError, FileFormatError, MismatchError, TaskvecError
from taskvec.io.files import read_kind
from taskvec.merging import accumulate, reading
from taskvec.merging.export import export_vector
from taskvec.merging.methods import MERGE_METHODS, combine, vector_seed, weight_methods
from taskvec.merging.stream import merge_vectors

PARAMS = {"ties": {"density": 0.3}, "dare": {"density": 0.6}, "dare_ties": {"density": 0.7},
          "breadcrumbs": {"density": 0.6, "gamma": 0.1}, "trimmed_mean": {"trim": 0.34}}


@pytest.fixture
def three(make_base, make_finetuned, tmp_path: Path):
    base = make_base("test_resnet")
    vecs = [
        export_vector(make_finetuned(base, i), base, tmp_path / f"v{i}.safetensors", samples=10 * (i + 1),
                      contributor=f"site{i}").path
        for i in range(3)
    ]
    return base, vecs


def _reference(base: Path, vecs: list[Path], method: str, scale: float, params: dict, seed: int) -> dict:
    """Load every vector whole and combine each tensor with `methods.combine`."""
    b = load_file(str(base))
    vs = [load_file(str(v)) for v in vecs]
    metas = [read_kind(v, "vector").meta for v in vecs]
    out = {}
    for k, t in b.items():
        if k.endswith(("running_mean", "running_var")):
            out[k] = torch.stack([v[k] for v in vs]).mean(0)
        elif not t.is_floating_point():
            out[k] = t
        else:
            seeds = [vector_seed(seed, meta["sha256"], k) for meta in metas]
            comb = combine(method, [v[k].numpy() for v in vs], params, samples=[m["samples"] for m in metas],
                           seeds=seeds)
            out[k] = t + scale * torch.from_numpy(comb)
    return out


CASES = [(m, 1000) for m in weight_methods()] + [(m, reading.CHUNK_ELEMENTS) for m, spec in MERGE_METHODS.items()
                                               if not spec.recipe().streams]


@pytest.mark.parametrize(("method", "chunk"), CASES)
def test_streaming_merge_equals_load_everything(three, tmp_path: Path, method: str, chunk: int, monkeypatch) -> None:
    base, vecs = three
    monkeypatch.setattr(reading, "CHUNK_ELEMENTS", chunk)  # consensus methods: many chunks per tensor, or one
    params = PARAMS.get(method, {})
    r = merge_vectors(vecs, base, tmp_path / "m.safetensors", method=method, params=params, scale=0.7, seed=3)
    got, want = load_file(str(r.path)), _reference(base, vecs, method, 0.7, params, 3)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6), k
    meta = read_kind(r.path, "model").meta
    rec = meta["merge"]
    assert rec["method"] == method and rec["scale"] == 0.7 and rec["seed"] == 3
    assert rec["params"] == MERGE_METHODS[method].resolve(params)
    assert rec["privacy_budget"]["max_epsilon"] is None and rec["privacy_budget"]["require_dp"] is False
    assert meta["identity"] == r.identity
    assert [v["sha256"] for v in meta["merge"]["vectors"]] == [read_kind(v, "vector").meta["sha256"] for v in vecs]
    assert meta["parent"] == read_kind(base, "model").meta["identity"]


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A test_vit base and 5 vectors whose deltas are exact multiples of 2⁻⁸ (base values are multiples of 2⁻¹⁰):
    every tensor holds many equal magnitudes, so trimming has ties at its threshold."""
    from safetensors.torch import save_file

    from taskvec.models.spec import build_base, save_model

    tmp_path = tmp_path_factory.mktemp("tied")
    torch.manual_seed(0)
    module, spec = build_base("test_vit", "classification", 3, 3, 32)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.round(p * 1024) / 1024)
    base = tmp_path / "base.safetensors"
    save_model(module, spec, base)
    vecs = []
    for i, sd in enumerate([load_file(str(base))] * 5):
        g = torch.Generator().manual_seed(i)
        ft = tmp_path / f"ft{i}.safetensors"
        save_file({k: t + torch.round(2 * torch.randn(t.shape, generator=g)) / 256 for k, t in sd.items()}, str(ft))
        vecs.append(export_vector(ft, base, tmp_path / f"v{i}.safetensors", contributor=f"site{i}").path)
    return base, vecs


STEP = 64  # values of one tensor per vector in a chunk


@pytest.mark.parametrize("n", [4, 5])
@pytest.mark.parametrize("method", [m for m, spec in MERGE_METHODS.items() if not spec.recipe().streams])
def test_consensus_in_chunks_equals_combine_bit_for_bit(tied, tmp_path: Path, monkeypatch, method: str, n: int
                                                        ) -> None:
    from safetensors.numpy import load_file as load_numpy

    base, vecs = tied[0], tied[1][:n]
    monkeypatch.setattr(reading, "CHUNK_ELEMENTS", STEP * n)
    monkeypatch.setattr(accumulate, "BLOCK", 10)  # a chunk's columns in uneven blocks on 3 worker threads
    monkeypatch.setattr(accumulate, "WORKERS", 3)
    params = PARAMS.get(method, {})
    got = load_numpy(str(merge_vectors(vecs, base, tmp_path / "m.safetensors", method=method, params=params,
                                       scale=0.7, seed=3).path))
    deltas = [load_numpy(str(v)) for v in vecs]
    shas = [read_kind(v, "vector").vector.sha256 for v in vecs]
    spanned = tied_at_threshold = 0
    for k, b in load_numpy(str(base)).items():
        x = [d[k] for d in deltas]
        want = combine(method, x, params, seeds=[vector_seed(3, sha, k) for sha in shas]) * np.float32(0.7) + b
        assert got[k].tobytes() == want.tobytes(), k
        spanned += b.size > STEP
        tied_at_threshold += np.unique(np.abs(x[0])).size < b.size // 2
    assert spanned >= 5 and tied_at_threshold >= 5  # tensors over several chunks (a short last one), with ties


def test_dare_does_not_depend_on_order(three, tmp_path: Path) -> None:
    base, vecs = three
    a = merge_vectors(vecs, base, tmp_path / "a.safetensors", method="dare", seed=1)
    b = merge_vectors(vecs[::-1], base, tmp_path / "b.safetensors", method="dare", seed=1)
    la, lb = load_file(str(a.path)), load_file(str(b.path))
    assert all(torch.allclose(la[k], lb[k], atol=1e-6) for k in la)


def test_merged_model_loads_in_taskvec_and_timm(three, tmp_path: Path) -> None:
    import timm

    from taskvec.models.spec import load_model

    base, vecs = three
    r = merge_vectors(vecs, base, tmp_path / "m.safetensors")
    model = load_model(r.path).eval()
    plain = timm.create_model("test_resnet", num_classes=3)
    plain.load_state_dict(load_file(str(r.path)))
    plain.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model(x), plain(x))


def test_vector_from_another_base_fails_before_reading(make_base, make_finetuned, three, tmp_path: Path) -> None:
    base, vecs = three
    other = make_base("test_resnet", name="other.safetensors", in_chans=1)
    foreign = export_vector(make_finetuned(other, 9, name="f.safetensors"), other, tmp_path / "f-vec.safetensors").path
    with pytest.raises(MismatchError, match="f-vec.safetensors: base.identity"):
        merge_vectors([*vecs, foreign], base, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_duplicate_and_corrupted_vectors(three, tmp_path: Path) -> None:
    import json

    from safetensors.torch import save_file

    base, vecs = three
    with pytest.raises(MismatchError, match="same vector"):
        merge_vectors([vecs[0], vecs[1], vecs[0]], base, tmp_path / "m.safetensors")
    # another vector's content under vecs[0]'s sha256: corrupted, not the same vector given twice
    forged = tmp_path / "forged.safetensors"
    meta = dict(read_kind(vecs[1], "vector").meta, sha256=read_kind(vecs[0], "vector").vector.sha256)
    save_file(load_file(str(vecs[1])), str(forged), metadata={"format": "pt", "taskvec": json.dumps(meta)})
    for order in ([vecs[0], forged], [forged, vecs[0]]):
        with pytest.raises(FileFormatError, match="forged.safetensors: content does not match its sha256"):
            merge_vectors(order, base, tmp_path / "m.safetensors")
    data = bytearray(vecs[1].read_bytes())
    data[-3] ^= 0xFF  # flip bits inside the last tensor's bytes
    vecs[1].write_bytes(bytes(data))
    with pytest.raises(FileFormatError, match="does not match its sha256"):
        merge_vectors(vecs, base, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_weighted_without_samples_and_bad_parameters(make_base, make_finetuned, tmp_path: Path) -> None:
    base = make_base()
    v = export_vector(make_finetuned(base, 1), base, tmp_path / "v.safetensors").path
    with pytest.raises(TaskvecError, match="v.safetensors: has no sample count"):
        merge_vectors([v], base, tmp_path / "m.safetensors", method="weighted")
    with pytest.raises(ConfigError, match=r"^density must be a finite number in \(0, 1\], got 1.5") as e:
        merge_vectors([v], base, tmp_path / "m.safetensors", method="ties", density=1.5)
    assert e.value.field == "density"
    with pytest.raises(ConfigError, match="^trim must") as e:
        merge_vectors([v], base, tmp_path / "m.safetensors", method="trimmed_mean", params={"trim": 0.5})
    with pytest.raises(ConfigError, match="^gamma must be at most 1 − density") as e:
        merge_vectors([v], base, tmp_path / "m.safetensors", method="breadcrumbs", params={"gamma": 0.2})
    with pytest.raises(ConfigError, match="^density is not a parameter of method 'mean'; it takes none"):
        merge_vectors([v], base, tmp_path / "m.safetensors", method="mean", density=0.5)
    with pytest.raises(ConfigError, match="^scale must be a finite number"):
        merge_vectors([v], base, tmp_path / "m.safetensors", scale=float("nan"))
    with pytest.raises(TaskvecError, match="model_stock' needs at least 2 vectors"):
        merge_vectors([v], base, tmp_path / "m.safetensors", method="model_stock")
    with pytest.raises(TaskvecError, match=r"^[\w.]+: the merged weights overflow F32 \(λ = 1e\+39\); merge at"):
        merge_vectors([v], base, tmp_path / "m.safetensors", scale=1e39)  # finite, but not in float32
    assert not (tmp_path / "m.safetensors").exists()


def test_nan_in_a_vector_is_refused_naming_it(three, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from taskvec.io.tensors import state_digest

    base, vecs = three
    h = read_kind(vecs[1], "vector")
    state = load_file(str(vecs[1]))
    key = sorted(k for k in state if k.endswith("weight"))[0]
    state[key][0] = float("nan")
    meta = dict(h.meta, sha256=state_digest(state))
    import json

    save_file(state, str(vecs[1]), metadata={"format": "pt", "taskvec": json.dumps(meta)})
    for method in ("mean", "dare", "ties", "median"):
        with pytest.raises(FileFormatError, match=f"v1.safetensors: tensor {key} holds NaN or Inf"):
            merge_vectors(vecs, base, tmp_path / "m.safetensors", method=method)
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("name", ["accumulator.safetensors", "history.json", "merged-v1.safetensors"])
def test_an_incremental_copy_never_lands_in_its_state(three, tmp_path: Path, name: str) -> None:
    """The state's files are what the next merge reads: a copy over one would break the state for good."""
    from taskvec.errors import OutputExistsError
    from taskvec.merging.incremental import merge_incremental

    base, vecs = three
    state = tmp_path / "state"
    merge_incremental(vecs[:1], base, state)
    before = {p.name: p.read_bytes() for p in state.iterdir()}
    with pytest.raises(OutputExistsError, match="is inside the merge state"):
        merge_incremental(vecs[:2], base, state, out=state / name, force=True)
    assert {p.name: p.read_bytes() for p in state.iterdir()} == before
    merge_incremental(vecs[:2], base, state, out=tmp_path / "copy.safetensors")  # the state still works


def test_more_vectors_than_open_files_is_one_error(three, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins
    import errno

    import taskvec.merging.reading as reading

    opened: list[object] = []

    def limited(*args: object, **kw: object) -> object:
        if len(opened) == 2:
            raise OSError(errno.EMFILE, "Too many open files")
        opened.append(f := builtins.open(*args, **kw))  # type: ignore[call-overload]
        return f

    monkeypatch.setattr(reading, "open", limited, raising=False)
    base, vecs = three
    with pytest.raises(TaskvecError, match=r"^3 vectors are more files than this process may open at once \(2 "):
        merge_vectors(vecs, base, tmp_path / "m.safetensors")
    assert all(f.closed for f in opened) and not (tmp_path / "m.safetensors").exists()  # type: ignore[attr-defined]
