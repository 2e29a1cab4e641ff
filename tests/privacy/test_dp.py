"""DP-SGD glue: ε against dp-accounting, noise calibration, the step limit, per-patient clipping, refusals."""

from __future__ import annotations

import warnings
from typing import Any

import dp_accounting as dpa
import pytest
import torch
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant
from dp_reference import dp_sgd_steps, pld_epsilon
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from taskvec.errors import PrivacyConfigError, PrivacyError
from taskvec.privacy import accounting as ledger
from taskvec.privacy.accounting import (
    PRV,
    RDP,
    RDP_LARGE,
    calibrate_noise,
    epsilon_spent,
    history_epsilon,
    max_steps,
    prv_grid_points,
)
from taskvec.privacy.dpsgd import Chunk, DPConfig, is_accumulating, make_private
from taskvec.privacy.entries import verify_ledger
from taskvec.privacy.mechanisms.dp_sgd import dp_sgd_entry


def reference_epsilon(z: float, q: float, steps: int, delta: float, kind: str = "pld") -> float:
    """ε of `steps` Poisson-subsampled Gaussian steps by Google's dp-accounting."""
    acc: Any = PLDAccountant(value_discretization_interval=1e-3) if kind == "pld" else RdpAccountant()
    acc.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), steps))
    return float(acc.get_epsilon(delta))


@pytest.mark.parametrize("z, q, steps", [(1.0, 0.1, 100), (0.8, 0.05, 300), (2.0, 0.2, 50), (1.3, 0.125, 24)])
def test_prv_epsilon_matches_pld(z: float, q: float, steps: int) -> None:
    eps, accountant = epsilon_spent(z, q, steps, 1e-5)
    assert accountant == PRV
    assert eps == pytest.approx(reference_epsilon(z, q, steps, 1e-5), rel=0.02)


def test_rdp_fallback_is_named_and_matches_rdp(monkeypatch: pytest.MonkeyPatch) -> None:
    from opacus.accountants import PRVAccountant

    def broken(self: Any, delta: float, **kw: Any) -> float:
        raise ValueError("domain too large")

    monkeypatch.setattr(PRVAccountant, "get_epsilon", broken)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eps, accountant = epsilon_spent(1.0, 0.1, 100, 1e-5)
    assert accountant == RDP
    assert eps == pytest.approx(reference_epsilon(1.0, 0.1, 100, 1e-5, "rdp"), rel=0.02)


def test_calibration_and_step_limit() -> None:
    q, steps, target = 0.1, 50, 3.0
    z = calibrate_noise(target, 1e-5, q, steps)
    assert reference_epsilon(z, q, steps, 1e-5) <= target * 1.02
    assert epsilon_spent(z * 0.98, q, steps, 1e-5)[0] > target  # not much more noise than needed
    limit = max_steps(z, q, 1e-5, target)
    assert limit >= steps
    assert epsilon_spent(z, q, limit, 1e-5)[0] <= target < epsilon_spent(z, q, limit + 1, 1e-5)[0]


def test_calibration_at_the_smallest_sampling_rate_is_quiet_and_holds() -> None:
    """At q = 1e-9 RDP's best order is its smallest: Opacus warns once per call (hundreds per plan), while the
    ε it bounds still holds."""
    from taskvec.privacy.dpsgd import MIN_SAMPLE_RATE

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z = calibrate_noise(8.0, 1e-5, MIN_SAMPLE_RATE, 10)
        eps = epsilon_spent(z, MIN_SAMPLE_RATE, 10, 1e-5)[0]
    assert eps <= 8.0
    assert reference_epsilon(z, MIN_SAMPLE_RATE, 10, 1e-5) <= 8.0 * 1.02


def test_calibration_after_earlier_releases_spends_the_rest_of_one_budget() -> None:
    """A second stage calibrated after a Gaussian release (stage 1, 3/8 of ε = 8): both compose to the target, by
    dp-accounting's PLD, where stage 2 calibrated alone on the rest (ε 5) would compose to less."""
    q, steps, target, delta = 0.25, 100, 8.0, 1e-5
    z1 = calibrate_noise(3.0, delta, 1.0, 1)
    z2 = calibrate_noise(target, delta, q, steps, prior=[(z1, 1.0, 1)])
    both = pld_epsilon([dpa.GaussianDpEvent(z1), dp_sgd_steps(z2, q, steps)], delta)
    assert target * 0.97 <= both <= target * 1.02
    alone = calibrate_noise(5.0, delta, q, steps)
    assert z2 < alone and pld_epsilon([dpa.GaussianDpEvent(z1), dp_sgd_steps(alone, q, steps)], delta) < 0.9 * target
    with pytest.raises(PrivacyError, match="already spend"):
        calibrate_noise(2.0, delta, q, steps, prior=[(z1, 1.0, 1)])


