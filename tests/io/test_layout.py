"""`check_against_base`, the one check of a file against its base (export, merge and registry push use it):
every mismatch is refused with the file, the field, and what was expected and found."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from headers import model_header, vector_header

from taskvec.errors import MismatchError
from taskvec.io.files import Header, TensorInfo
from taskvec.io.layout import check_against_base, delta_keys

MODEL = {"arch": "test_vit", "task": "classification", "num_classes": 2, "labels": ["a", "b"]}
BASE_ID = "b" * 64


def tensors(**shapes: Any) -> dict[str, TensorInfo]:
    return {k: TensorInfo(dtype, tuple(shape), 0, 0) for k, (dtype, shape) in shapes.items()}


BASE_TENSORS = tensors(w=("F32", [2, 3]), bn_running_mean=("F32", [3]), bn_num_batches_tracked=("I64", []))
BASE = model_header("base.safetensors", identity=BASE_ID, model=MODEL, tensors=BASE_TENSORS)


def vector(identity: str = BASE_ID, labels: list[str] | None = None, statistics: list[str] | None = None,
           **shapes: Any) -> Header:
    stats = ["bn_running_mean"] if "bn_running_mean" in shapes else []
    return vector_header(base=identity, task="classification", labels=labels or ["a", "b"], tensors=tensors(**shapes),
                         statistics=stats if statistics is None else statistics)


def refused(h: Header, base: Header | dict[str, Any] = BASE, where: str = "") -> MismatchError:
    with pytest.raises(MismatchError) as e:
        check_against_base(h, base, where)
    assert str(h.path) in str(e.value) and e.value.path == str(h.path)
    return e.value


def test_a_matching_vector_model_and_state_dict_pass() -> None:
    assert delta_keys(BASE.tensors) == ["w"]
    check_against_base(vector(w=("F32", [2, 3]), bn_running_mean=("F32", [3])), BASE)
    check_against_base(vector(w=("BF16", [2, 3])), BASE)  # noised exports leave statistics out
    model = model_header("ft.safetensors", identity="f" * 64, parent=BASE_ID, model=MODEL, tensors=BASE.tensors)
    check_against_base(model, BASE)
    check_against_base(Header(Path("sd.safetensors"), BASE.tensors, 0, {}), BASE)
    check_against_base(vector(), {"identity": BASE_ID, **MODEL}, "registry r")  # a registry has no tensors


def test_base_identity_is_checked_against_a_header_and_a_registry_record() -> None:
    e = refused(vector("c" * 64, w=("F32", [2, 3])))
    assert (e.field, e.expected, e.got) == ("base.identity", BASE_ID, "c" * 64)
    assert "base base.safetensors is bbbbbbbbbbbb" in e.message
    e = refused(vector("c" * 64), {"identity": BASE_ID, **MODEL}, "registry ./reg")
    assert e.field == "base.identity" and "the base of registry ./reg" in e.message
    model = model_header("ft.safetensors", identity="f" * 64, parent="c" * 64, model=MODEL, tensors=BASE.tensors)
    assert refused(model).field == "parent"


def test_task_labels_arch_are_checked() -> None:
    e = refused(vector(labels=["a", "z"], w=("F32", [2, 3])))
    assert (e.field, e.expected, e.got) == ("labels", ["a", "b"], ["a", "z"])
    model = model_header("ft.safetensors", identity="f" * 64, model={**MODEL, "arch": "x"}, tensors=BASE.tensors)
    assert refused(model).field == "arch"


def test_layout_keys_shapes_dtypes() -> None:
    e = refused(vector(w=("F32", [2, 3]), extra=("F32", [1])))
    assert e.field == "keys" and "extra keys extra" in e.message
    e = refused(Header(Path("sd.safetensors"), tensors(w=("F32", [2, 3])), 0, {}))
    assert e.field == "keys" and "missing keys bn_num_batches_tracked, bn_running_mean" in e.message
    e = refused(vector(w=("F32", [3, 2])))
    assert (e.field, e.expected, e.got) == ("w", [2, 3], [3, 2])
    assert refused(vector(w=("I32", [2, 3]))).got == "I32"
    v = vector(w=("F32", [2, 3]), statistics=["w"])  # a delta key declared as a statistic
    assert "missing keys w" in refused(v).message
    v = vector(w=("F32", [2, 3]), other_running_var=("F32", [3]), statistics=["other_running_var"])
    assert "statistics other_running_var are not statistics of the base" in refused(v).message


def test_a_subset_vector_carries_some_of_the_base_deltas() -> None:
    """A subset vector (what one mode trained) may leave keys out, but not all: an empty one would merge as a zero
    delta, a site that learnt nothing diluting a mean."""
    def subset(**shapes: Any) -> Header:
        return vector_header(task="classification", labels=["a", "b"], tensors=tensors(**shapes), subset=True,
                             statistics=[k for k in shapes if k.startswith("bn_")])

    check_against_base(subset(w=("F32", [2, 3])), BASE)
    e = refused(subset())
    assert e.field == "keys" and "no delta at all" in e.message
    assert "no delta" in refused(subset(bn_running_mean=("F32", [3]))).message  # statistics alone
