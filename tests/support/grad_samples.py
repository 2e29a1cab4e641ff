"""Per-sample gradients checked against autograd: what DP-SGD clips must be each example's own gradient."""

from __future__ import annotations

import warnings

import torch
from torch import nn


def per_sample_grads_match(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Assert Opacus's per-sample gradients equal per-sample autograd gradients; return the parameters checked."""
    from opacus import GradSampleModule

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    expected = []
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        expected.append({n: p.grad.detach().clone() for n, p in params.items()})
    model.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gsm = GradSampleModule(model, loss_reduction="sum", strict=False)  # frozen statistics are public
        nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    for n, p in params.items():
        got = p.grad_sample
        want = torch.stack([e[n] for e in expected])
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), n
    gsm._close()
    return len(params)