@pytest.fixture
def prv_within_limit(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every run of Opacus's PRV accountant, checked before it allocates: its grid within `MAX_PRV_POINTS`."""
    from opacus.accountants import PRVAccountant

    grids: list[float] = []
    run = PRVAccountant.get_epsilon

    def checked(self: Any, delta: float, **kw: Any) -> float:
        grids.append(prv_grid_points(self.history, delta))
        assert grids[-1] <= ledger.MAX_PRV_POINTS, f"PRV run on {grids[-1]:.3g} grid points"
        return run(self, delta, **kw)

    monkeypatch.setattr(PRVAccountant, "get_epsilon", checked)
    return grids


@pytest.mark.parametrize("history", [[(1.0, 0.1, 100)], [(0.05, 0.5, 50)], [(1.0, 0.1, 100), (2.0, 0.2, 30)]])
def test_prv_grid_is_opacus_own(history: list[tuple[float, float, int]]) -> None:
    from opacus.accountants import PRVAccountant
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV

    prvs = [PoissonSubsampledGaussianPRV(q, z) for z, q, _ in history]
    domain = PRVAccountant()._get_domain(prvs, [t for _, _, t in history], eps_error=0.01, delta_error=1e-8)
    assert prv_grid_points(history, 1e-5) == pytest.approx(domain.size, abs=3)


def test_tiny_noise_is_accounted_by_rdp_in_bounded_memory(prv_within_limit: list[float]) -> None:
    """z = 0.05 at rate 0.5 over 50 steps: PRV would discretise on 49M points (19 GB); RDP's ε is recorded."""
    eps, accountant = epsilon_spent(0.05, 0.5, 50, 1e-5)
    assert accountant == RDP_LARGE and prv_within_limit == []
    assert eps == history_epsilon(RDP, [(0.05, 0.5, 50)], 1e-5)
    assert eps == pytest.approx(reference_epsilon(0.05, 0.5, 50, 1e-5, "rdp"), rel=0.02)
    assert max_steps(0.05, 0.5, 1e-5, eps) == 50


def test_header_naming_prv_beyond_its_grid_is_refused(prv_within_limit: list[float]) -> None:
    entry = dict(epsilon=1e4, delta=1e-5, noise_multiplier=0.05, sample_rate=0.5, steps=50, max_grad_norm=1.0,
                 unit="image", run_id="r")
    with pytest.raises(PrivacyError, match=r"entry 0 \(dp-sgd\): the PRV accountant would need 4.95e[+]07 grid points"):
        verify_ledger([dp_sgd_entry(accountant=PRV, **entry)], "v")  # type: ignore[arg-type]
    entry["epsilon"] = history_epsilon(RDP, [(0.05, 0.5, 50)], 1e-5)
    verify_ledger([dp_sgd_entry(accountant=RDP_LARGE, **entry)], "v")  # type: ignore[arg-type]


def test_calibration_runs_prv_only_within_its_grid(prv_within_limit: list[float],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A target far out (ε = 2000 in 50 steps at rate 0.5) calibrates on RDP, PRV run only on small grids (a
    limit lowered to keep the test fast)."""
    monkeypatch.setattr(ledger, "MAX_PRV_POINTS", 200_000)
    z = calibrate_noise(2000.0, 1e-5, 0.5, 50)
    eps, accountant = epsilon_spent(z, 0.5, 50, 1e-5)
    assert accountant == RDP_LARGE and 0.99 * 2000 <= eps <= 2000 and prv_within_limit
    assert reference_epsilon(z, 0.5, 50, 1e-5, "rdp") == pytest.approx(eps, rel=0.02)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"max_grad_norm": 0.0, "noise_multiplier": 1.0}, "max_grad_norm"),
        ({"max_grad_norm": 1.0}, "target_epsilon"),
        ({"max_grad_norm": 1.0, "noise_multiplier": 0.0}, "noise_multiplier"),
        ({"max_grad_norm": 1.0, "target_epsilon": -1.0}, "target_epsilon"),
        ({"max_grad_norm": 1.0, "noise_multiplier": 1.0, "delta": 1.0}, "delta"),
        ({"max_grad_norm": 1.0, "noise_multiplier": 1.0, "delta": 0.5}, "delta"),  # PRV's ε is negative there
        ({"max_grad_norm": 1.0, "noise_multiplier": float("inf")}, "noise_multiplier"),  # stalled RDP
        ({"max_grad_norm": 1.0, "noise_multiplier": 1e300}, "noise_multiplier"),
        ({"max_grad_norm": 1.0, "noise_multiplier": 1.0, "sample_rate": 1e-300}, "sample_rate"),
        ({"max_grad_norm": 1.0, "noise_multiplier": 1.0, "augmult": 10**7}, "augmult"),
    ],
)
def test_config_is_checked(kw: dict[str, Any], match: str) -> None:
    cfg = DPConfig(**{"delta": 1e-5, **kw})
    with pytest.raises(PrivacyConfigError, match=f"^{match} ") as e:
        cfg.check()
    assert e.value.field == match and isinstance(e.value, ValueError) and "--" not in str(e.value)


def test_non_dp_ready_model_is_refused() -> None:
    from taskvec.models.spec import build_base

    model, _ = build_base("test_resnet", num_classes=2, img_size=32)
    data = TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 2, (8,)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(PrivacyError, match="`dp_compatible`"):
        make_private(model, opt, DataLoader(data, batch_size=4), DPConfig(1.0, 1e-5, noise_multiplier=1.0), epochs=1)


def _linear_setup(patients: bool) -> tuple[nn.Module, torch.Tensor, torch.Tensor, list[int] | None]:
    torch.manual_seed(0)
    x, y = torch.randn(60, 5), torch.randint(0, 3, (60,))
    owner = [i // 4 for i in range(60)] if patients else None  # 15 patients of 4 images
    return nn.Linear(5, 3), x, y, owner


@pytest.mark.parametrize("patients", [False, True])
def test_clipping_unit_matches_independent_computation(patients: bool) -> None:
    """One step's gradient = Σ over sampled units of clip(Σ per-image gradients of the unit)."""
    model, x, y, owner = _linear_setup(patients)
    clip = 0.05
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    cfg = DPConfig(clip, 1e-5, noise_multiplier=1e-9, seed=1)
    wrapped, opt, loader, meter = make_private(model, opt, DataLoader(TensorDataset(x, y), batch_size=12), cfg,
                                               epochs=1, patient_ids=owner)
    assert meter.unit == ("patient" if patients else "image")
    xb, yb = next(iter(loader))
    opt.zero_grad()
    nn.functional.cross_entropy(wrapped(xb), yb).backward()
    opt.step()
    got = torch.cat([model.weight.grad.flatten(), model.bias.grad.flatten()])

    idx = [int((x == row).all(1).nonzero()) for row in xb]  # which images the batch holds
    units = [owner[i] if owner else i for i in idx]
    per_unit: dict[int, torch.Tensor] = {}
    for i, u in zip(idx, units):
        w = model.weight.detach().clone().requires_grad_(True)
        b = model.bias.detach().clone().requires_grad_(True)
        loss = nn.functional.cross_entropy((x[i : i + 1] @ w.T) + b, y[i : i + 1])
        g = torch.cat([t.flatten() for t in torch.autograd.grad(loss, (w, b))])
        per_unit[u] = per_unit.get(u, 0) + g
    if owner:
        assert all(units.count(u) == 4 for u in per_unit)  # a sampled patient brings all their images
    want = sum(g * min(1.0, clip / (float(g.norm()) + 1e-6)) for g in per_unit.values())
    assert torch.allclose(got, want, atol=1e-5)  # the sum: dividing by q·n would make it depend on n
    assert meter.steps == 1


def test_training_stops_at_target_epsilon() -> None:
    model, x, y, _ = _linear_setup(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = DPConfig(1.0, 1e-5, target_epsilon=2.0, noise_multiplier=1.0, seed=0, sample_rate=0.1)
    model, opt, loader, meter = make_private(model, opt, DataLoader(TensorDataset(x, y), batch_size=6), cfg,
                                             epochs=100)  # `model` is now the loop's wrapper
    while not meter.exhausted:
        for xb, yb in loader:
            if meter.exhausted:
                break
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    entry = meter.ledger_entry("run")
    assert entry["steps"] == meter.step_limit
    assert entry["epsilon"] <= 2.0
    assert reference_epsilon(1.0, meter.sample_rate, entry["steps"] + 1, 1e-5) > 2.0 * 0.98
    assert entry["epsilon"] == pytest.approx(reference_epsilon(1.0, meter.sample_rate, entry["steps"], 1e-5), rel=0.02)


@pytest.mark.parametrize("patients", [False, True])
def test_empty_poisson_batch_is_a_noise_only_step(patients: bool) -> None:
    """A model that cannot take a batch of 0 (timm ViT) still steps: the update is the noise alone."""
    from taskvec.models.spec import build_base

    torch.manual_seed(0)
    model, _ = build_base("test_vit", num_classes=2, img_size=32)
    data = TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 2, (8,)))
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    cfg = DPConfig(0.5, 1e-5, noise_multiplier=2.0, seed=0)
    wrapped, opt, loader, meter = make_private(model, opt, DataLoader(data, batch_size=4), cfg, epochs=1,
                                               patient_ids=[i // 2 for i in range(8)] if patients else None)
    if patients:
        loader.batch_sampler.queue.append(Chunk(torch.zeros(0, dtype=torch.long), True))  # the sampler's for []
    opt.zero_grad()
    nn.functional.cross_entropy(wrapped(torch.zeros(0, 3, 32, 32)), torch.zeros(0, dtype=torch.long)).backward()
    opt.step()
    assert meter.steps == 1
    update = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    expected_std = 2.0 * 0.5 / opt.expected_batch_size  # σ·C / expected batch, SGD with lr 1
    assert update.std().item() == pytest.approx(expected_std, rel=0.1)


def test_noise_is_drawn_on_the_parameters_device_and_sampling_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """The DP optimizer's generator lives where the parameters are (a CPU generator cannot draw CUDA noise);
    the sampler has its own. Checked on CPU with a recording stand-in for torch.Generator and meta tensors."""
    from taskvec.privacy import dpsgd

    assert dpsgd.parameters_device(nn.Linear(2, 2, device="meta")) == torch.device("meta")
    with pytest.raises(PrivacyError, match="one device"):
        dpsgd.parameters_device(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2, device="meta")))
    made: list[str] = []
    real = torch.Generator

    def recording(device: Any = "cpu") -> torch.Generator:
        made.append(str(device))
        return real("cpu")  # this machine draws on CPU; the device asked for is what is checked

    monkeypatch.setattr(torch, "Generator", recording)
    monkeypatch.setattr(dpsgd, "parameters_device", lambda model: torch.device("cuda", 1))
    model, x, y, _ = _linear_setup(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _, opt, loader, _ = make_private(model, opt, DataLoader(TensorDataset(x, y), batch_size=6),
                                     DPConfig(1.0, 1e-5, noise_multiplier=1.0), epochs=1)
    assert made == ["cpu", "cuda:1"]
    assert opt.generator is not loader.batch_sampler.sampler.generator  # BatchMemoryManager wraps the sampler


def test_dp_sgd_never_uses_fp16_loss_scaling(monkeypatch: pytest.MonkeyPatch) -> None:
    from taskvec.training.loop import mixed_precision

    cuda = torch.device("cuda")
    assert mixed_precision(torch.device("cpu"), dp=True) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert mixed_precision(cuda, dp=False) == "fp16"  # scaled loss, without DP only
    assert mixed_precision(cuda, dp=True) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert mixed_precision(cuda, dp=True) == "bf16"  # no loss scaling needed


def _depthwise_net() -> nn.Module:
    """lite0's layer types at toy size: SAME-padded (timm) and zero-padded depthwise convolutions with stride 2."""
    from timm.layers import Conv2dSame

    torch.manual_seed(0)
    return nn.Sequential(Conv2dSame(3, 8, 3, stride=2), nn.GroupNorm(2, 8), nn.ReLU6(),
                         nn.Conv2d(8, 8, 5, stride=2, padding=2, groups=8), Conv2dSame(8, 8, 3, stride=2, groups=8),
                         nn.Conv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


@pytest.mark.parametrize("patients", [False, True])
def test_grad_sample_modes_take_the_same_step(patients: bool) -> None:
    """taskvec's convolution samplers (hooks) and Opacus's vmap of every layer (functorch) give the same per-unit
    gradients: with the same seed, one DP-SGD step gives the same parameters and the same ledger entry."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, 17, 17, generator=g), torch.randint(0, 2, (16,), generator=g))
    after, entries = [], []
    for mode in ("hooks", "functorch"):
        model = _depthwise_net()
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        cfg = DPConfig(0.01, 1e-5, noise_multiplier=0.1, grad_sample_mode=mode, seed=3, sample_rate=0.5)
        wrapped, opt, loader, meter = make_private(model, opt, DataLoader(data, batch_size=4), cfg, steps=1,
                                                   patient_ids=[i // 2 for i in range(16)] if patients else None)
        for xb, yb in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(wrapped(xb), yb).backward()
            opt.step()
            if not is_accumulating(opt):
                break
        after.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        entries.append(meter.ledger_entry("run"))
    moved = (after[0] - torch.cat([p.detach().flatten() for p in _depthwise_net().parameters()])).abs().max()
    assert moved > 1e-3
    assert torch.allclose(after[0], after[1], atol=1e-6)
    assert entries[0] == entries[1]
