"""The container layer: header validation, content identity, atomic writes."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from taskvec.errors import FileFormatError, OutputExistsError
from taskvec.io.files import atomic_output, file_digest, read_header, read_kind
from taskvec.io.tensors import state_digest


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(3, 4, generator=g),
        "h": torch.randn(5, generator=g).to(torch.bfloat16),
        "n": torch.tensor(7, dtype=torch.int64),
        "s": torch.tensor(1.5),
    }


def test_file_identity_equals_memory_identity(tmp_path: Path) -> None:
    t = _tensors()
    save_file(t, str(tmp_path / "a.safetensors"))
    assert file_digest(read_header(tmp_path / "a.safetensors")) == state_digest(t)


def test_identity_changes_with_any_field() -> None:
    t = _tensors()
    base = state_digest(t)
    assert state_digest({**t, "w": t["w"].clone().index_fill_(0, torch.tensor([0]), 0.0)}) != base
    assert state_digest({**t, "w": t["w"].reshape(4, 3)}) != base  # same bytes, other shape
    assert state_digest({**t, "s": t["s"].to(torch.float64)}) != base  # other dtype
    renamed = {("x" if k == "w" else k): v for k, v in t.items()}
    assert state_digest(renamed) != base


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "a.safetensors"
    save_file(_tensors(), str(p))
    data = p.read_bytes()
    p.write_bytes(data[:-5])
    with pytest.raises(FileFormatError, match="truncated"):
        read_header(p)
    p.write_bytes(data[:6])
    with pytest.raises(FileFormatError, match="too short"):
        read_header(p)
    p.write_bytes(data[:20])  # cut inside the header
    n = int.from_bytes(data[:8], "little")
    with pytest.raises(FileFormatError, match=rf"a truncated safetensors file \(or not one\): its first 8 bytes give "
                                              rf"a header of {n:,} B in a file of 20 B"):
        read_header(p)
    p.write_text("# A README\n\nSome text.\n")  # text: its first 8 bytes read as a huge length
    with pytest.raises(FileFormatError, match=r"a.safetensors: not a safetensors file: its first 8 bytes give a "
                                              r"header of [\d,]{20,} B in a file of 23 B$"):
        read_header(p)


def test_corrupt_header_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "a.safetensors"
    body = b"{not json!"
    p.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(FileFormatError, match="corrupt"):
        read_header(p)
    bad = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}).encode()
    p.write_bytes(struct.pack("<Q", len(bad)) + bad + b"\0" * 8)
    with pytest.raises(FileFormatError, match="corrupt entry"):
        read_header(p)


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".safetensors"])
def test_pickle_is_never_loaded(tmp_path: Path, suffix: str) -> None:
    p = tmp_path / f"model{suffix}"
    p.write_bytes(pickle.dumps({"w": [1, 2, 3]}, protocol=4))
    with pytest.raises(FileFormatError, match="pickle"):
        read_header(p)


def test_read_kind_names_what_it_got(tmp_path: Path) -> None:
    p = tmp_path / "a.safetensors"
    save_file(_tensors(), str(p))
    with pytest.raises(FileFormatError, match="plain safetensors"):
        read_kind(p, "vector")


def test_newer_format_version_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "a.safetensors"
    save_file(_tensors(), str(p), metadata={"taskvec": json.dumps({"format_version": 99, "kind": "model"})})
    with pytest.raises(FileFormatError, match="upgrade taskvec"):
        read_header(p)


def test_atomic_output_leaves_nothing_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    with pytest.raises(RuntimeError):
        with atomic_output(out) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_refuses_existing_without_force(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError, match="pass `force`"):
        with atomic_output(out):
            pass
    assert out.read_bytes() == b"keep me"
    with atomic_output(out, force=True) as tmp:
        tmp.write_bytes(b"new")
    assert out.read_bytes() == b"new"


def test_header_length_bytes_that_look_like_pickle_magic_are_fine(tmp_path: Path) -> None:
    # header lengths ≡ 0x80 mod 256 start the file with the pickle magic byte (1 file in 32 does)
    for target in (0x80, 0x180):
        for pad in range(0, 400):
            p = tmp_path / "a.safetensors"
            save_file({"w": torch.zeros(2)}, str(p), metadata={"pad": "x" * pad})
            if struct.unpack("<Q", p.read_bytes()[:8])[0] == target:
                assert read_header(p).tensors["w"].shape == (2,)
                break
        else:
            raise AssertionError(f"no padding gave a header of {target:#x} bytes")


def test_all_finite() -> None:
    from taskvec.io.tensors import all_finite

    assert all_finite(torch.randn(100))
    assert all_finite(torch.full((4,), 3e38))  # the sum overflows to inf, the elements are finite
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.randn(100)
        t[37] = bad
        assert not all_finite(t)
