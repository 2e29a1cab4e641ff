"""The merge: `base + λ·combine(vectors)`, from a `MergePlan` to the merged model file, with numpy (no torch).

Read top to bottom: a `MergePlan` is validated once (method parameters, λ, seed, privacy budget) and opens its
inputs (every vector checked against the base from headers alone, the budget checked, before any tensor is
read); `accumulate` reads the vectors, a method without consensus one file at a time into one running sum,
the others tensor by tensor in chunks, so memory does not grow with the number of vectors; `save_merged`
writes `base + λ·combined` with the plan and every input recorded. The arithmetic is in `methods.py`.

The base may be a merged version N (`taskvec.io.lineage`): a vector against any version K of its lineage is
accepted, scaled by its staleness weight (1 + N − K)^(−a) before it is combined, and the merged file is
version N+1 with the lineage extended by the base.

Every byte used is read once from one open file into private memory, and that same memory is hashed on
helper threads while the merge sums it (hashlib releases the GIL): a vector whose bytes do not match its
sha256 fails the merge before anything is written. `diagnose` is one more streaming pass that flags vectors
far from the coordinate-wise median (scaled, sign-flipped, noise).
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from taskvec.errors import ConfigError, FileFormatError, MismatchError, TaskvecError, check_range
from taskvec.io.files import DTYPE_SIZES, FORMAT, FORMAT_VERSION, Digest, Header, check_output, now, read_kind
from taskvec.io.layout import check_against_base, factor_names, is_statistic, vector_keys
from taskvec.io.lineage import (
    DEFAULT_STALENESS,
    STALENESS_RULE,
    child_lineage,
    describe_versions,
    merged_summaries,
    merged_vectors,
    model_version,
    staleness_weight,
    vector_base,
    versions,
)
from taskvec.io.tensors_np import as_float32, from_float32, save_arrays
from taskvec.merging.methods import Array, Recipe, get_method, stock_factor, vector_seed, vector_weights
from taskvec.privacy.ledger import PrivacyBudget, check_merge_budget
from taskvec.progress import Track, no_track

CHUNK_ELEMENTS = 1 << 22  # consensus methods hold at most this many values of all vectors at once (16 MB)
HASH_LANES = 2  # threads hashing (each file's bytes in order on one lane)
IN_FLIGHT_BYTES = 256 << 20  # read but not yet hashed: at most this, and at most one vector's size


def check_vectors(base: Header, paths: Sequence[str | os.PathLike[str]]) -> list[Header]:
    """Validate every vector against the base from headers alone; fail fast naming the file and field.

    A vector may be against the base (version N) or any version in its lineage, recording that version's
    position; a vector already merged into one of them is refused."""
    if not paths:
        raise FileFormatError("no vectors given")
    ids = versions(base.meta)
    merged = merged_vectors(base.meta)
    headers: list[Header] = []
    seen: dict[str, Path] = {}
    for p in paths:
        h = read_kind(p, "vector")
        m = h.meta
        check_against_base(h, base, versions=ids)
        _check_position(h, base, ids)
        if m["sha256"] in merged:
            k = merged[m["sha256"]]
            raise MismatchError(
                f"{h.path}: already merged into v{k} ({ids[k][:12]}), on which base {base.path} (v{len(ids) - 1}) "
                f"builds (sha256 {m['sha256'][:12]}); give only vectors not merged yet", path=h.path, field="sha256")
        if m["sha256"] in seen:
            raise MismatchError(
                f"{h.path}: same vector as {seen[m['sha256']]} (sha256 {m['sha256'][:12]}); give it once"
            )
        seen[m["sha256"]] = h.path
        headers.append(h)
    return headers


def _check_position(h: Header, base: Header, ids: Sequence[str]) -> None:
    """The version and lineage a vector records for its base must be where that base sits in `base`'s lineage
    (recorded, not looked up: a merge at λ = 0 has its parent's identity, so an identity may sit twice)."""
    identity = h.meta["base"]["identity"]
    version, lineage = vector_base(h.meta)
    if version < len(ids) and ids[version] == identity and lineage == list(ids[:version]):
        return
    k = ids.index(identity)
    fld = "base.version" if version != k else "base.lineage"
    raise MismatchError(
        f"{h.path}: records its base as v{version} with lineage {describe_versions(lineage) or '(none)'}, but "
        f"base {base.path} has {identity[:12]} as v{k} after {describe_versions(ids[:k]) or 'nothing'}",
        path=h.path, field=fld, expected=k, got=version)


def earlier_releases(base: Header) -> list[tuple[str, dict[str, Any]]]:
    """(where, summary) of every vector already merged into `base` or its lineage, for the privacy budget: its
    sha256, run id and ledger tell distinct releases and trainings apart (`check_merge_budget`)."""
    return [(f"{base.path} (v{k} input {v['sha256'][:12]})", v) for k, v in merged_summaries(base.meta)]


def base_versions(headers: Sequence[Header]) -> list[int]:
    """The version of the base's lineage each vector (checked by `check_vectors`) was fine-tuned from."""
    return [vector_base(h.meta)[0] for h in headers]


# --- the plan -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MergePlan:
    """Everything a merge depends on, validated once; full, incremental and calibrated merges take one, and
    the merged file records it whole (`record`). Build it with `MergePlan.create`."""

    vectors: tuple[Path, ...]
    base: Path
    method: str = "sum"
    params: Mapping[str, float] = field(default_factory=dict)
    scale: float = 1.0
    seed: int = 0
    budget: PrivacyBudget = field(default_factory=PrivacyBudget)
    exclude_outliers: bool = False
    staleness: float = DEFAULT_STALENESS

    @classmethod
    def create(
        cls, vectors: Sequence[str | os.PathLike[str]], base: str | os.PathLike[str], *, method: str = "sum",
        params: Mapping[str, Any] | None = None, density: float | None = None, scale: float = 1.0, seed: int = 0,
        budget: PrivacyBudget | None = None, exclude_outliers: bool = False, staleness: float = DEFAULT_STALENESS,
    ) -> MergePlan:
        """A checked plan: known method, parameters in range (`density` is shorthand for that parameter).

        `staleness` is the exponent a of the weight s = (1 + d)^(−a) of a vector fine-tuned from a version d
        versions older than the base (FedBuff, Nguyen et al. 2022; FedAsync, Xie et al. 2019); 0: no discount."""
        given = dict(params or {})
        if density is not None:
            given["density"] = density
        resolved = get_method(method).resolve(given)
        check_range("scale", scale)
        check_range("staleness", staleness, low=0, low_open=False)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {seed!r}", field="seed", got=seed)
        budget = budget or PrivacyBudget()
        budget.check()
        return cls(tuple(Path(v) for v in vectors), Path(base), method, resolved, float(scale), seed, budget,
                   exclude_outliers, float(staleness))

    @property
    def recipe(self) -> Recipe:
        return get_method(self.method).recipe(self.params)

    def open(self) -> tuple[Header, list[Header]]:
        """The base and vector headers, each vector checked against the base, the method and the privacy budget
        (no tensor is read)."""
        bh = read_kind(self.base, "model")
        headers = check_vectors(bh, self.vectors)
        self.check_inputs(bh, headers)
        return bh, headers

    def check_inputs(self, base: Header, headers: Sequence[Header]) -> dict[str, Any]:
        """What the method needs of its inputs (enough vectors, sample counts for weighting by samples) and the
        privacy budget (every ε recomputed, seeded noise refused unless allowed, each contributor's new vectors
        composed with its releases already in `base`'s lineage, every distinct release counted): its record."""
        recipe = self.recipe
        if len(headers) < recipe.min_vectors:
            raise TaskvecError(f"method {self.method!r} needs at least {recipe.min_vectors} vectors, "
                               f"got {len(headers)}")
        vector_weights(recipe, [h.meta.get("samples") for h in headers], [str(h.path) for h in headers])
        return check_merge_budget(headers, self.budget, earlier_releases(base))

    def with_method(self, method: str, params: Mapping[str, Any] | None = None, scale: float | None = None
                    ) -> MergePlan:
        """The same plan with another method (its defaults unless `params`) and optionally another λ."""
        return replace(self, method=method, params=get_method(method).resolve(params),
                       scale=self.scale if scale is None else scale)

    def weights(self, base: Header, headers: Sequence[Header]) -> tuple[Array, Array]:
        """Each vector's raw weight wᵢ (1 or its samples) and staleness weight sᵢ = (1 + dᵢ)^(−a), dᵢ = N − Kᵢ
        for a vector fine-tuned from version Kᵢ of the base's lineage, the base being version N."""
        w = vector_weights(self.recipe, [h.meta.get("samples") for h in headers], [str(h.path) for h in headers])
        n = model_version(base.meta)
        s = np.array([staleness_weight(n - k, self.staleness) for k in base_versions(headers)])
        return w, s

    def record(self, base: Header, headers: Sequence[Header]) -> dict[str, Any]:
        """The plan as the merged file records it, with the budget each contributor spends in `headers`."""
        return {
            "method": self.method, "params": dict(self.params), "reference": get_method(self.method).reference,
            "scale": self.scale, "seed": self.seed, "exclude_outliers": self.exclude_outliers,
            "staleness": self.staleness, "staleness_rule": STALENESS_RULE,
            "privacy_budget": check_merge_budget(headers, self.budget, earlier_releases(base)),
        }


# --- reading: one open file per vector, the bytes used are the bytes hashed ---------------------------

class Hasher:
    """sha256 on helper threads, overlapping the reading and summing; at most IN_FLIGHT_BYTES wait for it."""

    def __init__(self, max_bytes: int = IN_FLIGHT_BYTES) -> None:
        self.max_bytes = max_bytes
        self.lanes = [ThreadPoolExecutor(1) for _ in range(HASH_LANES)]
        self.pending: deque[tuple[Future[None], int]] = deque()
        self.in_flight = 0

    def submit(self, lane: int, fn: Callable[..., None], *args: Any, nbytes: int = 0) -> None:
        while self.pending and self.in_flight + nbytes > self.max_bytes:
            fut, n = self.pending.popleft()
            fut.result()
            self.in_flight -= n
        self.pending.append((self.lanes[lane % HASH_LANES].submit(fn, *args), nbytes))
        self.in_flight += nbytes

    def drain(self) -> None:
        while self.pending:
            self.pending.popleft()[0].result()
        self.in_flight = 0

    def close(self) -> None:
        for lane in self.lanes:
            lane.shutdown(wait=True)


class VectorFile:
    """One vector file, opened once. `read` copies bytes into private memory and queues the same memory for its
    digest; tensors must be read whole, in sorted key order, for `verify` to pass."""

    def __init__(self, header: Header, hasher: Hasher, lane: int) -> None:
        self.header, self.hasher, self.lane = header, hasher, lane
        self.file = open(header.path, "rb", buffering=0)  # noqa: SIM115 - closed by `close`
        self.digest = Digest()

    def read(self, key: str, start: int = 0, stop: int | None = None, verify: bool = True) -> Array:
        """Elements start..stop of tensor `key`, flat, as read-only float32."""
        t = self.header.tensors[key]
        size = DTYPE_SIZES[t.dtype]
        stop = t.numel if stop is None else stop
        buf = bytearray((stop - start) * size)
        self.file.seek(self.header.data_start + t.start + start * size)
        if self.file.readinto(buf) != len(buf):
            raise FileFormatError(f"{self.header.path}: truncated while reading {key}")
        if verify:
            if start == 0:
                self.hasher.submit(self.lane, self.digest.begin, key, t.dtype, t.shape, t.end - t.start)
            self.hasher.submit(self.lane, self.digest.feed, buf, nbytes=len(buf))
        x = as_float32(buf, t.dtype)
        x.flags.writeable = False  # it may be the memory being hashed
        return x

    def read_delta(self, key: str) -> Array:
        """The whole delta of base key `key`, flat: a tensor of the file, or the product of its low-rank factors
        (a LoRA vector's `KEY@lora_A`, `KEY@lora_B`), expanded here one tensor at a time."""
        factors = self.header.meta.get("factors", {})
        if key not in factors:
            return self.read(key)
        a, b = (self.read(n).reshape(self.header.tensors[n].shape) for n in factor_names(key))
        return (b @ a).ravel()

    def verify(self) -> None:
        """After `Hasher.drain`: the bytes read are the bytes the vector's sha256 names."""
        if self.digest.hexdigest() != self.header.meta["sha256"]:
            raise FileFormatError(f"{self.header.path}: content does not match its sha256; the file is corrupted")

    def close(self) -> None:
        self.file.close()


class Reading:
    """Open vector files and their hasher for the length of a `with` block; `verify` checks every file."""

    def __init__(self, headers: Sequence[Header]) -> None:
        largest = max((sum(t.end - t.start for t in h.tensors.values()) for h in headers), default=0)
        self.hasher = Hasher(min(IN_FLIGHT_BYTES, largest))
        self.files = [VectorFile(h, self.hasher, i) for i, h in enumerate(headers)]

    def __enter__(self) -> Reading:
        return self

    def __exit__(self, *exc: object) -> None:
        self.hasher.close()
        for f in self.files:
            f.close()

    def verify(self) -> None:
        self.hasher.drain()
        for f in self.files:
            f.verify()

    @property
    def step(self) -> int:
        """Values of one tensor per file in a chunk: CHUNK_ELEMENTS across all files."""
        return max(1, CHUNK_ELEMENTS // len(self.files))

    def chunks(self, key: str, numel: int) -> Iterator[tuple[int, int, Array]]:
        """(start, stop, values of every file) over tensor `key` in chunks of at most CHUNK_ELEMENTS values."""
        for start in range(0, numel, self.step):
            stop = min(numel, start + self.step)
            x = np.stack([f.read(key, start, stop) for f in self.files])
            if not np.isfinite(x).all():
                bad = next(f for f, row in zip(self.files, x) if not np.isfinite(row).all())
                raise FileFormatError(f"{bad.header.path}: tensor {key} holds NaN or Inf")
            yield start, stop, x


# --- accumulating -------------------------------------------------------------------------------------

@dataclass
class Accumulator:
    """A merge's running state: Σ wᵢ·sᵢ(τᵢ) per delta key (with consensus: the combined tensor), Σ τᵢ/‖τᵢ‖ per key
    (Model Stock), Σ wᵢ, the vector count, and per-key sums of BatchNorm statistics. All arrays are flat."""

    sums: dict[str, Array] = field(default_factory=dict)
    units: dict[str, Array] = field(default_factory=dict)
    weight: float = 0.0
    count: int = 0
    stats: dict[str, Array] = field(default_factory=dict)
    stat_counts: dict[str, int] = field(default_factory=dict)

    def add_stat(self, k: str, x: Array) -> None:
        self.stats[k] = self.stats[k] + x if k in self.stats else x.copy()
        self.stat_counts[k] = self.stat_counts.get(k, 0) + 1

    def combined(self, recipe: Recipe) -> Combined:
        """`combine(vectors)` per key, computed in place (the accumulator is used up)."""
        for k, s in self.sums.items():
            f = 1.0 / self.weight if recipe.normalize else 1.0
            if recipe.stock:
                f *= stock_factor(float(np.dot(self.units[k], self.units[k])), self.count)
            if f != 1.0:
                s *= np.float32(f)
        stats = {k: (v / self.stat_counts[k]).astype(np.float32) for k, v in self.stats.items()}
        return Combined(self.sums, stats)


@dataclass
class Combined:
    """The combined deltas (flat float32 per key) and the statistics' values (the vectors' mean, or re-estimated)."""

    deltas: dict[str, Array]
    stats: dict[str, Array]


def _add(sums: dict[str, Array], k: str, x: Array, w: float) -> None:
    if k not in sums:
        sums[k] = np.array(x, dtype=np.float32) if w == 1 else x * np.float32(w)
    elif w == 1:
        sums[k] += x
    else:
        sums[k] += x * np.float32(w)


def accumulate(plan: MergePlan, base: Header, headers: Sequence[Header], track: Track[Any] = no_track,
               acc: Accumulator | None = None) -> Accumulator:
    """Read the vectors into `acc` (a new one by default; an incremental merge passes its running state), each
    delta times its staleness weight sᵢ (see `MergePlan.weights`)."""
    recipe = plan.recipe
    weights, scales = plan.weights(base, headers)
    acc = Accumulator() if acc is None else acc
    with Reading(headers) as reading:
        if recipe.streams:
            _stream(plan, recipe, reading, weights, scales, acc, track)
        else:
            _by_tensor(plan, recipe, reading, weights, scales, acc, track)
        reading.verify()
    if recipe.streams and not recipe.sparsify:  # NaN/Inf anywhere reaches the sums; name the file only then
        for k, s in acc.sums.items():
            if not np.isfinite(s).all():
                raise _nonfinite(headers, k)
    return acc


def _stream(plan: MergePlan, recipe: Recipe, reading: Reading, weights: Array, scales: Array, acc: Accumulator,
            track: Track[Any]) -> None:
    """Σ wᵢ·sᵢ·sparsify(τᵢ) (sᵢ the staleness weight), one vector file at a time."""
    sp = recipe.sparsify
    for f, w, s in track(zip(reading.files, weights, scales), "merging", len(weights)):
        h = f.header
        stats = set(h.meta.get("statistics", []))
        for k in vector_keys(h):  # a subset vector lacks keys (zero deltas); factored keys are expanded
            x = f.read_delta(k)
            if k in stats:
                acc.add_stat(k, x)
                continue
            if sp is not None:
                if not np.isfinite(x).all():
                    raise FileFormatError(f"{h.path}: tensor {k} holds NaN or Inf")
                x = sp.apply(x, sp.window(x), vector_seed(plan.seed, h.meta["sha256"], k))
            if recipe.stock:
                norm = float(np.linalg.norm(x))
                if norm > 0:
                    _add(acc.units, k, x, 1 / norm)
                elif k not in acc.units:
                    acc.units[k] = np.zeros(x.size, np.float32)
            _add(acc.sums, k, x, float(w * s))  # sparsifying commutes with a positive scale
        acc.weight += float(w)
        acc.count += 1


def _by_tensor(plan: MergePlan, recipe: Recipe, reading: Reading, weights: Array, scales: Array, acc: Accumulator,
               track: Track[Any]) -> None:
    """Consensus: tensor by tensor with every file open, in chunks of all vectors' values (each scaled by its
    staleness weight after sparsifying, with which scaling commutes)."""
    assert recipe.consensus is not None
    sp = recipe.sparsify
    files = reading.files
    carried = [set(vector_keys(f.header)) for f in files]
    keys = sorted(set().union(*carried))
    for k in track(keys, "merging", len(keys)):
        if is_statistic(k):
            for f in files:
                if k in f.header.tensors:
                    acc.add_stat(k, f.read(k))
            continue
        if not all(k in f.header.tensors for f in files):  # factored or missing somewhere: whole tensors
            acc.sums[k] = _whole(plan, recipe, files, carried, k, weights, scales)
            continue
        numel = files[0].header.tensors[k].numel
        ranked = sp is not None and sp.kind != "dare"  # magnitude windows need each vector's whole tensor
        windows = [(0.0, math.inf)] * len(files)
        if ranked and numel > reading.step:  # in chunks: one more (unhashed) read of each tensor for its window
            windows = [sp.window(f.read(k, verify=False)) for f in files]  # type: ignore[union-attr]
        seeds = [vector_seed(plan.seed, f.header.meta["sha256"], k) for f in files]
        out = np.empty(numel, np.float32)
        for start, stop, x in reading.chunks(k, numel):
            if ranked and numel <= reading.step:  # one chunk holds every vector's whole tensor
                windows = [sp.window(row) for row in x]  # type: ignore[union-attr]
            if sp is not None:
                x = np.stack([sp.apply(row, win, s, start) for row, win, s in zip(x, windows, seeds)])
            out[start:stop] = recipe.consensus(_scaled(x, scales), weights)
        acc.sums[k] = out
    acc.weight += float(weights.sum())
    acc.count += len(files)


def _scaled(x: Array, scales: Array) -> Array:
    """Rows of `x` times their staleness weights (`x` itself when none discounts)."""
    return x if (scales == 1).all() else x * scales.astype(np.float32)[:, None]


def _whole(plan: MergePlan, recipe: Recipe, files: Sequence[VectorFile], carried: Sequence[set[str]], key: str,
           weights: Array, scales: Array) -> Array:
    """Consensus over whole (expanded) deltas of `key`, a zero delta for a vector that does not carry it."""
    assert recipe.consensus is not None
    rows = {i: f.read_delta(key) for i, (f, ks) in enumerate(zip(files, carried)) if key in ks}
    numel = next(iter(rows.values())).size
    x = np.stack([rows.get(i, np.zeros(numel, np.float32)) for i in range(len(files))])
    if not np.isfinite(x).all():
        raise FileFormatError(f"a vector's tensor {key} holds NaN or Inf")
    sp = recipe.sparsify
    if sp is not None:
        x = np.stack([sp.apply(row, sp.window(row), vector_seed(plan.seed, f.header.meta["sha256"], key))
                      for row, f in zip(x, files)])
    return recipe.consensus(_scaled(x, scales), weights)  # type: ignore[no-any-return]


def _nonfinite(headers: Sequence[Header], key: str) -> TaskvecError:
    """The error for a sum that is not finite: the vector holding NaN/Inf in `key`, else an overflow."""
    with Reading(headers) as reading:
        for f in reading.files:
            if not np.isfinite(f.read(key, verify=False)).all():
                return FileFormatError(f"{f.header.path}: tensor {key} holds NaN or Inf")
    return TaskvecError(f"the merged {key} overflows float32")


# --- diagnostics: one streaming pass against the coordinate-wise median ----------------------------------

@dataclass
class Diagnosis:
    """One vector against the others: L2 norm, cosine to the coordinate-wise median of all vectors, share of
    coordinates whose sign agrees with the median's (where it is non-zero), and why it is flagged (or None)."""

    file: str
    contributor: str
    sha256: str
    norm: float
    cosine: float
    sign_agreement: float
    flag: str | None = None


SCALED = 10.0  # flagged: norm above this many times the median norm
UNRELATED = 0.25  # flagged: cosine to the median below this fraction of the median cosine


def diagnose(headers: Sequence[Header], track: Track[Any] = no_track) -> list[Diagnosis]:
    """Per-vector diagnostics over the delta tensors, and a one-line reason for each outlier (from 3 vectors on).

    Flags: a norm over 10× the median norm (a scaled vector), a negative cosine to the median direction (a
    sign-flipped vector), a cosine under a quarter of the median cosine (noise, or another task's vector)."""
    n = len(headers)
    dot, sq, agree = np.zeros(n), np.zeros(n), np.zeros(n)
    med_sq, nonzero = 0.0, 0
    with Reading(headers) as reading:
        keys = sorted(set().union(*(h.tensors for h in headers)))
        for k in track(keys, "diagnosing", len(keys)):
            if is_statistic(k):
                for f in reading.files:
                    if k in f.header.tensors:
                        f.read(k)  # hashed, not diagnosed
                continue
            for _, _, x in reading.chunks(k, headers[0].tensors[k].numel):
                x64 = x.astype(np.float64)
                med = np.median(x64, axis=0)
                dot += x64 @ med
                sq += np.einsum("ij,ij->i", x64, x64)
                med_sq += float(med @ med)
                live = med != 0
                nonzero += int(live.sum())
                agree += (np.sign(x64[:, live]) == np.sign(med[live])).sum(1)
        reading.verify()
    norms = np.sqrt(sq)
    cos = dot / np.maximum(norms * math.sqrt(med_sq), 1e-30)
    out = [Diagnosis(str(h.path), str(h.meta.get("contributor")), h.meta["sha256"], float(norms[i]), float(cos[i]),
                     float(agree[i] / max(nonzero, 1))) for i, h in enumerate(headers)]
    if n >= 3:
        med_norm, med_cos = float(np.median(norms)), float(np.median(cos))
        for d in out:
            if d.norm > SCALED * med_norm:
                d.flag = f"norm {d.norm:.3g} is {d.norm / med_norm:.1f}× the median norm (a scaled vector?)"
            elif d.cosine < 0:
                d.flag = (f"points against the median direction (cosine {d.cosine:.2f}, signs agree on "
                          f"{d.sign_agreement:.0%}): a sign-flipped vector?")
            elif d.cosine < UNRELATED * med_cos:
                d.flag = (f"cosine to the median direction {d.cosine:.3f}, under a quarter of the median cosine "
                          f"{med_cos:.3f} (noise, or another task?)")
    return out


# --- writing ------------------------------------------------------------------------------------------

@dataclass
class MergeReport:
    """What a merge wrote: the file, its identity, λ, and the record it carries (plan, inputs, extras)."""

    path: Path
    identity: str
    method: str
    scale: float
    record: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    @property
    def vectors(self) -> list[dict[str, Any]]:
        return list(self.record["vectors"])


def vector_summaries(plan: MergePlan, base: Header, headers: Sequence[Header]) -> list[dict[str, Any]]:
    """What a merged model records of each input vector: identity, contributor, samples, privacy ledger, file,
    run, and the version it was fine-tuned from with its staleness d and weight s = (1 + d)^(−a)."""
    n = model_version(base.meta)
    _, scales = plan.weights(base, headers)
    return [{"sha256": h.meta["sha256"], "contributor": h.meta["contributor"], "samples": h.meta.get("samples"),
             "privacy": h.meta.get("privacy", []), "file": h.path.name,
             "run_id": (h.meta.get("source") or {}).get("run_id"), "base_version": k, "staleness": n - k,
             "staleness_weight": float(s)} for h, k, s in zip(headers, base_versions(headers), scales)]


def merged_arrays(bh: Header, comb: Combined, scale: float) -> Iterator[tuple[str, str, tuple[int, ...], Array]]:
    """(key, dtype, shape, bytes as an array) of `base + λ·combined`, statistics' values, base values otherwise;
    in base dtypes, key by key in sorted order (the deltas are used up)."""
    with open(bh.path, "rb", buffering=0) as fb:
        for k in sorted(bh.tensors):
            t = bh.tensors[k]
            fb.seek(bh.data_start + t.start)
            raw = bytearray(t.end - t.start)
            if fb.readinto(raw) != len(raw):
                raise FileFormatError(f"{bh.path}: truncated while reading {k}")
            if k in comb.deltas:
                d = comb.deltas.pop(k)
                d *= np.float32(scale)
                d += as_float32(raw, t.dtype)
                yield k, t.dtype, t.shape, from_float32(d, t.dtype)
            elif k in comb.stats:
                yield k, t.dtype, t.shape, from_float32(comb.stats[k], t.dtype)
            else:
                yield k, t.dtype, t.shape, np.frombuffer(raw, np.uint8)


def save_merged(bh: Header, comb: Combined, headers: Sequence[Header], out: str | os.PathLike[str], *,
                plan: MergePlan, scale: float | None = None, force: bool = False,
                extra: dict[str, Any] | None = None) -> MergeReport:
    """Write `base + scale·combined` (scale: the plan's λ unless calibrated) as a taskvec model file recording
    the plan, every input vector and `extra`."""
    from taskvec import __version__

    scale = plan.scale if scale is None else scale
    record = {**plan.record(bh, headers), "scale": scale, "vectors": vector_summaries(plan, bh, headers),
              **(extra or {})}
    arrays: dict[str, tuple[str, tuple[int, ...], Array]] = {}
    digest = Digest()
    for k, dtype, shape, a in merged_arrays(bh, comb, scale):
        arrays[k] = (dtype, shape, a)
        digest.update(k, dtype, shape, np.ascontiguousarray(a).data.cast("B"))
    identity = digest.hexdigest()
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "model", "identity": identity,
            "model": bh.meta["model"], "created": now(), "taskvec_version": __version__,
            "parent": bh.meta["identity"], "version": model_version(bh.meta) + 1, "lineage": child_lineage(bh.meta),
            "merge": record}
    save_arrays(arrays, out, meta, force=force)
    warnings = []
    if any(not v["privacy"] for v in record["vectors"]):
        warnings.append("some inputs carry no DP guarantee (see `taskvec inspect`)")
    return MergeReport(Path(out), identity, plan.method, scale, record, warnings)


def merge_vectors(
    vectors: Sequence[str | os.PathLike[str]],
    base: str | os.PathLike[str],
    out: str | os.PathLike[str],
    plan: MergePlan | None = None,
    *,
    force: bool = False,
    track: Track[Any] = no_track,
    diagnostics: bool = False,
    calibrate: Any = None,
    select: Any = None,
    contributions: Any = None,
    **options: Any,
) -> MergeReport:
    """Merge data vectors into `base + λ·combine(vectors)` and save it as a taskvec model file.

    `plan` (else `MergePlan.create(vectors, base, **options)`: method, params, density, scale, seed, budget,
    exclude_outliers) says how. `diagnostics` (implied by the plan's `exclude_outliers`) records
    `diagnose`. The three hooks take a `taskvec.merging.calibrate.Calibrator` on the merger's validation data:
    `select` chooses the method and λ, `calibrate` chooses λ, `contributions` records each vector's
    leave-one-out value. Nothing is written when anything fails.
    """
    check_output(out, force, inputs=[base, *vectors])
    plan = plan or MergePlan.create(vectors, base, **options)
    bh, headers = plan.open()
    extra: dict[str, Any] = {}
    if diagnostics or plan.exclude_outliers:
        found = diagnose(headers, track)
        extra["diagnostics"] = [vars(d) for d in found]
        if plan.exclude_outliers:
            flagged = {d.sha256 for d in found if d.flag}
            extra["excluded"] = [{"sha256": d.sha256, "contributor": d.contributor, "reason": d.flag}
                                 for d in found if d.flag]
            headers = [h for h in headers if h.meta["sha256"] not in flagged]
            plan.check_inputs(bh, headers)
    scale = None
    if select is not None:
        plan, comb, scale, extra["selection"] = select.select(plan, bh, headers)
    else:
        comb = accumulate(plan, bh, headers, track).combined(plan.recipe)
        if calibrate is not None:
            scale, extra["calibration"] = calibrate(bh, comb)
    if contributions is not None:
        extra["contributions"] = contributions.contributions(plan, bh, headers, plan.scale if scale is None else scale)
    return save_merged(bh, comb, headers, out, plan=plan, scale=scale, force=force, extra=extra)
