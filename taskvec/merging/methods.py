"""Merge methods: one decorated function each, saying how several data vectors combine into one delta.

A method is mergekit's generalized task arithmetic, written as a `Recipe`:

    weighting        a raw weight wᵢ per vector (1, or its sample count), optionally divided by Σw
    sparsification   per vector and tensor: DARE drop, TIES magnitude trim, breadcrumbs (optional)
    consensus        across vectors, coordinate by coordinate: TIES sign election, median (optional)

Without consensus a method is `Σ wᵢ·sᵢ(τᵢ)` (÷ Σw), times a per-tensor factor for Model Stock, so a merge
streams it one vector file at a time and an incremental merge only adds new vectors. With consensus it
needs every vector's copy of a coordinate, so a merge goes tensor by tensor, in chunks.

Add a method: one function here that returns a `Recipe`, decorated with `@merge_method`, whose parameters
are `Param`s (default, range, help). Validation, the CLI's help and the merged file's record come from it.
`combine` is the reference: whole tensors of every vector at once, which the streaming merge must equal.
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from taskvec.errors import ConfigError, TaskvecError, check_range
from taskvec.training.sufficient import DEFAULT_RIDGE, DEFAULT_SHRINK

Array = np.ndarray


# --- parameters ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Param:
    """A method parameter: its default, the interval it must lie in, and one line of help."""

    default: float
    low: float | None = None
    high: float | None = None
    low_open: bool = True
    high_open: bool = True
    help: str = ""
    name: str = ""

    def check(self, value: Any) -> float:
        """`value` as a float in range, or a `ConfigError` naming the parameter."""
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{self.name} must be a number, got {value!r}", field=self.name, got=value) from None
        return check_range(self.name, value, low=self.low, high=self.high, low_open=self.low_open,
                           high_open=self.high_open)

    def describe(self) -> str:
        """`density in (0, 1], default 0.2: fraction of each tensor kept`."""
        lo = "(-∞" if self.low is None else f"{'(' if self.low_open else '['}{self.low:g}"
        hi = "∞)" if self.high is None else f"{self.high:g}{')' if self.high_open else ']'}"
        return f"{self.name} in {lo}, {hi}, default {self.default:g}: {self.help}"


def param(default: float, *, low: float | None = None, high: float | None = None, low_open: bool = True,
          high_open: bool = True, help: str = "") -> Any:
    """A `Param` as a method's keyword default (typed `Any`, as `dataclasses.field` is, so `x: float = param(..)`)."""
    return Param(default, low, high, low_open, high_open, help)


# --- sparsification (per vector and tensor) -----------------------------------------------------------

GOLDEN, MIX1, MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _draws(seeds: Sequence[int], start: int, n: int) -> Iterator[Array]:
    """splitmix64 of (seed, index) for the indices start..start+n of a tensor: one uint64 array per seed, computed
    in place (each reuses the memory of the one before)."""
    index = np.arange(start, start + n, dtype=np.uint64)
    index *= GOLDEN
    z, t = np.empty_like(index), np.empty_like(index)
    for seed in seeds:
        np.add(index, np.uint64(seed & 0xFFFFFFFFFFFFFFFF), out=z)
        for shift, mix in ((30, MIX1), (27, MIX2), (31, None)):
            np.right_shift(z, np.uint64(shift), out=t)
            z ^= t
            if mix is not None:
                z *= mix
        yield z


