"""`export_vector`: deltas against an independent ft − base, clipping, noise, metadata, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from taskvec.errors import ConfigError, FileFormatError, MismatchError, OutputExistsError
from taskvec.io.files import read_kind
from taskvec.merging.export import export_vector
from taskvec.privacy.ledger import gaussian_epsilon


def test_export_equals_independent_difference(make_base, make_finetuned, tmp_path: Path) -> None:
    base = make_base("test_resnet")  # has BatchNorm: running stats and integer num_batches_tracked
    ft = make_finetuned(base, seed=1)
    r = export_vector(ft, base, tmp_path / "v.safetensors", contributor="siteA", samples=42)
    b, f, v = load_file(str(base)), load_file(str(ft)), load_file(str(r.path))
    for k in b:
        if not b[k].is_floating_point():
            assert k not in v, f"integer buffer {k} must not enter a vector"
        elif k.endswith(("running_mean", "running_var")):
            assert torch.equal(v[k], f[k]), "statistics are stored as values"
        else:
            assert torch.equal(v[k], f[k].float() - b[k].float())
    m = read_kind(r.path, "vector").meta
    assert m["contributor"] == "siteA" and m["samples"] == 42 and m["privacy"] == []
    assert m["base"]["identity"] == read_kind(base, "model").meta["identity"]
    assert set(m["statistics"]) == {k for k in b if k.endswith(("running_mean", "running_var"))}
    deltas = [f[k].float() - b[k].float() for k in b if b[k].is_floating_point() and k not in m["statistics"]]
    assert math.isclose(m["norm"]["pre_clip"], math.sqrt(sum(float(d.pow(2).sum()) for d in deltas)), rel_tol=1e-6)


def test_clipping_bounds_the_norm_and_keeps_direction(make_base, make_finetuned, tmp_path: Path) -> None:
    base = make_base()
    ft = make_finetuned(base, seed=2)
    full = export_vector(ft, base, tmp_path / "full.safetensors")
    clipped = export_vector(ft, base, tmp_path / "clip.safetensors", clip=0.5)
    assert full.pre_clip_norm > 0.5
    a = torch.cat([t.flatten() for t in load_file(str(full.path)).values()])
    c = torch.cat([t.flatten() for t in load_file(str(clipped.path)).values()])
    assert math.isclose(float(c.norm()), 0.5, rel_tol=1e-5)
    assert torch.allclose(c, a * (0.5 / full.pre_clip_norm), atol=1e-7)
    assert clipped.privacy == []  # clipping without noise is not DP
    assert any("not differential privacy" in w for w in clipped.warnings)


def test_noise_statistics_and_ledger(make_base, make_finetuned, tmp_path: Path) -> None:
    base = make_base("test_resnet")
    ft = make_finetuned(base, seed=3)
    clip, z = 1e-6, 0.7  # a delta clipped to ~0: the vector is the noise itself
    r = export_vector(ft, base, tmp_path / "v.safetensors", clip=clip, noise_multiplier=z, delta=1e-5)
    v = torch.cat([t.flatten() for t in load_file(str(r.path)).values()])
    assert abs(float(v.std()) / (z * clip) - 1) < 0.01
    assert abs(float(v.mean())) < 0.01 * z * clip
    assert math.isclose(r.expected_noise_norm, z * clip * math.sqrt(v.numel()))
    add_remove, replace_one = r.privacy
    for entry in r.privacy:
        assert entry["mechanism"] == "gaussian-output" and entry["unit"] == "site" and entry["clip"] == clip
    assert add_remove["relation"] == "add-remove" and replace_one["relation"] == "replace-one"
    assert add_remove["epsilon"] == pytest.approx(gaussian_epsilon(z, 1e-5))  # sensitivity C: site vs no data
    assert replace_one["epsilon"] == pytest.approx(gaussian_epsilon(z / 2, 1e-5))  # 2C: any change of the data
    assert read_kind(r.path, "vector").meta["statistics"] == []  # un-noised BN stats are left out


def test_epsilon_solves_the_noise_multiplier(make_base, make_finetuned, tmp_path: Path) -> None:
    base = make_base()
    r = export_vector(make_finetuned(base, 4), base, tmp_path / "v.safetensors", clip=1.0, epsilon=2.0, delta=1e-5)
    z = read_kind(r.path, "vector").meta["noise_multiplier"]
    assert gaussian_epsilon(z, 1e-5) == pytest.approx(2.0, rel=1e-6)
    assert r.privacy[0]["epsilon"] == pytest.approx(2.0, rel=1e-6)


def test_bf16_export_is_close_to_fp32(make_base, make_finetuned, tmp_path: Path) -> None:
    base = make_base()
    ft = make_finetuned(base, 5)
    a = load_file(str(export_vector(ft, base, tmp_path / "a.safetensors").path))
    b = load_file(str(export_vector(ft, base, tmp_path / "b.safetensors", dtype="bf16").path))
    for k in a:
        assert b[k].dtype == torch.bfloat16
        assert float((b[k].float() - a[k]).norm() / a[k].norm()) < 5e-3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"noise_multiplier": 1.0, "delta": 1e-5}, "clip"),
        ({"clip": 1.0, "epsilon": 1.0}, "delta"),
        ({"clip": 1.0, "epsilon": 1.0, "delta": 1e-5, "noise_multiplier": 1.0}, "noise_multiplier"),
        ({"clip": -1.0}, "clip"),
        ({"clip": 1.0, "noise_multiplier": 1.0, "delta": 1.5}, "delta"),
        ({"dtype": "fp8"}, "dtype"),
        ({"samples": 0}, "samples"),
    ],
)
def test_arguments_are_checked(make_base, make_finetuned, tmp_path: Path, kwargs, match) -> None:
    base = make_base()
    with pytest.raises(ConfigError, match=f"^{match} ") as e:
        export_vector(make_finetuned(base, 1), base, tmp_path / "v.safetensors", **kwargs)
    assert e.value.field == match and "--" not in str(e.value)
    assert not (tmp_path / "v.safetensors").exists()


def _edit(src: Path, dst: Path, fn) -> Path:
    sd = load_file(str(src))
    fn(sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(dst))
    return dst


def test_bad_finetuned_files(make_base, make_finetuned, tmp_path: Path) -> None:
    base = make_base()
    ft = make_finetuned(base, 1)
    key = next(iter(load_file(str(ft))))
    cases = [
        (_edit(ft, tmp_path / "nan.safetensors", lambda sd: sd[key].view(-1)[0].fill_(float("nan"))),
         FileFormatError, "NaN"),
        (_edit(ft, tmp_path / "missing.safetensors", lambda sd: sd.pop(key)), MismatchError, "missing keys"),
        (_edit(ft, tmp_path / "extra.safetensors", lambda sd: sd.update(extra=torch.zeros(2))),
         MismatchError, "extra keys"),
        (_edit(ft, tmp_path / "shape.safetensors", lambda sd: sd.update({key: torch.zeros(1, 1, 1)})),
         MismatchError, "shape"),
    ]
    for path, err, match in cases:
        with pytest.raises(err, match=match):
            export_vector(path, base, tmp_path / "v.safetensors")
        assert not (tmp_path / "v.safetensors").exists()


def test_vector_is_not_a_finetuned_model_and_output_is_kept(make_base, make_finetuned, tmp_path: Path) -> None:
    base = make_base()
    v = export_vector(make_finetuned(base, 1), base, tmp_path / "v.safetensors").path
    with pytest.raises(FileFormatError, match="is a data vector"):
        export_vector(v, base, tmp_path / "w.safetensors")
    before = v.read_bytes()
    with pytest.raises(OutputExistsError):
        export_vector(make_finetuned(base, 2), base, v)
    assert v.read_bytes() == before


def test_model_from_another_base_is_refused(make_base, tmp_path: Path) -> None:
    from taskvec.models.spec import load_model, model_spec, save_model

    base_a, base_b = make_base(name="a.safetensors"), make_base(name="b.safetensors", labels=["x", "y", "z"])
    ft = tmp_path / "ft.safetensors"
    save_model(load_model(base_a), model_spec(base_a), ft, extra={"parent": "0" * 64})
    with pytest.raises(MismatchError, match="parent is 000000000000"):
        export_vector(ft, base_a, tmp_path / "v.safetensors")
    save_model(load_model(base_a), model_spec(base_a), tmp_path / "ft2.safetensors")
    with pytest.raises(MismatchError, match="labels"):
        export_vector(tmp_path / "ft2.safetensors", base_b, tmp_path / "v.safetensors")
