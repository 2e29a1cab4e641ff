"""Hostile files, sizes, options and output: crafted safetensors headers, non-regular files, model headers that
ask for code or network, oversized images and npz bombs, non-finite options, markup and escapes in names."""

from __future__ import annotations

import json
import os
import re
import stat
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hostile import assert_refused, cli
from safetensors.torch import load_file, save_file

from taskvec.errors import ConfigError, FileFormatError, OutputExistsError, PrivacyError, TaskvecError
from taskvec.io.files import MAX_HEADER_BYTES, atomic_output, private_copy, read_header, read_kind

F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def _raw(path: Path, header: bytes | dict, data: bytes = b"\0" * 8) -> Path:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def _meta(version: object) -> dict:
    return {"__metadata__": {"taskvec": json.dumps({"format_version": version, "kind": "vector"})}, "w": F32}


@pytest.mark.parametrize("header, data, message", [
    (b'{"w": ' + json.dumps(F32).encode() + b', "w": ' + json.dumps(F32).encode() + b"}", b"\0" * 8, "duplicate"),
    ({"a": F32, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlaps"),
    ({"a": F32, "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}}, b"\0" * 16, "gap"),
    ({"w": F32}, b"\0" * 9, "after the last tensor"),
    ({"w": {"dtype": "F32", "shape": [-1, -2], "data_offsets": [0, 8]}}, b"\0" * 8, "corrupt entry"),
    ({"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}, b"\0" * 8, "does not fit"),
    ({"w": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, b"\0" * 8, "corrupt entry"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": ["0", 8]}}, b"\0" * 8, "corrupt entry"),
    ({"w": {"dtype": "X99", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "corrupt entry"),
    ({"w": {**F32, "extra": 1}}, b"\0" * 8, "corrupt entry"),
    ({"__metadata__": {"taskvec": 7}, "w": F32}, b"\0" * 8, "__metadata__"),
    (_meta(True), b"\0" * 8, "format_version"),
    (_meta(-7), b"\0" * 8, "format_version"),
    (_meta("1"), b"\0" * 8, "format_version"),
    (_meta(1.0), b"\0" * 8, "format_version"),
    ([1, 2], b"", "not a JSON object"),
    (b"[" * 100_000 + b"]" * 100_000, b"", "corrupt safetensors header"),  # deeper than the parser's stack
    ({"__metadata__": {"taskvec": "[" * 100_000 + "]" * 100_000}, "w": F32}, b"\0" * 8, "corrupt taskvec metadata"),
])
def test_crafted_headers_are_refused(tmp_path: Path, header: bytes | dict, data: bytes, message: str) -> None:
    p = _raw(tmp_path / "x.safetensors", header, data)
    with pytest.raises(FileFormatError, match=message):
        read_header(p)


def test_the_format_itself_still_reads(tmp_path: Path) -> None:
    t = {"a": torch.arange(3.0), "b": torch.zeros(0), "c": torch.ones(2, 2, dtype=torch.bfloat16)}
    save_file(t, str(tmp_path / "ok.safetensors"), metadata={"x": "y"})
    h = read_header(tmp_path / "ok.safetensors")
    assert {k: v.shape for k, v in h.tensors.items()} == {"a": (3,), "b": (0,), "c": (2, 2)}


def test_non_regular_files_and_symlinks(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    for p in (fifo, Path("/dev/zero"), tmp_path):
        with pytest.raises(FileFormatError, match="regular file|directory"):
            read_header(p)  # returns at once: a FIFO is never opened for a blocking read
    real = _raw(tmp_path / "real.safetensors", {"w": F32})
    link = tmp_path / "link.safetensors"
    link.symlink_to(real)
    assert read_header(link).tensors  # a user's own symlink is fine
    with pytest.raises(FileFormatError, match="symbolic link"):
        private_copy(link, tmp_path / "copy")  # a registry's is not
    assert not (tmp_path / "copy").exists()


def test_private_copy_hashes_exactly_what_it_copies(tmp_path: Path) -> None:
    import hashlib

    src = tmp_path / "src"
    src.write_bytes(os.urandom(3 << 20))
    digest = private_copy(src, tmp_path / "dst")
    assert digest == hashlib.sha256((tmp_path / "dst").read_bytes()).hexdigest() == hashlib.sha256(
        src.read_bytes()).hexdigest()
    assert stat.S_IMODE((tmp_path / "dst").stat().st_mode) == 0o600
    assert private_copy(src, tmp_path / "exact", max_bytes=3 << 20) == digest
    status = Path("/proc/self/status")  # a regular file whose size (0) understates what it holds
    for big, limit in ((src, (3 << 20) - 1), *([(status, 10)] if status.is_file() else [])):
        with pytest.raises(FileFormatError, match=f"^{big}: over the {limit} B limit; refused$"):
            private_copy(big, tmp_path / "capped", max_bytes=limit)
        assert not (tmp_path / "capped").exists()


def test_cli_bounded_and_one_line(tmp_path: Path) -> None:
    """Over the CLI: a FIFO, a header claiming 98 MB, and a header of empty objects just under the cap."""
    os.mkfifo(tmp_path / "pipe.safetensors")
    assert_refused(cli("inspect", "pipe.safetensors", cwd=tmp_path), "regular file")
    big = tmp_path / "big.safetensors"
    with open(big, "wb") as f:  # sparse: 98 MB claimed, nothing read
        f.write(struct.pack("<Q", 98 << 20))
        f.truncate(8 + (98 << 20) + 8)
    assert_refused(cli("inspect", "big.safetensors", cwd=tmp_path), "limit")
    n = (MAX_HEADER_BYTES - 64) // 16
    body = b"{" + b",".join(b'"%09d":{}' % i for i in range(n)) + b"}"
    _raw(tmp_path / "empties.safetensors", body, b"")
    r = cli("inspect", "empties.safetensors", "--json", cwd=tmp_path)
    assert_refused(r, "corrupt entry")
    assert_refused(cli("merge", "empties.safetensors", "--base", "big.safetensors", "--out", "m.safetensors",
                       cwd=tmp_path))
    assert not (tmp_path / "m.safetensors").exists()


# ---------------------------------------------------------------- model headers: no code, no network


def _rewrite_spec(src: Path, dst: Path, **changes: object) -> Path:
    h = read_header(src)
    meta = dict(h.meta)
    meta["model"] = {**meta["model"], **changes}
    save_file(load_file(str(src)), str(dst), metadata={"format": "pt", "taskvec": json.dumps(meta)})
    return dst


def test_model_header_cannot_load_pickles_or_reach_the_hub(make_base, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from taskvec.models.spec import load_model

    base = make_base()
    assert load_model(base) is not None

    def no_pickles(*a: object, **k: object) -> None:
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_pickles)
    cases = {
        "checkpoint_path": {"model_kwargs": {"checkpoint_path": str(tmp_path / "evil.pth")}},
        "pretrained_cfg_overlay": {"model_kwargs": {"pretrained_cfg_overlay": {"file": "x.pth"}}},
        "arch": {"arch": "hf-hub:evil/model"},
        "img_size": {"img_size": 40000},
        "in_chans": {"in_chans": 1 << 20},
        "num_classes": {"num_classes": True},
        "dp_compatible": {"dp_compatible": {"norm": "groupnorm", "max_groups": 1 << 40}},
    }
    for i, (field, change) in enumerate(cases.items()):
        bad = _rewrite_spec(base, tmp_path / f"bad{i}.safetensors", **change)
        with pytest.raises(FileFormatError, match=field.split("_")[0]):
            load_model(bad)


# ---------------------------------------------------------------- images and npz: bounded decoding


def _png_header(path: Path, width: int, height: int, bit_depth: int = 16) -> Path:
    """A PNG whose IHDR claims `width` x `height` gray pixels (no pixel data: only the header is read)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def _spec(in_chans: int = 1):
    from taskvec.models.spec import ModelSpec

    return ModelSpec("test_vit", "classification", 2, in_chans, 32, ["a", "b"])


@pytest.mark.parametrize("side", [9000, 10000, 20000])  # under, over Pillow's warning limit, and its error limit
def test_huge_images_are_refused_from_their_header(tmp_path: Path, side: int) -> None:
    from taskvec.training.data import load_data

    root = tmp_path / "data"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        Image_small(root / c / "ok.png")
    _png_header(root / "a" / "huge.png", side, side)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's own warning is not printed: the refusal says it all
        with pytest.raises(TaskvecError, match="pixel limit"):
            load_data(root, _spec(), val_fraction=0)
    os.mkfifo(root / "b" / "pipe.png")  # never opened, so never blocks
    (root / "a" / "huge.png").unlink()
    assert len(load_data(root, _spec(), val_fraction=0).train) == 2


def Image_small(path: Path) -> None:  # noqa: N802 - a tiny valid image
    from PIL import Image

    Image.fromarray(np.full((8, 8), 100, np.uint8)).save(path)


def test_sixteen_bit_images_scale_without_float64(tmp_path: Path) -> None:
    from PIL import Image

    from taskvec.training.data import to_array

    values = np.array([[0, 257, 65535], [32768, 1000, 50000], [7, 8, 9]], dtype=np.uint16)
    img = Image.fromarray(values)
    got = to_array(img, 1, 3)[:, :, 0]
    assert np.array_equal(got, np.floor(values / 65535 * 255 + 0.5).astype(np.uint8))


def _npz_member(zf: zipfile.ZipFile, name: str, shape: tuple[int, ...], data: bytes | int) -> None:
    header = {"descr": "|u1", "fortran_order": False, "shape": shape}
    with zf.open(name, "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, header)
        if isinstance(data, bytes):
            f.write(data)
        else:
            for _ in range(data >> 20):
                f.write(bytes(1 << 20))


def test_npz_bombs_are_refused_before_decompression(tmp_path: Path) -> None:
    from taskvec.training.data import load_data

    liar = tmp_path / "liar.npz"  # a header claiming 15 GB over 12 bytes of data
    with zipfile.ZipFile(liar, "w", zipfile.ZIP_DEFLATED) as zf:
        _npz_member(zf, "train_images.npy", (100_000, 224, 224, 3), bytes(12))
        _npz_member(zf, "train_labels.npy", (1,), bytes(1))
    zeros = tmp_path / "zeros.npz"  # 80 MiB of zeros in well under 1 MiB
    with zipfile.ZipFile(zeros, "w", zipfile.ZIP_DEFLATED) as zf:
        _npz_member(zf, "train_images.npy", (80, 1024, 1024), 80 << 20)
        _npz_member(zf, "train_labels.npy", (80,), bytes(80))
    assert zeros.stat().st_size < 1 << 20
    for p in (liar, zeros):
        with pytest.raises(TaskvecError, match="expands to"):
            load_data(p, _spec(), val_fraction=0)
    r = cli("finetune", "--base", "nothing.safetensors", "--data", zeros, "--out", "run", cwd=tmp_path)
    assert_refused(r)


# ---------------------------------------------------------------- options: finite and in range


def test_non_finite_options_are_refused_in_the_library(make_base, make_finetuned, tmp_path: Path) -> None:
    from taskvec.merging.export import export_vector
    from taskvec.merging.stream import merge_vectors
    from taskvec.privacy.ledger import validate_ledger

    base = make_base()
    ft = make_finetuned(base, 0)
    v = tmp_path / "v.safetensors"
    export_vector(ft, base, v)
    nan, inf = float("nan"), float("inf")
    for kwargs in ({"clip": nan}, {"clip": 1.0, "noise_multiplier": nan}, {"clip": 1.0, "epsilon": inf, "delta": 1e-5},
                   {"clip": 1.0, "epsilon": nan, "delta": 1e-5}, {"clip": -1.0}):
        with pytest.raises(ConfigError):
            export_vector(ft, base, tmp_path / "bad.safetensors", **kwargs)
        assert not (tmp_path / "bad.safetensors").exists()
    for scale in (nan, inf, -inf):
        with pytest.raises(ConfigError, match="scale"):
            merge_vectors([v], base, tmp_path / "m.safetensors", scale=scale)
    assert not (tmp_path / "m.safetensors").exists()
    entry = {"mechanism": "gaussian-output", "unit": "site", "relation": "add-remove", "epsilon": True,
             "delta": 1e-5, "accountant": "x", "noise_multiplier": 1.0, "clip": 1.0, "sample_rate": 1.0, "steps": 1,
             "run_id": "r"}
    with pytest.raises(PrivacyError, match="epsilon"):
        validate_ledger([entry])
    with pytest.raises(PrivacyError, match="steps"):
        validate_ledger([{**entry, "epsilon": 1.0, "steps": True}])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"clip": 1.0, "noise_multiplier": 1e6, "dtype": "fp16"}, "dtype fp16 does not hold the vector"),  # 65504
    ({"clip": 1e38, "noise_multiplier": 10.0}, "dtype fp32 does not hold the vector"),
    ({"clip": 1.0, "noise_multiplier": 1e-300}, "noise_multiplier 1e-300 gives no finite ε"),
    ({"clip": 1.0, "noise_multiplier": 1e300}, "noise_multiplier 1e+300 gives no finite ε"),
    ({"clip": 1.0, "epsilon": 1e300}, "epsilon 1e+300 gives no finite ε"),
])
def test_an_export_that_would_not_be_finite_writes_and_spends_nothing(make_base, make_finetuned, tmp_path: Path,
                                                                      kwargs: dict, message: str) -> None:
    from taskvec.merging.export import export_vector
    from taskvec.privacy.ledger import releases_path

    base = make_base()
    ft = make_finetuned(base, 0)
    with pytest.raises(PrivacyError, match=re.escape(message)):
        export_vector(ft, base, tmp_path / "v.safetensors", delta=1e-5, **kwargs)
    assert not (tmp_path / "v.safetensors").exists() and not releases_path(ft).exists()  # no release recorded


# ---------------------------------------------------------------- output: as a user expects


def test_out_never_replaces_an_input(make_base, make_finetuned, tmp_path: Path) -> None:
    from taskvec.merging.export import export_vector
    from taskvec.merging.stream import merge_vectors

    base = make_base()
    v = tmp_path / "v.safetensors"
    export_vector(make_finetuned(base, 0), base, v)
    before = {p: p.read_bytes() for p in (base, v)}
    for out in (v, base):
        with pytest.raises(OutputExistsError, match="is an input"):
            merge_vectors([v], base, out, force=True)
    with pytest.raises(OutputExistsError, match="is an input"):
        export_vector(v, base, base, force=True)
    assert all(p.read_bytes() == b for p, b in before.items())


def test_atomic_writes_honour_umask_and_clean_stale_temporaries(tmp_path: Path) -> None:
    import socket

    out = tmp_path / "out.json"
    host = socket.gethostname().replace(".", "_").replace("-", "_")
    (tmp_path / f".out.json.{host}-999999999-dead.tmp").write_text("left by a process killed with -9")
    live = tmp_path / f".out.json.{host}-{os.getpid()}-live.tmp"  # a write in progress: kept
    live.write_text("")
    old = os.umask(0o022)
    try:
        with atomic_output(out) as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out.json", live.name])


# ---------------------------------------------------------------- text: never markup, never raw escapes


def test_markup_and_escapes_in_names_print_as_text(make_base, make_finetuned, tmp_path: Path) -> None:
    from taskvec.merging.export import export_vector

    base = make_base()
    ft = make_finetuned(base, 0)
    with pytest.raises(TaskvecError, match="cannot name a registry folder"):  # export refuses such a name
        export_vector(ft, base, tmp_path / "x.safetensors", contributor="[/bold]x\x1b[31m")
    assert not (tmp_path / "x.safetensors").exists()
    plain, marked = tmp_path / "plain.safetensors", tmp_path / "marked.safetensors"
    export_vector(ft, base, plain, contributor="site0")  # a file from elsewhere may still carry one
    meta = {**read_kind(plain, "vector").meta, "contributor": "[/bold]x\x1b[31m"}
    save_file(load_file(str(plain)), str(marked), metadata={"format": "pt", "taskvec": json.dumps(meta)})
    reg = tmp_path / "reg"
    assert cli("registry", "init", reg, "--base", base, cwd=tmp_path).code == 0
    for args in (["inspect", marked.name], ["push", marked.name, "--registry", reg],
                 ["merge", marked.name, "--base", base, "--out", "m.safetensors"]):
        r = cli(*args, cwd=tmp_path)  # the id cannot name a folder: refused by every reader, cleanly
        assert_refused(r, "contributor must be a contributor id")
        assert "[/bold]x\\x1b[31m" in r.stderr and "\x1b" not in r.stderr
    assert not (tmp_path / "m.safetensors").exists()
    (tmp_path / "v[").mkdir()
    export_vector(ft, base, tmp_path / "v[/x].safetensors", contributor="site0")
    r = cli("push", "v[/x].safetensors", "--registry", reg, cwd=tmp_path)
    assert r.code == 0 and "v[/x].safetensors" in r.stdout, r.stderr


def test_malformed_taskvec_metadata_is_refused(make_base, make_finetuned, tmp_path: Path) -> None:
    from taskvec.merging.export import export_vector

    base = make_base()
    v = tmp_path / "v.safetensors"
    export_vector(make_finetuned(base, 0), base, v)
    meta = read_kind(v, "vector").meta
    tensors = load_file(str(v))
    for i, (field, value) in enumerate([("base", None), ("sha256", "../x"), ("samples", True), ("statistics", 3),
                                        ("contributor", ["a"]), ("contributor", "../../etc")]):
        bad = tmp_path / f"bad{i}.safetensors"
        save_file(tensors, str(bad), metadata={"format": "pt", "taskvec": json.dumps({**meta, field: value})})
        with pytest.raises(FileFormatError, match=f"taskvec vector metadata: {field} must be") as err:
            read_kind(bad, "vector")
        assert err.value.field == field
    r = cli("merge", "bad0.safetensors", "--base", base, "--out", "m.safetensors", cwd=tmp_path)
    assert_refused(r, "base must be an object")
    assert not (tmp_path / "m.safetensors").exists()


def test_non_finite_option_on_the_command_line(make_base, make_finetuned, tmp_path: Path) -> None:
    from taskvec.merging.export import export_vector

    base = make_base()
    export_vector(make_finetuned(base, 0), base, tmp_path / "v.safetensors")
    r = cli("merge", "v.safetensors", "--base", base, "--out", "m.safetensors", "--scale", "nan", cwd=tmp_path)
    assert_refused(r, "--scale", code=2)
    assert not (tmp_path / "m.safetensors").exists()