def uniform(seed: int, start: int, n: int) -> Array:
    """n uniforms in [0, 1) for coordinates start..start+n of a tensor: splitmix64 of (seed, index).

    Counter-based, so any chunk of a tensor draws the same numbers as the whole tensor does."""
    return (next(_draws([seed], start, n)) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def kept_below(seeds: Sequence[int], start: int, n: int, p: float) -> Array:
    """`uniform(seed, start, n) < p` for each seed (a row each), compared on the integers: u = k·2⁻⁵³ < p ⟺
    k < ⌈p·2⁵³⌉ ⟺ bits < ⌈p·2⁵³⌉·2¹¹."""
    c = math.ceil(p * 2.0**53)
    out = np.ones((len(seeds), n), bool)
    if c < 1 << 53:
        for row, z in zip(out, _draws(seeds, start, n)):
            np.less(z, np.uint64(c << 11), out=row)
    return out


def vector_seed(seed: int, vector_sha: str, key: str) -> int:
    """Deterministic per-(vector, tensor) seed, independent of the order vectors arrive in."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{vector_sha}:{key}".encode()).digest()[:8], "little")


def masked(x: Array, keep: Array) -> Array:
    """`np.where(keep, x, 0)` for float32 `x` (a new array), as an AND of the bits with 0 or all ones: the same
    values, +0.0 where dropped, several times faster."""
    bits = np.negative(keep.view(np.int8), dtype=np.int32).view(np.uint32)
    bits &= x.view(np.uint32)
    return bits.view(np.float32)


Windows = tuple[Array, Array]  # per row: the magnitudes kept, lo ≤ |x| < hi


@dataclass(frozen=True)
class Sparsify:
    """Per-vector sparsification of one tensor, on rows (one a vector). `windows` needs each row's whole tensor;
    `apply` works on any chunk of the rows.

    dare:        keep each coordinate with probability `density`, rescale kept ones by 1/density (Yu et al. 2024)
    magnitude:   keep the `density` fraction with the largest |x| (TIES trim, Yadav et al. 2023)
    breadcrumbs: drop the `gamma` fraction with the largest |x|, then keep the next `density` fraction
                 (Davari & Belilovsky 2024)
    """

    kind: Literal["dare", "magnitude", "breadcrumbs"]
    density: float
    gamma: float = 0.0

    @property
    def ranked(self) -> bool:
        """Whether `windows` ranks magnitudes over the whole tensor (all but DARE, which keeps every magnitude)."""
        return self.kind != "dare"

    def windows(self, rows: Iterable[Array]) -> Windows:
        """For each row (a vector's whole tensor): lo ≤ |x| < hi, the magnitudes kept, from the row's ranks."""
        return self.stack(self.window(np.abs(row)) for row in rows)

    @staticmethod
    def stack(pairs: Iterable[tuple[float, float]]) -> Windows:
        lo, hi = zip(*pairs)
        return np.array(lo, np.float32), np.array(hi, np.float32)

    def window(self, mags: Array) -> tuple[float, float]:
        """lo ≤ |x| < hi for one vector's whole tensor from its float32 magnitudes `mags`, which are reordered in
        place (ranks selected by `np.partition`, not sorted)."""
        if not self.ranked:
            return 0.0, math.inf
        n = mags.size
        top = min(int(round(self.gamma * n)), n - 1)
        keep = min(max(1, int(round(self.density * n))), n - top)
        # ascending ranks of the kth largest, one `partition` each (numpy's vectorised select takes one rank), on
        # the bits: non-negative floats order as their bits do, and integers select about twice as fast
        ints = mags.view(np.int32)
        if top:
            ints.partition(n - top)
        ints[: n - top].partition(n - top - keep)
        return float(mags[n - top - keep]), float(mags[n - top]) if top else math.inf

    def apply(self, x: Array, windows: Windows, seeds: Sequence[int], start: int = 0) -> Array:
        """Sparsify the rows of `x`, each the coordinates start..start+x.shape[1] of its vector's tensor (a new
        array; `x` is not changed)."""
        if self.kind == "dare":
            keep = kept_below(seeds, start, x.shape[1], self.density)
            return masked(np.divide(x, np.float32(self.density)), keep)
        mags = np.abs(x)
        keep = mags >= windows[0][:, None]
        if np.isfinite(windows[1]).any():
            keep &= mags < windows[1][:, None]
        return masked(x, keep)

    def whole(self, x: Array, seeds: Sequence[int]) -> Array:
        """`apply` to rows that are whole tensors."""
        return self.apply(x, self.windows(x), seeds)


# --- consensus (across vectors, coordinate by coordinate) ---------------------------------------------
# Each reduces rows (N, M) to M values with numpy's own reductions over axis 0 of C-ordered arrays, so every
# coordinate's result is the same whatever M: a merge in chunks equals `combine` bit for bit.

def sign_election(x: Array, w: Array) -> Array:
    """TIES (Yadav et al. 2023): elect the sign of the summed mass Σwᵢxᵢ, then the weighted mean of the entries
    that agree with it. An exact zero mass elects the majority sign of the non-zero entries (none on a tie).

    Agreement is xᵢ·sign > 0, and the agreeing mass is sign·Σ max(wᵢxᵢ·sign, 0): negating is exact, so this is
    the sum of the agreeing wᵢxᵢ (weights are positive), in the same order."""
    w = w.astype(x.dtype)
    unit = bool((w == 1).all())
    wx = x if unit else x * w[:, None]
    sign = np.sign(wx.sum(0))
    zero = sign == 0
    if zero.any():
        sign[zero] = np.sign(np.sign(x[:, zero]).sum(0))
    signed = wx * sign
    agree = signed > 0 if unit else x * sign > 0
    if unit:
        np.maximum(signed, 0, out=signed)
        weight = agree.view(np.uint8).sum(0, dtype=np.uint8 if len(x) < 256 else np.uint32).astype(x.dtype)
    else:
        signed = np.where(agree, signed, 0)
        weight = np.where(agree, w[:, None], 0).sum(0)
    total = signed.sum(0)
    total *= sign
    return np.divide(total, weight, out=np.zeros_like(total), where=weight > 0).astype(np.float32)


def _transposed(a: Array, block: int = 2048) -> Array:
    """`a.T` as a C-ordered copy of a 2-d array, made `block` lines of its long side at a time (each piece stays
    in cache)."""
    out = np.empty(a.shape[::-1], a.dtype)
    for b in range(0, max(a.shape), block):
        if a.shape[1] >= a.shape[0]:
            out[b:b + block] = a[:, b:b + block].T
        else:
            out[:, b:b + block] = a[b:b + block].T
    return out


def _sorted_columns(x: Array, lo: int, hi: int) -> Array:
    """Ranks lo..hi of every column of `x`, as rows (hi − lo, M): each coordinate's values made one contiguous
    row and sorted by numpy's vectorised sort (far faster than sorting along axis 0), then transposed back."""
    t = _transposed(x)
    t.sort(axis=1)
    return _transposed(t[:, lo:hi])


def median(x: Array, w: Array) -> Array:
    """Coordinate-wise median (unweighted): a minority of vectors cannot move it past the honest ones.

    `np.median(x, axis=0)`: the middle rank, or the mean of the two middle ranks."""
    n = x.shape[0]
    return _sorted_columns(x, (n - 1) // 2, n // 2 + 1).mean(0).astype(np.float32)


def trimmed_mean(trim: float) -> Callable[[Array, Array], Array]:
    """Coordinate-wise mean after dropping the ⌊trim·N⌋ largest and smallest values (unweighted)."""
    def consensus(x: Array, w: Array) -> Array:
        k = int(math.floor(trim * x.shape[0]))
        return _sorted_columns(x, k, x.shape[0] - k).mean(0, dtype=np.float64).astype(np.float32)
    return consensus


def stock_factor(unit_sum_sq: float, n: int) -> float:
    """Model Stock's t = N·cosθ / (1 + (N−1)·cosθ) from ‖Σ τᵢ/‖τᵢ‖‖², since Σ_{i≠j} cos θᵢⱼ = ‖Σ uᵢ‖² − N.

    cosθ is the mean pairwise cosine, clipped to [-1, 1]; at the singularity t = 0 (the base), as mergekit does."""
    if n < 2:
        return 1.0
    cos = min(1.0, max(-1.0, (unit_sum_sq - n) / (n * (n - 1))))
    denominator = 1 + (n - 1) * cos
    return 0.0 if abs(denominator) < 1e-6 else n * cos / denominator


# --- recipes and the registry -------------------------------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    """How a method combines: weighting × optional sparsification × optional consensus (see the module doc)."""

    weights: Literal["ones", "samples"] = "ones"
    normalize: bool = False
    sparsify: Sparsify | None = None
    consensus: Callable[[Array, Array], Array] | None = None
    stock: bool = False  # Model Stock: scale each tensor of the mean by `stock_factor`
    head: tuple[str, float] | None = None  # sum sufficient statistics, solve the head (merging.heads): solver, strength
    min_vectors: int = 1

    @property
    def streams(self) -> bool:
        """True when the merge can read one vector file at a time (no consensus)."""
        return self.consensus is None


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: its name, first docstring line, reference, parameters and recipe builder."""

    name: str
    summary: str
    reference: str
    params: tuple[Param, ...]
    build: Callable[..., Recipe]

    def resolve(self, given: Mapping[str, Any] | None = None) -> dict[str, float]:
        """Every parameter's value (given or default), each checked; unknown names are refused."""
        given = dict(given or {})
        names = [p.name for p in self.params]
        for name in given:
            if name not in names:
                takes = f"it takes {', '.join(names)}" if names else "it takes none"
                raise ConfigError(f"{name} is not a parameter of method {self.name!r}; {takes}", field=name,
                                  expected=names, got=given[name])
        return {p.name: p.check(given.get(p.name, p.default)) for p in self.params}

    def recipe(self, params: Mapping[str, Any] | None = None) -> Recipe:
        return self.build(**self.resolve(params))

    def describe(self) -> str:
        params = "; ".join(p.describe() for p in self.params)
        return f"{self.name}: {self.summary}" + (f" [{params}]" if params else "")


MERGE_METHODS: dict[str, MergeMethod] = {}
DEFAULT_METHOD = "mean"  # the default combination: `sum` adds every vector whole, so it grows with the sites
COMPARED = ("sum", "mean", "weighted", "ties", "dare")  # what a simulation compares unless told


def weight_methods() -> list[str]:
    """The methods that combine weight deltas: every one but those that solve a head from sufficient statistics."""
    return [name for name, m in MERGE_METHODS.items() if m.recipe().head is None]


def merge_method(name: str, reference: str) -> Callable[[Callable[..., Recipe]], Callable[..., Recipe]]:
    """Register a method: its parameters are the function's keyword arguments, each defaulting to a `Param`."""
    def register(fn: Callable[..., Recipe]) -> Callable[..., Recipe]:
        params = []
        for p in inspect.signature(fn).parameters.values():
            if not isinstance(p.default, Param):
                raise TypeError(f"{name}: parameter {p.name} needs a Param default")
            params.append(replace(p.default, name=p.name))
        summary = (fn.__doc__ or "").strip().splitlines()[0]
        MERGE_METHODS[name] = MergeMethod(name, summary, reference, tuple(params), fn)
        return fn
    return register


def get_method(name: str) -> MergeMethod:
    if name not in MERGE_METHODS:
        raise ConfigError(f"method {name!r} is unknown; choose one of {', '.join(MERGE_METHODS)}", field="method",
                          expected=list(MERGE_METHODS), got=name)
    return MERGE_METHODS[name]


DENSITY_HELP = "fraction of each tensor kept"


def _density(default: float, help: str = DENSITY_HELP) -> Any:
    return param(default, low=0, high=1, high_open=False, help=help)


@merge_method("sum", reference="Ilharco et al. 2023, Editing models with task arithmetic (ICLR)")
def sum_() -> Recipe:
    """Σ τᵢ: task arithmetic, as in the data-vector paper."""
    return Recipe()


@merge_method("mean", reference="Wortsman et al. 2022, Model soups (ICML)")
def mean() -> Recipe:
    """Σ τᵢ / N."""
    return Recipe(normalize=True)


@merge_method("weighted", reference="McMahan et al. 2017, Communication-efficient learning (FedAvg, AISTATS)")
def weighted() -> Recipe:
    """Σ nᵢτᵢ / Σ nᵢ by sample count: one-shot FedAvg."""
    return Recipe(weights="samples", normalize=True)


@merge_method("dare", reference="Yu et al. 2024, Language models are Super Mario (DARE, ICML)")
def dare(density: float = _density(0.5, "probability of keeping each coordinate")) -> Recipe:
    """Drop each coordinate with probability 1−density, rescale by 1/density (seeded), then sum."""
    return Recipe(sparsify=Sparsify("dare", density))


@merge_method("ties", reference="Yadav et al. 2023, TIES-Merging: resolving interference (NeurIPS)")
def ties(density: float = _density(0.2)) -> Recipe:
    """Trim each tensor to its top-density magnitudes, elect the sign of the summed mass, mean of agreeing entries."""
    return Recipe(sparsify=Sparsify("magnitude", density), consensus=sign_election)


@merge_method("dare_ties", reference="Yu et al. 2024 (DARE, ICML) with Yadav et al. 2023 (TIES, NeurIPS)")
def dare_ties(density: float = _density(0.5, "probability of keeping each coordinate")) -> Recipe:
    """DARE's random drop and rescale, then TIES's sign election and mean of agreeing entries."""
    return Recipe(sparsify=Sparsify("dare", density), consensus=sign_election)


@merge_method("breadcrumbs", reference="Davari & Belilovsky 2024, Model Breadcrumbs: scaling multi-task model "
                                       "merging with sparse masks (ECCV)")
def breadcrumbs(
    density: float = _density(0.9),
    gamma: float = param(0.01, low=0, high=1, low_open=False, help="fraction of largest magnitudes dropped first"),
) -> Recipe:
    """Mask each tensor's largest (gamma) and smallest magnitudes, keeping a density fraction, then sum."""
    if density + gamma > 1:
        raise ConfigError(f"gamma must be at most 1 − density ({1 - density:g}), got {gamma:g}", field="gamma",
                          got=gamma)
    return Recipe(sparsify=Sparsify("breadcrumbs", density, gamma))


@merge_method("model_stock", reference="Jang et al. 2024, Model Stock: all we need is just a few fine-tuned "
                                       "models (ECCV)")
def model_stock() -> Recipe:
    """Mean scaled per tensor by t = N·cosθ/(1+(N−1)·cosθ), cosθ the mean pairwise cosine (streams from sums)."""
    return Recipe(normalize=True, stock=True, min_vectors=2)


@merge_method("lda-head", reference="Hastie et al. 2009, The elements of statistical learning, §4.3 (LDA)")
def lda_head(shrink: float = param(DEFAULT_SHRINK, low=0, low_open=False,
                                   help="covariance eigenvalue floor relative to the mean eigenvalue (noise adds "
                                        "its own)")) -> Recipe:
    """Statistics vectors: sum the sufficient statistics, solve the LDA head once (taskvec.merging.heads)."""
    return Recipe(head=("lda", shrink))


@merge_method("ridge-head", reference="Fanì et al. 2024, Accelerating heterogeneous federated learning with "
                                      "closed-form classifiers (Fed3R, ICML)")
def ridge_head(ridge: float = param(DEFAULT_RIDGE, low=0, low_open=False,
                                    help="ridge λ relative to tr(M)/p (noise adds its own)")) -> Recipe:
    """Statistics vectors: sum the sufficient statistics, solve the ridge head once (under DP prefer lda-head).

    The noise's share of λ shrinks a DP ridge head towards the class prior."""
    return Recipe(head=("ridge", ridge))


@merge_method("median", reference="Yin et al. 2018, Byzantine-robust distributed learning (ICML)")
def median_() -> Recipe:
    """Coordinate-wise median: robust to a minority of bad vectors."""
    return Recipe(consensus=median)


@merge_method("trimmed_mean", reference="Yin et al. 2018, Byzantine-robust distributed learning (ICML)")
def trimmed_mean_(trim: float = param(0.2, low=0, high=0.5, low_open=False,
                                      help="fraction of values dropped at each end, per coordinate")) -> Recipe:
    """Coordinate-wise mean without the ⌊trim·N⌋ largest and smallest values: robust to a minority."""
    return Recipe(consensus=trimmed_mean(trim))


def vector_weights(recipe: Recipe, samples: Sequence[float | None], names: Sequence[str] | None = None) -> Array:
    """Each vector's raw weight wᵢ (1, or its sample count)."""
    if recipe.weights == "ones":
        return np.ones(len(samples))
    for i, s in enumerate(samples):
        if s is None or not s > 0:
            who = names[i] if names else f"vector {i}"
            raise TaskvecError(f"{who}: has no sample count, which weighting by samples needs "
                               "(export it with `samples`)", field="samples")
    return np.asarray(samples, dtype=np.float64)


def combine(
    method: str, tensors: Sequence[Array], params: Mapping[str, Any] | None = None, *,
    samples: Sequence[float | None] | None = None, seeds: Sequence[int] | None = None,
    scales: Sequence[float] | None = None,
) -> Array:
    """The reference: combine one tensor from every vector at once (the streaming merge must equal it);
    `scales` are staleness weights, each vector scaled by its own before it is combined."""
    recipe = get_method(method).recipe(params)
    x = np.stack([np.asarray(t, dtype=np.float32) for t in tensors])
    w = vector_weights(recipe, samples if samples is not None else [None] * len(x))
    if recipe.sparsify is not None:
        sp = recipe.sparsify
        seeds = seeds if seeds is not None else [0] * len(x)
        x = sp.whole(x.reshape(len(x), -1), seeds).reshape(x.shape)
    if scales is not None:
        x = x * np.asarray(scales, dtype=np.float32).reshape(-1, *[1] * (x.ndim - 1))
    if recipe.consensus is not None:
        return recipe.consensus(x.reshape(len(x), -1), w).reshape(x.shape[1:])
    out = np.tensordot(w, x.astype(np.float64), axes=1)
    if recipe.normalize:
        out /= w.sum()
    if recipe.stock:
        norms = [np.linalg.norm(t) for t in x]
        units = sum(t.astype(np.float64) / n for t, n in zip(x, norms) if n > 0)
        out *= stock_factor(float(np.sum(np.square(units))), len(x))
    return out.astype(np.float32)
