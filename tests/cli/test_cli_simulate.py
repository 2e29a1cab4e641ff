"""`taskvec simulate` and `taskvec demo`: the command line's defaults are `SimulationConfig`'s."""

from __future__ import annotations

from dataclasses import fields

from cli_app import command, defaults


def test_simulate_defaults_are_the_configs() -> None:
    from taskvec.simulation.simulate import SimulationConfig

    config = SimulationConfig(data="d", out="o")
    cli = defaults("simulate")
    shared = [f.name for f in fields(config) if f.name in cli and f.name not in ("data", "out", "methods")]
    assert {"train", "staleness", "round_method", "device", "delta", "max_grad_norm", "seed"} <= set(shared)
    assert {k: cli[k] for k in shared} == {k: getattr(config, k) for k in shared}
    methods = next(p.help for p in command("simulate").params if p.name == "methods")  # a comma-separated list
    assert cli["methods"] is None and f"(default: {', '.join(config.methods)})" in methods
