"""What every command shares: the `--device` convention."""

from __future__ import annotations

import pytest
from cli_app import commands, invoke


def test_one_device_convention_everywhere() -> None:
    from taskvec.training.config import DEFAULT_DEVICE, DEVICE_HELP, DEVICES

    found = {name: p for name, cmd in commands() for p in cmd.params if p.name == "device"}
    assert set(found) == {"finetune", "evaluate", "audit", "audit-reconstruction", "simulate"}
    assert all(p.default == DEFAULT_DEVICE == "auto" and p.help == DEVICE_HELP for p in found.values())
    assert all(f" {d} " in f" {DEVICE_HELP.replace('|', ' ')} " for d in DEVICES)


@pytest.mark.parametrize("argv", [
    ["evaluate", "model.safetensors", "--data", "d"],
    ["finetune", "--base", "b", "--data", "d", "--out", "o"],
    ["audit", "model.safetensors", "--canaries", "10"],
    ["simulate", "--data", "d", "--out", "o"],
])
def test_a_bad_device_is_one_line_and_exit_2(argv: list[str]) -> None:
    code, _, err = invoke(*argv, "--device", "gpu")
    assert code == 2 and err.strip() == "error: --device must be one of auto, cpu, cuda, mps, got 'gpu'", err
