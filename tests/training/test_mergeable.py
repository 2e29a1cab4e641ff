"""Options that keep vectors mergeable: the proximal step (against the analytic proximal-gradient step, with
and without DP-SGD, and μ → ∞ at the base), and the head strategies (frozen, balanced, lp-ft) and refusals."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from synthetic_data import npz_file, seg_folder
from torch import nn

from taskvec.errors import ConfigError, PrivacyConfigError
from taskvec.io.files import read_header
from taskvec.merging.export import export_vector
from taskvec.privacy.dpsgd import DPConfig, make_private
from taskvec.training.loop import FinetuneConfig, finetune
from taskvec.training.mergeable import SiteSteps, WeightedCrossEntropy, class_weights, prox_anchors
from taskvec.training.modes import parse_mode

pytestmark = pytest.mark.filterwarnings("ignore")
LR, MU = 0.1, 3.0


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)


def _one_step(prox: float, dp: DPConfig | None, probe_steps: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """One SGD step of `_net` on `_batch`, from weights moved away from the anchors (so the pull matters),
    through SiteSteps and, with `dp`, Opacus (sample rate 1: the whole batch)."""
    net = _net()
    anchors = prox_anchors(net, parse_mode("all"))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    SiteSteps(net, prox=prox, anchors=anchors, head=("2.",), probe_steps=probe_steps).attach(optimizer)
    x, y = _batch()
    model: nn.Module = net
    if dp is not None:
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(x))
        model, optimizer, private, _ = make_private(net, optimizer, loader, replace(dp, sample_rate=1.0), steps=1)
        optimizer.expected_batch_size = len(x)  # SGD against autograd's mean (the loop's AdamW takes the sum)
        x, y = next(iter(private))
        assert len(x) == 16  # sample rate 1
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    return net, anchors


def _analytic(probe_steps: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """θ_start − η·∇L (plain autograd on the batch) and θ_start, computed without SiteSteps or Opacus."""
    net = _net()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    x, y = _batch()
    grads = torch.autograd.grad(nn.functional.cross_entropy(net(x), y), list(net.parameters()))
    stepped = {n: start[n] - LR * g * (n.startswith("2.") or not probe_steps)
               for (n, _), g in zip(net.named_parameters(), grads)}
    return stepped, start


@pytest.mark.parametrize("dp", [False, True], ids=["no-dp", "dp-noise-0"])
def test_prox_step_is_the_analytic_proximal_gradient_step(dp: bool) -> None:
    """SGD + prox = argmin_θ ‖θ − (θ0 − η∇L)‖²/2η + μ/2‖θ − θ_base‖² = θ_base + (θ0 − η∇L − θ_base)/(1 + ημ);
    under DP-SGD with huge clipping and negligible noise, the same."""
    config = DPConfig(max_grad_norm=1e4, delta=1e-5, noise_multiplier=1e-10, seed=0) if dp else None
    net, anchors = _one_step(MU, config)
    stepped, _ = _analytic()
    for n, p in net.named_parameters():
        expected = anchors[n] + (stepped[n] - anchors[n]) / (1 + LR * MU)
        torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=1e-5)


def test_prox_runs_on_the_private_update() -> None:
    """With real noise and clipping, the prox step is applied to the noised update (post-processing): the same
    secret-free seed gives θ_prox = θ_base + (θ_noprox − θ_base)/(1 + ημ) exactly."""
    config = DPConfig(max_grad_norm=0.5, delta=1e-5, noise_multiplier=1.0, seed=0)
    plain, anchors = _one_step(0.0, config)
    pulled, _ = _one_step(MU, config)
    stepped, _ = _analytic()
    for (n, p), q in zip(plain.named_parameters(), pulled.parameters()):
        assert not torch.allclose(p, stepped[n], atol=1e-3)  # noise and clipping did change the update
        torch.testing.assert_close(q.detach(), anchors[n] + (p.detach() - anchors[n]) / (1 + LR * MU))


@pytest.mark.parametrize("dp", [False, True], ids=["no-dp", "dp-noise-0"])
def test_linear_probe_phase_updates_only_the_head(dp: bool) -> None:
    config = DPConfig(max_grad_norm=1e4, delta=1e-5, noise_multiplier=1e-10, seed=0) if dp else None
    net, _ = _one_step(0.0, config, probe_steps=1)
    stepped, start = _analytic(probe_steps=1)
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), stepped[n], atol=1e-6, rtol=1e-5)
        assert torch.equal(p.detach(), start[n]) != n.startswith("2.")


def _distance(model: Path, base: Path) -> float:
    b, m = load_file(str(base)), load_file(str(model))
    return float(sum(((m[k].double() - b[k].double()) ** 2).sum() for k in b if b[k].is_floating_point()) ** 0.5)


@pytest.mark.parametrize("mode", ["norm-bias", "lora:2"])
def test_prox_keeps_finetuned_weights_near_the_base(tmp_path: Path, dp_base: Path, mode: str) -> None:
    data = npz_file(tmp_path / "d.npz", n=32)
    dist = {}
    for mu in (0.0, 30.0, 1e9):
        cfg = FinetuneConfig(steps=4, batch_size=8, device="cpu", train=mode, prox=mu, augment=False)
        run = finetune(dp_base, data, tmp_path / f"run-{mu:g}", cfg)
        dist[mu] = _distance(run.model_path, dp_base)
        assert read_header(run.model_path).meta["training"]["prox"] == mu
    assert dist[0.0] > dist[30.0] > 1e-4 and dist[1e9] < 1e-6, dist


def test_prox_under_dp_sgd_is_free_and_holds_at_the_base(tmp_path: Path, dp_base: Path) -> None:
    data = npz_file(tmp_path / "d.npz", n=32)
    ledgers, dist = [], []
    for mu in (0.0, 1e9):
        dp = DPConfig(1.0, 1e-5, noise_multiplier=1.0, seed=0)
        cfg = FinetuneConfig(steps=3, device="cpu", train="norm-bias", prox=mu, dp=dp, ema=0.0)
        run = finetune(dp_base, data, tmp_path / f"run-{mu:g}", cfg)
        entry = read_header(run.model_path).meta["privacy"][0]
        ledgers.append({k: v for k, v in entry.items() if k not in ("run_id", "model")})
        dist.append(_distance(run.model_path, dp_base))
    assert ledgers[0] == ledgers[1] and ledgers[0]["steps"] == 3  # post-processing: the same guarantee
    assert dist[0] > 1e-3 and dist[1] < 1e-6  # the noisy update was pulled back: the step ran after the noise


def test_frozen_head_keeps_the_base_classifier_out_of_the_vector(tmp_path: Path, dp_base: Path) -> None:
    cfg = FinetuneConfig(steps=3, batch_size=8, device="cpu", train="norm-bias", head="frozen")
    run = finetune(dp_base, npz_file(tmp_path / "d.npz", n=32), tmp_path / "run", cfg)
    base, model = load_file(str(dp_base)), load_file(str(run.model_path))
    assert all(torch.equal(base[k], model[k]) for k in base if k.startswith("classifier."))
    assert any(not torch.equal(base[k], model[k]) for k in base if k.endswith("bn1.bias"))
    vec = export_vector(run.model_path, dp_base, tmp_path / "v.safetensors").path
    carried = set(read_header(vec).tensors)
    assert carried and not any(k.startswith("classifier.") for k in carried)
    assert read_header(run.model_path).meta["training"]["head"] == "frozen"


def test_lp_ft_under_dp_takes_the_same_private_steps(tmp_path: Path, dp_base: Path) -> None:
    dp = DPConfig(1.0, 1e-5, noise_multiplier=1.0, seed=0)
    cfg = FinetuneConfig(steps=2, device="cpu", train="norm-bias", head="lp-ft", dp=dp)
    run = finetune(dp_base, npz_file(tmp_path / "d.npz", n=32), tmp_path / "run", cfg)
    assert read_header(run.model_path).meta["privacy"][0]["steps"] == 2


def test_class_weights_and_weighted_loss() -> None:
    w = class_weights([0] * 30 + [1] * 10, 3)
    torch.testing.assert_close(w, torch.tensor([40 / (2 * 30), 40 / (2 * 10), 0.0]))
    logits, y = torch.randn(6, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 1, 0, 0, 1])
    manual = sum(-w[t] * torch.log_softmax(row, 0)[t] for row, t in zip(logits, y)) / 6
    torch.testing.assert_close(WeightedCrossEntropy(w)(logits, y), manual)


def test_balanced_head_trains_with_the_site_weights(tmp_path: Path, dp_base: Path) -> None:
    cfg = FinetuneConfig(steps=2, batch_size=8, device="cpu", train="head", head="balanced")
    run = finetune(dp_base, npz_file(tmp_path / "d.npz", n=32), tmp_path / "run", cfg)
    assert read_header(run.model_path).meta["training"]["head"] == "balanced"


def test_refusals(tmp_path: Path, make_base: Callable[..., Path]) -> None:
    with pytest.raises(PrivacyConfigError, match="^head balanced weights the loss") as e:
        FinetuneConfig(head="balanced", dp=DPConfig(1.0, 1e-5, noise_multiplier=1.0)).check()
    assert e.value.field == "head"
    for bad in ({"head": "bogus"}, {"head": "frozen", "train": "head"}, {"head": "lp-ft", "train": "head"},
                {"prox": -1.0}, {"prox": float("nan")}, {"weight_decay": float("nan")}, {"weight_decay": -1.0},
                {"warmup": 2.0}, {"img_size": 12000}, {"img_size": -5}, {"num_workers": -1}):
        with pytest.raises(ConfigError) as e:
            FinetuneConfig(**bad).check()  # type: ignore[arg-type]
        assert str(e.value).startswith(e.value.field) and e.value.field in bad
    seg = make_base("test_convnext", task="segmentation", num_classes=2)
    with pytest.raises(ConfigError, match="^head frozen is for classification"):
        finetune(seg, seg_folder(tmp_path / "seg"), tmp_path / "run", FinetuneConfig(head="frozen", steps=1))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("args", "printed"), [
    (["--prox", "-1"], "error: --prox must be a finite number"),
    (["--head", "balanced", "--dp", "--noise-multiplier", "1"], "error: --head balanced weights the loss"),
])
def test_cli_refuses_bad_options(args: list[str], printed: str, tmp_path: Path, dp_base: Path,
                                 monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from taskvec.cli.app import main

    data = npz_file(tmp_path / "d.npz", n=32)
    argv = ["taskvec", "finetune", "--base", str(dp_base), "--data", str(data), "--out", str(tmp_path / "run"), *args]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith(printed), err
    assert not (tmp_path / "run").exists()


def test_simulation_trains_every_run_with_the_options(tmp_path: Path) -> None:
    from taskvec.simulation.simulate import SimulationConfig, simulate
    from taskvec.simulation.synthetic import write_classification_npz

    data = write_classification_npz(tmp_path / "data.npz", n_train=80, n_val=20, n_test=30, size=32, seed=3)
    kw = {"data": str(data), "sites": 2, "arch": "test_vit", "in_chans": 1, "img_size": 32, "epochs": 1,
          "base_epochs": 1, "methods": ["mean"], "batch_size": 16, "calibrate": False}
    with pytest.raises(PrivacyConfigError, match="^head balanced"):
        simulate(SimulationConfig(out=str(tmp_path / "dp"), head="balanced", epsilons=[8.0], **kw))  # type: ignore[arg-type]
    assert not (tmp_path / "dp").exists()
    out = tmp_path / "sim"
    simulate(SimulationConfig(out=str(out), head="frozen", prox=5.0, **kw))  # type: ignore[arg-type]
    base = load_file(str(out / "base.safetensors"))
    head = [k for k in base if k.startswith("head.")]
    assert head
    for run in (out / "sites" / "site0", out / "sites" / "site1", out / "centralised"):
        meta = read_header(run / "model.safetensors").meta
        assert (meta["training"]["prox"], meta["training"]["head"]) == (5.0, "frozen")
        model = load_file(str(run / "model.safetensors"))
        assert all(torch.equal(model[k], base[k]) for k in head)
    base_run = read_header(out / "base-run" / "model.safetensors").meta["training"]  # the public base: plain
    assert (base_run["prox"], base_run["head"]) == (0.0, "train")


def test_a_run_started_before_these_options_resumes_with_their_defaults(tmp_path: Path) -> None:
    from taskvec.errors import MismatchError
    from taskvec.training.run_folder import RUN_FILE, open_run

    cfg = FinetuneConfig(steps=2, device="cpu")
    split = {"unit": "image", "train": ["a.png"], "val": []}
    run_id = open_run(tmp_path / "run", "parent", cfg, "data", split, {})
    record = json.loads((tmp_path / "run" / RUN_FILE).read_text())
    del record["config"]["prox"], record["config"]["head"]  # as written before the options existed
    (tmp_path / "run" / RUN_FILE).write_text(json.dumps(record))
    assert open_run(tmp_path / "run", "parent", replace(cfg, resume=True), "data", split, {}) == run_id
    with pytest.raises(MismatchError, match=r"started with prox 0.0 \(now 1.0\)"):
        open_run(tmp_path / "run", "parent", replace(cfg, resume=True, prox=1.0), "data", split, {})


def test_a_dp_run_started_before_a_dp_option_resumes_with_its_default(tmp_path: Path) -> None:
    from taskvec.errors import MismatchError
    from taskvec.training.run_folder import RUN_FILE, open_run

    cfg = FinetuneConfig(steps=2, device="cpu", dp=DPConfig(1.0, 1e-5, target_epsilon=8.0))
    split = {"unit": "image", "train": ["a.png"], "val": []}
    run_id = open_run(tmp_path / "run", "parent", cfg, "data", split, {})
    record = json.loads((tmp_path / "run" / RUN_FILE).read_text())
    del record["config"]["dp"]["earlier"]  # as written before the option existed
    (tmp_path / "run" / RUN_FILE).write_text(json.dumps(record))
    assert open_run(tmp_path / "run", "parent", replace(cfg, resume=True), "data", split, {}) == run_id
    other = replace(cfg, resume=True, dp=replace(cfg.dp, earlier=("v.safetensors",)))  # type: ignore[type-var]
    with pytest.raises(MismatchError, match=r"started with dp.earlier \[\] \(now \['v.safetensors'\]\)"):
        open_run(tmp_path / "run", "parent", other, "data", split, {})


@pytest.mark.parametrize("record", ["{not json", "[]", '{"parent": "parent", "run_id": 7, "config": {}}',
                                    '{"parent": "parent", "run_id": "r", "config": []}'])
def test_a_run_record_not_written_by_taskvec_is_refused_on_resume(tmp_path: Path, record: str) -> None:
    from taskvec.errors import TaskvecError
    from taskvec.training.run_folder import RUN_FILE, open_run

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / RUN_FILE).write_text(record)
    split = {"unit": "image", "train": ["a.png"], "val": []}
    with pytest.raises(TaskvecError, match=r"run\.json: (cannot be read|not what taskvec writes there)"):
        open_run(tmp_path / "run", "parent", FinetuneConfig(steps=2, device="cpu", resume=True), "data", split, {})
    assert (tmp_path / "run" / RUN_FILE).read_text() == record  # left as it was


_METRICS = {"identity": "i", "run_id": "r", "samples": {"train": 4, "val": 0}, "epochs": 1, "steps": 2,
            "history": [], "val_metrics": {}, "resumed_from_epoch": 0, "skipped": 0}


@pytest.mark.parametrize(("name", "text"), [
    ("split.json", "{not json"), ("split.json", '{"train": "a.png", "val": []}'),
    ("metrics.json", "{not json"), ("metrics.json", "[]"),
    ("metrics.json", json.dumps({**_METRICS, "samples": 4})), ("metrics.json", json.dumps({**_METRICS, "steps": "2"})),
    ("metrics.json", json.dumps({k: v for k, v in _METRICS.items() if k != "history"})),
    ("metrics.json", json.dumps({**_METRICS, "composed_epsilon": "8"}))])
def test_a_finished_runs_records_not_written_by_taskvec_are_refused(tmp_path: Path, name: str, text: str) -> None:
    from taskvec.errors import TaskvecError
    from taskvec.training.run_folder import finished, open_run

    split, cfg = {"unit": "image", "train": ["a.png"], "val": []}, FinetuneConfig(steps=2, device="cpu")
    open_run(tmp_path / "run", "parent", cfg, "data", split, {})
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(_METRICS))
    assert finished(tmp_path / "run", "parent", cfg, split).steps == 2  # as written, it is read back
    (tmp_path / "run" / name).write_text(text)
    with pytest.raises(TaskvecError, match=rf"{name.replace('.', '[.]')}: (cannot be read|not what taskvec writes)"):
        finished(tmp_path / "run", "parent", cfg, split)
    assert (tmp_path / "run" / name).read_text() == text
