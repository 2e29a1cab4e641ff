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
