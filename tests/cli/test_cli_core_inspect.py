"""`taskvec inspect` of a corrupted file exits non-zero, as merge and push refuse it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_app import invoke


@pytest.mark.parametrize("as_json", [False, True])
def test_inspect_of_a_corrupted_vector_fails(as_json: bool, make_base, make_finetuned, tmp_path: Path) -> None:
    base = make_base()
    vec = tmp_path / "v.safetensors"
    assert invoke("export", make_finetuned(base, 1), "--base", base, "--out", vec)[0] == 0
    flag = ["--json"] if as_json else []
    code, out, err = invoke("inspect", vec, *flag)
    assert code == 0, err
    raw = bytearray(vec.read_bytes())
    raw[-3] ^= 0xFF  # one byte of the last tensor's data
    vec.write_bytes(bytes(raw))
    code, out, err = invoke("inspect", vec, *flag)
    assert code == 1 and "do not match the content hash" in err, (out, err)
    if as_json:  # the report is still printed, for a look at what is wrong
        assert json.loads(out)["integrity"] is False
    else:
        assert "MISMATCH" in out


def _rewritten(src: Path, dest: Path, change: dict, tensors: dict | None = None) -> Path:
    from safetensors.torch import load_file, save_file

    from taskvec.io.files import read_header

    meta = {**read_header(src).meta, **change}
    save_file(tensors or load_file(str(src)), str(dest), metadata={"format": "pt", "taskvec": json.dumps(meta)})
    return dest


def test_inspect_of_a_vector_holding_infinity_or_nan_fails_in_strict_json(make_base, make_finetuned,
                                                                    tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from taskvec.io.tensors import state_digest

    base = make_base()
    vec = tmp_path / "v.safetensors"
    assert invoke("export", make_finetuned(base, 1), "--base", base, "--out", vec)[0] == 0
    tensors = load_file(str(vec))
    k = sorted(tensors)[0]
    tensors[k].view(-1)[0] = float("inf")
    bad = _rewritten(vec, tmp_path / "inf.safetensors", {"sha256": state_digest(tensors)}, tensors)
    code, out, err = invoke("inspect", bad, "--json")

    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    report = json.loads(out, parse_constant=refuse)
    assert report["l2_norm"] == "inf" and report["integrity"] is True and report["finite"] is False
    assert code == 1 and "holds NaN or Inf values" in err  # as merge and push refuse it
    tensors[k].view(-1)[0] = float("nan")
    bad = _rewritten(vec, tmp_path / "nan.safetensors", {"sha256": state_digest(tensors)}, tensors)
    code, out, err = invoke("inspect", bad)
    assert code == 1 and "NaN or Inf" in out and "holds NaN or Inf values" in err


def test_inspect_prints_a_merge_without_a_scale(make_base, make_finetuned, tmp_path: Path) -> None:
    base = make_base()
    vec, merged = tmp_path / "v.safetensors", tmp_path / "m.safetensors"
    assert invoke("export", make_finetuned(base, 1), "--base", base, "--out", vec)[0] == 0
    assert invoke("merge", vec, "--base", base, "--out", merged)[0] == 0
    from taskvec.io.files import read_header

    record = read_header(merged).meta["merge"]
    odd = _rewritten(merged, tmp_path / "odd.safetensors", {"merge": {**record, "scale": None, "staleness": "a"}})
    code, out, err = invoke("inspect", odd)
    assert code == 0 and "λ=None" in out and "staleness a=a" in out, err
