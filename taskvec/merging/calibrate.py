"""Choices on the merger's own validation data: λ (calibration), the method (selection), each site's value.

For each λ of a grid the merged weights are built in memory, BatchNorm running statistics (when the model
has BatchNorm) are re-estimated on the validation images, and the model is evaluated; the λ with the best
primary metric (AUROC, else accuracy; mean Dice for segmentation) wins, ties going to the λ nearest the one
asked for. The chosen model keeps the statistics estimated for it. The score is measured on the data λ was
chosen on, so it is optimistic: evaluate the merged model on held-out data.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from taskvec.errors import ConfigError, TaskvecError
from taskvec.io.files import Header
from taskvec.io.layout import is_statistic
from taskvec.merging.accumulate import Combined, accumulate
from taskvec.merging.methods import weight_methods
from taskvec.merging.plan import MergePlan
from taskvec.models.spec import ModelSpec, create_module
from taskvec.progress import Track, no_track
from taskvec.training.data import DataSplits, ImageDataset, Normalizer, as_splits, make_loader
from taskvec.training.evaluate import NonFiniteOutputError, evaluate_module, resolve_device
from taskvec.training.metrics import primary_metric

DEFAULT_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 2.0)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def reestimate_batchnorm(model: nn.Module, spec: ModelSpec, ds: ImageDataset, device: torch.device,
                         batch_size: int = 64) -> None:
    """Replace BatchNorm running statistics by their average over `ds` (torch's `update_bn`)."""
    norm = Normalizer(spec, device)
    loader = make_loader(ds, batch_size, device)

    def inputs() -> Iterator[torch.Tensor]:
        for x, _ in loader:
            yield norm(x.to(device, non_blocking=True))

    was_training = model.training
    torch.optim.swa_utils.update_bn(inputs(), model)
    model.train(was_training)


@dataclass
class _Context:
    """What evaluating merged weights on the validation data needs, built once per base."""

    identity: str
    spec: ModelSpec
    source: str
    ds: ImageDataset
    device: torch.device
    model: nn.Module
    base_state: dict[str, torch.Tensor]
    bn: bool


def calibration_set(splits: DataSplits) -> ImageDataset:
    """The data choices are made on: the `val` split, else every sample outside a `test` split (choosing on
    test data would make any later test score optimistic); data that is all test is refused."""
    if splits.val is not None:
        return splits.val
    if splits.test is None:
        return splits.get("all")
    if splits.train is None:
        raise ConfigError(f"calibrate: {splits.source} holds only a test split; choosing λ on it would leave no "
                          "honest test score. Give validation data", field="calibrate", path=splits.source)
    return splits.train


@dataclass
class Calibrator:
    """Choices made on the merger's own validation data `data` (see `calibration_set`: its `val` split, else all
    of it outside a `test` split):

    - called as a `merge_vectors(calibrate=...)` hook: grid-search λ; `record` holds the grid afterwards;
    - `select`: the method and λ with the best score (every applicable method at its defaults, each calibrated);
    - `contributions`: each vector's leave-one-out value, the score with all vectors minus the score without it.

    Every score is measured on the data the choice is made on, so it is optimistic."""

    data: str | os.PathLike[str] | DataSplits | ImageDataset
    grid: Sequence[float] = DEFAULT_GRID
    prefer: float = 1.0
    device: str = "auto"
    batch_size: int = 64
    track: Track[Any] = no_track
    record: dict[str, Any] = field(default_factory=dict)
    _ctx: _Context | None = field(default=None, init=False, repr=False)

    def _context(self, base: Header) -> _Context:
        if self._ctx is None or self._ctx.identity != base.model.identity:
            spec = ModelSpec.from_dict(base.model.model)
            splits = as_splits(self.data, spec, val_fraction=0.0)
            ds = calibration_set(splits)
            device = resolve_device(self.device)
            model = create_module(spec).to(device)
            self._ctx = _Context(base.model.identity, spec, splits.source, ds, device, model,
                                 load_file(str(base.path)), has_batchnorm(model))
        return self._ctx

    def _build(self, ctx: _Context, comb: Combined, scale: float) -> None:
        """Load `base + scale·combined` into the model (BatchNorm statistics re-estimated when it has BatchNorm)."""
        state: dict[str, torch.Tensor] = {}
        for k, b in ctx.base_state.items():
            if k in comb.deltas:
                d = torch.from_numpy(comb.deltas[k]).reshape(b.shape)
                state[k] = (b.to(torch.float32) + scale * d).to(b.dtype)
            else:
                state[k] = torch.from_numpy(comb.stats[k]).reshape(b.shape).to(b.dtype) if k in comb.stats else b
        ctx.model.load_state_dict(state, strict=True)
        if ctx.bn:
            reestimate_batchnorm(ctx.model, ctx.spec, ctx.ds, ctx.device, self.batch_size)

    def score(self, base: Header, comb: Combined, scale: float) -> dict[str, Any]:
        """The primary metric (and its companions) of `base + scale·combined` on the validation data."""
        ctx = self._context(base)
        self._build(ctx, comb, scale)
        try:
            metrics = evaluate_module(ctx.model, ctx.spec, ctx.ds, device=ctx.device, batch_size=self.batch_size)
        except NonFiniteOutputError:  # this λ overflows: no score, never chosen
            return {"scale": float(scale), "metric": None, "value": None, "non_finite": True}
        name, value = primary_metric(metrics)
        return {"scale": float(scale), "metric": name, "value": value,
                **{k: metrics[k] for k in ("accuracy", "auroc", "dice", "jaccard") if k in metrics}}

    def __call__(self, base: Header, comb: Combined, prefer: float | None = None) -> tuple[float, dict[str, Any]]:
        """The λ of the grid with the best score (ties: nearest `prefer`); `comb` gets the statistics
        re-estimated for it when the model has BatchNorm."""
        if not self.grid:
            raise TaskvecError("the calibration grid is empty")
        prefer = self.prefer if prefer is None else prefer
        rows = [self.score(base, comb, float(s)) for s in self.track(self.grid, "calibrating λ", len(self.grid))]
        ctx = self._context(base)
        scored = [r for r in rows if r["value"] is not None]
        if not scored and all(r.get("non_finite") for r in rows):
            raise TaskvecError(f"{ctx.source}: the merged model's outputs are NaN or infinite at every λ of the grid; "
                               "leave out the vector of outsized values (`taskvec inspect` shows each one's norm)")
        if not scored:
            raise TaskvecError(f"{ctx.source}: no metric is defined on this data (e.g. a single class)")
        best = max(scored, key=lambda r: (r["value"], -abs(r["scale"] - prefer)))
        if ctx.bn:
            self._build(ctx, comb, best["scale"])
            for name, t in ctx.model.state_dict().items():
                if is_statistic(name):
                    comb.stats[name] = t.detach().to("cpu", torch.float32).reshape(-1).numpy()
        self.record = {"data": ctx.source, "samples": len(ctx.ds), "metric": best["metric"], "grid": rows,
                       "chosen": best["scale"], "batchnorm_reestimated": ctx.bn,
                       "note": "scores are on the calibration data itself (optimistic)"}
        return best["scale"], self.record

    def select(self, plan: MergePlan, base: Header, headers: Sequence[Header],
               ) -> tuple[MergePlan, Combined, float, dict[str, Any]]:
        """Every method that combines weight deltas and applies to these vectors, at its defaults (the plan's own
        parameters for the plan's method), each with λ calibrated: the plan, combined deltas and λ of the best,
        and the table."""
        rows: list[dict[str, Any]] = []
        best: tuple[float, MergePlan, Combined, float] | None = None
        for name in weight_methods():
            candidate = plan if name == plan.method else plan.with_method(name)
            try:
                candidate.check_inputs(base, headers)
            except TaskvecError as e:
                rows.append({"method": name, "skipped": str(e)})
                continue
            comb = accumulate(candidate, base, headers).combined(candidate.recipe)
            scale, rec = self(base, comb, prefer=plan.scale)
            value = next(r["value"] for r in rec["grid"] if r["scale"] == scale)
            rows.append({"method": name, "params": dict(candidate.params), "scale": scale, "value": value})
            if best is None or value > best[0]:
                best = (value, candidate, comb, scale)
        if best is None:
            raise TaskvecError("no merge method applies to these vectors")
        value, chosen, comb, scale = best
        record = {"data": self.record["data"], "samples": self.record["samples"], "metric": self.record["metric"],
                  "candidates": rows, "chosen": {"method": chosen.method, "scale": scale, "value": value},
                  "note": "method and λ chosen on this data, so the scores are optimistic: evaluate on held-out data"}
        return chosen, comb, scale, record

    def contributions(self, plan: MergePlan, base: Header, headers: Sequence[Header], scale: float,
                      ) -> dict[str, Any]:
        """Leave-one-out: the score of the merge of all vectors, and of the merge without each one (N+1 merges)."""
        def merged_score(subset: Sequence[Header]) -> float | None:
            comb = accumulate(plan, base, subset).combined(plan.recipe)
            return self.score(base, comb, scale)["value"]

        full = self.score(base, accumulate(plan, base, headers).combined(plan.recipe), scale)
        sites = []
        for h in self.track(headers, "leave-one-out", len(headers)):
            rest = [o for o in headers if o is not h]
            try:
                plan.check_inputs(base, rest)
                without = merged_score(rest) if rest else None
            except TaskvecError:
                without = None
            value = None if without is None or full["value"] is None else full["value"] - without
            sites.append({"contributor": h.vector.contributor, "sha256": h.vector.sha256, "without": without,
                          "value": value})
        ctx = self._context(base)
        return {"data": ctx.source, "samples": len(ctx.ds), "metric": full["metric"], "scale": scale,
                "with_all": full["value"], "sites": sites,
                "note": "value = score with all vectors − score without this one, on the merger's validation data"}
