"""Typed taskvec headers: the JSON a model or vector file carries under its `taskvec` key, as dataclasses.

Each class reads its JSON once with `from_json`, which validates every field the code relies on and raises a
`FileFormatError` naming the first bad one, and writes it back with `to_json`. Everything else reads attributes.
Keys a class does not know are kept in `extra` and written back, so a file from a newer taskvec of the same
format version keeps what it says. Versions and lineage follow ASYNC_SCHEMA.md: the original base is version
0 (a model without `version`); a model merged onto version N is N+1, records `parent` (vN's identity) and
`lineage` (v0..vN, each merged ancestor with the summaries of the vectors it merged); a vector records its
base's `version` K and `lineage`, the identities of v0..vK-1.

A ledger entry's common fields are checked here (`LedgerEntry`); its mechanism checks the rest and recomputes its
ε (`taskvec.privacy.entries.validate_ledger`, `verify_ledger`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from taskvec.errors import FileFormatError, PrivacyError, TaskvecError

FORMAT = "taskvec"
FORMAT_VERSION = 1

Json = dict[str, Any]
T = TypeVar("T")


def is_sha(x: Any) -> bool:
    """A 64-character lowercase hex digest."""
    return isinstance(x, str) and len(x) == 64 and all(c in "0123456789abcdef" for c in x)


MAX_COUNT = 2**53  # the largest count a float holds exactly: a file claiming more is refused


def is_count(x: Any) -> bool:
    """A whole number in [0, 2**53] (not a bool)."""
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_COUNT


_CONTRIBUTOR = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
CONTRIBUTOR_ID = "letters, digits, '.', '_' or '-' (at most 64, starting with a letter or digit)"


def _is_contributor(x: Any) -> bool:
    return isinstance(x, str) and _CONTRIBUTOR.fullmatch(x) is not None


def check_contributor(name: Any, error: type[TaskvecError] = TaskvecError) -> str:
    """A contributor id that can name a registry folder: `CONTRIBUTOR_ID` (so never `.`, `..`, a path or a
    control character); else `error`."""
    if not _is_contributor(name):
        raise error(f"contributor id {str(name)[:80]!r} cannot name a registry folder; use {CONTRIBUTOR_ID}",
                    field="contributor", got=name)
    return name


def _strings(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(v, str) for v in x)


def _optional(check: Any) -> Any:
    return lambda x: x is None or check(x)


def _take(d: Mapping[str, Any], name: str, check: Any, what: str, prefix: str = "", *, default: Any = ...) -> Any:
    """`d[name]` if it passes `check`, `default` when absent (if given), else a FileFormatError naming the field
    (`prefix` + `name`)."""
    if name not in d:
        if default is not ...:
            return default
        raise FileFormatError(f"{prefix}{name} is missing", field=prefix + name)
    value = d[name]
    if not check(value):
        raise FileFormatError(f"{prefix}{name} must be {what}, got {str(value)[:80]!r}", field=prefix + name)
    return value


def _within(fld: str, what: str, read: Any, *args: Any) -> Any:
    """`read(*args)`, its error restated as one about `fld` (`merge.vectors entry 2: sha256 is missing`)."""
    try:
        return read(*args)
    except FileFormatError as e:
        raise FileFormatError(f"{fld} {what}: {e.message}", field=fld) from None


def _extra(d: Mapping[str, Any], cls: type) -> Json:
    known = {f.name for f in dataclasses.fields(cls)} | {"format", "format_version", "kind"}
    return {k: v for k, v in d.items() if k not in known}


def _object(d: Any, fld: str) -> Mapping[str, Any]:
    if not isinstance(d, Mapping):
        raise FileFormatError(f"{fld} is not an object", field=fld)
    return d


def _dump(obj: Any, *, always: tuple[str, ...] = ()) -> Json:
    """The JSON of a header object: its fields (nested objects dumped, None left out unless named in `always`)
    and its `extra` keys."""
    out: Json = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name == "extra" or (value is None and f.name not in always):
            continue
        if dataclasses.is_dataclass(value):
            value = value.to_json()  # type: ignore[union-attr]
        elif isinstance(value, tuple):
            value = [v.to_json() if dataclasses.is_dataclass(v) else v for v in value]  # type: ignore[union-attr]
        out[f.name] = value
    return {**obj.extra, **out}


def _is_list(x: Any) -> bool:
    return isinstance(x, list)


def _is_object(x: Any) -> bool:
    return isinstance(x, dict)


def _is_str(x: Any) -> bool:
    return isinstance(x, str)


def _is_true(x: Any) -> bool:
    return x is True


def _is_bool(x: Any) -> bool:
    return isinstance(x, bool)


def _is_finite(x: Any) -> bool:
    return is_number(x) and math.isfinite(x)


def _finite_values(x: Any) -> bool:
    return isinstance(x, dict) and all(map(_is_finite, x.values()))


def _factors(x: Any) -> bool:
    """{tensor name: {"rank": R ≥ 1, ...}}, as a factored vector records its low-rank tensors."""
    return isinstance(x, dict) and all(isinstance(f, dict) and is_count(f.get("rank")) and f["rank"] >= 1
                                       for f in x.values())


def _ledger(d: Mapping[str, Any], name: str, default: Any) -> Any:
    """`d[name]` if it is a privacy ledger whose entries' common fields are valid (`LedgerEntry`), else a
    FileFormatError naming the entry and field."""
    ledger = _take(d, name, _optional(_is_list) if default is None else _is_list, "a list", default=default)
    for i, e in enumerate(ledger or ()):
        try:
            LedgerEntry.from_json(e)
        except PrivacyError as err:
            raise FileFormatError(f"{name} entry {i}: {err.message}", field=name) from None
    return ledger


def _run_source(x: Any) -> bool:
    """A `source` object whose `run_id`, if any, is a name."""
    return isinstance(x, dict) and isinstance(x.get("run_id", ""), (str, type(None)))


@dataclass(frozen=True)
class VectorSummary:
    """What a merged model records of one vector it merged."""

    sha256: str
    contributor: str
    privacy: list[Json]
    samples: int | None = None
    file: str | None = None
    run_id: str | None = None
    base_version: int | None = None
    staleness: int | None = None
    staleness_weight: float | None = None
    statistics: bool | None = None  # True: sufficient statistics, whose head the merge solved (not added)
    extra: Json = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: Any) -> VectorSummary:
        d = _object(d, "summary")
        return cls(
            sha256=_take(d, "sha256", is_sha, "64 hex digits"),
            contributor=_take(d, "contributor", _is_contributor, f"a contributor id: {CONTRIBUTOR_ID}"),
            privacy=_ledger(d, "privacy", []),
            samples=_take(d, "samples", _optional(is_count), "a count", default=None),
            file=_take(d, "file", _optional(_is_str), "a file name", default=None),
            run_id=_take(d, "run_id", _optional(_is_str), "a run id", default=None),
            base_version=_take(d, "base_version", _optional(is_count), "a version", default=None),
            staleness=_take(d, "staleness", _optional(is_count), "a count", default=None),
            staleness_weight=_take(d, "staleness_weight", _optional(_is_finite), "a number", default=None),
            statistics=_take(d, "statistics", _optional(_is_true), "true", default=None),
            extra=_extra(d, cls),
        )

    def to_json(self) -> Json:
        return _dump(self, always=("samples", "run_id"))


def _summaries(raw: Any, fld: str) -> tuple[VectorSummary, ...]:
    if not isinstance(raw, list):
        raise FileFormatError(f"{fld} is not a list", field=fld)
    return tuple(_within(fld, f"entry {i}", VectorSummary.from_json, v) for i, v in enumerate(raw))


@dataclass(frozen=True)
class MergeRecord:
    """How a merged model was made: the method and its parameters, λ, and every vector it merged."""

    method: str
    vectors: tuple[VectorSummary, ...]
    scale: float | None = None
    params: Json = field(default_factory=dict)
    privacy_budget: Json | None = None
    extra: Json = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: Any) -> MergeRecord:
        d = _object(d, "merge")
        return cls(
            method=_take(d, "method", _is_str, "a method name", "merge.", default="?"),
            vectors=_summaries(d.get("vectors", []), "merge.vectors"),
            scale=_take(d, "scale", _optional(_is_finite), "a number", "merge.", default=None),
            params=_take(d, "params", _is_object, "an object", "merge.", default={}),
            privacy_budget=_take(d, "privacy_budget", _optional(_is_object), "an object", "merge.", default=None),
            extra=_extra(d, cls),
        )

    def to_json(self) -> Json:
        return _dump(self, always=("scale",))


@dataclass(frozen=True)
class LineageEntry:
    """One ancestor of a merged model: its version, identity, and (unless it is the root) what it merged."""

    version: int
    identity: str
    vectors: tuple[VectorSummary, ...] | None = None
    extra: Json = field(default_factory=dict)

    def to_json(self) -> Json:
        return _dump(self)


def _lineage(d: Mapping[str, Any], version: int | None) -> tuple[LineageEntry, ...] | None:
    raw = d.get("lineage")
    if version is None:
        if raw:
            raise FileFormatError("lineage is given without a version", field="lineage")
        return None if raw is None else ()
    if not isinstance(raw, list) or len(raw) != version:
        raise FileFormatError(f"lineage must list the {version} ancestors v0..v{version - 1} of version {version}",
                              field="lineage")
    out = []
    for i, e in enumerate(raw):
        problem = (f"is not version {i}" if not isinstance(e, dict) or e.get("version") != i else
                   "has no valid identity" if not is_sha(e.get("identity")) else
                   "is the root v0, which merged no vectors, yet lists some" if i == 0 and "vectors" in e else
                   "lists no vectors" if i and "vectors" not in e else None)
        if problem:
            raise FileFormatError(f"lineage entry {i} {problem}", field="lineage")
        vectors = _within("lineage", f"entry {i} (v{i})", _summaries, e["vectors"], "vectors") if i else None
        out.append(LineageEntry(i, e["identity"], vectors, _extra(e, LineageEntry)))
    return tuple(out)


def _model_spec(x: Any) -> bool:
    return isinstance(x, dict) and (x.get("labels") is None or _strings(x["labels"]))


@dataclass(frozen=True)
class ModelHeader:
    """A model file: a base, a fine-tuned model or a merged one (with `version`, `parent`, `lineage`, `merge`)."""

    identity: str
    model: Json  # the ModelSpec (`taskvec.models.spec.ModelSpec.from_dict`)
    created: str | None = None
    taskvec_version: str | None = None
    source: Json | None = None
    parent: str | None = None
    run_id: str | None = None
    training: Json | None = None
    privacy: list[Json] | None = None
    version: int | None = None
    lineage: tuple[LineageEntry, ...] | None = None
    merge: MergeRecord | None = None
    format_version: int = FORMAT_VERSION
    extra: Json = field(default_factory=dict)

    kind = "model"

    @property
    def arch(self) -> str:
        return str(self.model.get("arch"))

    @property
    def task(self) -> str:
        return str(self.model.get("task"))

    @property
    def labels(self) -> list[str] | None:
        return self.model.get("labels")

    @property
    def number(self) -> int:
        """Its version: 0 unless it records one."""
        return self.version or 0

    @property
    def ledger(self) -> list[Json]:
        return list(self.privacy or [])

    def versions(self) -> list[str]:
        """Identities of its versions v0..vN, itself last."""
        return [e.identity for e in self.lineage or ()] + [self.identity]

    def child_lineage(self) -> tuple[LineageEntry, ...]:
        """The lineage of a model merged onto this one: its lineage, then itself (with what it merged unless it
        is the root)."""
        merged = self.merge.vectors if self.number and self.merge else None
        return (*(self.lineage or ()), LineageEntry(self.number, self.identity, merged))

    def merged_summaries(self) -> list[tuple[int, VectorSummary]]:
        """(version it went into, summary) of every vector already in this model, each sha256 once."""
        found = [(e.version, v) for e in self.lineage or () for v in e.vectors or ()]
        found += [(self.number, v) for v in (self.merge.vectors if self.merge else ())]
        first: dict[str, tuple[int, VectorSummary]] = {}
        for k, v in found:
            first.setdefault(v.sha256, (k, v))
        return list(first.values())

    def merged_vectors(self) -> dict[str, int]:
        """sha256 → the version each vector already in this model went into."""
        return {v.sha256: k for k, v in self.merged_summaries()}

    @classmethod
    def from_json(cls, d: Any) -> ModelHeader:
        d = _object(d, "metadata")
        merge = MergeRecord.from_json(d["merge"]) if d.get("merge") is not None else None
        version = _take(d, "version", is_count, "a whole number >= 0", default=None)
        h = cls(
            identity=_take(d, "identity", is_sha, "64 hex digits"),
            model=_take(d, "model", _model_spec, "an object whose labels are names"),
            created=_take(d, "created", _optional(_is_str), "a time", default=None),
            taskvec_version=_take(d, "taskvec_version", _optional(_is_str), "a version", default=None),
            source=_take(d, "source", _optional(_run_source), "an object", default=None),
            parent=_take(d, "parent", _optional(is_sha), "64 hex digits", default=None),
            run_id=_take(d, "run_id", _optional(_is_str), "a run id", default=None),
            training=_take(d, "training", _optional(_is_object), "an object", default=None),
            privacy=_ledger(d, "privacy", None),
            version=version,
            lineage=_lineage(d, version),
            merge=merge,
            format_version=d.get("format_version", FORMAT_VERSION),
            extra=_extra(d, cls),
        )
        if h.number and h.parent != h.versions()[-2]:
            raise FileFormatError(f"parent must be the last lineage identity (v{h.number - 1} "
                                  f"{h.versions()[-2][:12]}), got {str(h.parent)[:12]}", field="parent")
        if h.number and merge is None:
            raise FileFormatError(f"merge is missing: version {h.number} records no merge", field="merge")
        return h

    def to_json(self) -> Json:
        return {"format": FORMAT, "kind": self.kind, **_dump(self)}


@dataclass(frozen=True)
class BaseRef:
    """The base a vector was fine-tuned from: its identity and architecture, and its position (version K and
    the identities of v0..vK-1)."""

    identity: str
    arch: str | None = None
    version: int | None = None
    lineage: list[str] | None = None
    extra: Json = field(default_factory=dict)

    @property
    def number(self) -> int:
        return self.version or 0

    @classmethod
    def from_json(cls, d: Any) -> BaseRef:
        d = _object(d, "base")
        version = _take(d, "version", is_count, "a whole number >= 0", "base.", default=None)
        lineage = d.get("lineage")
        if version is None and lineage:
            raise FileFormatError("base.lineage is given without base.version", field="base.lineage")
        if version is not None and not (isinstance(lineage, list) and len(lineage) == version
                                        and all(map(is_sha, lineage))):
            raise FileFormatError(f"base.lineage must list the identities of the {version} versions before its "
                                  f"base v{version}", field="base.lineage")
        return cls(_take(d, "identity", is_sha, "64 hex digits", "base."), d.get("arch"), version, lineage,
                   _extra(d, cls))

    def to_json(self) -> Json:
        return _dump(self)


@dataclass(frozen=True)
class VectorHeader:
    """A data vector: fine-tuned minus base weights (or what its mode carries), with provenance and ledger."""

    sha256: str
    base: BaseRef
    contributor: str
    task: str | None = None
    labels: list[str] | None = None
    samples: int | None = None
    created: str | None = None
    dtype: str | None = None
    statistics: list[str] = field(default_factory=list)
    train: str | None = None
    subset: bool | None = None
    factors: Json | None = None
    source: Json | None = None
    clip: float | None = None
    noise_multiplier: float | None = None
    privacy: list[Json] = field(default_factory=list)
    declared_public: list[str] | None = None
    norm: Json | None = None
    sufficient: Json | None = None  # a statistics vector: which features its statistics describe
    format_version: int = FORMAT_VERSION
    extra: Json = field(default_factory=dict)

    kind = "vector"

    @property
    def ledger(self) -> list[Json]:
        return list(self.privacy)

    @property
    def run_id(self) -> str | None:
        return (self.source or {}).get("run_id")

    @classmethod
    def from_json(cls, d: Any) -> VectorHeader:
        d = _object(d, "metadata")
        return cls(
            sha256=_take(d, "sha256", is_sha, "64 hex digits"),
            base=BaseRef.from_json(_take(d, "base", _is_object, "an object")),
            contributor=_take(d, "contributor", _is_contributor, f"a contributor id: {CONTRIBUTOR_ID}"),
            task=_take(d, "task", _optional(_is_str), "a task name", default=None),
            labels=_take(d, "labels", _optional(_strings), "a list of names", default=None),
            samples=_take(d, "samples", _optional(is_count), "a whole number >= 0 or null", default=None),
            created=_take(d, "created", _optional(_is_str), "a time", default=None),
            dtype=_take(d, "dtype", _optional(_is_str), "a dtype name", default=None),
            statistics=_take(d, "statistics", _strings, "a list of tensor names", default=[]),
            train=_take(d, "train", _optional(_is_str), "a mode name", default=None),
            subset=_take(d, "subset", _optional(_is_bool), "true or false", default=None),
            factors=_take(d, "factors", _optional(_factors), "{tensor: {rank: R >= 1}}", default=None),
            source=_take(d, "source", _optional(_run_source), "an object", default=None),
            clip=_take(d, "clip", _optional(_is_finite), "a number", default=None),
            noise_multiplier=_take(d, "noise_multiplier", _optional(_is_finite), "a number", default=None),
            privacy=_ledger(d, "privacy", []),
            declared_public=_take(d, "declared_public", _optional(_strings), "a list of tensor names", default=None),
            norm=_take(d, "norm", _optional(_finite_values), "an object of numbers", default=None),
            sufficient=_take(d, "sufficient", _optional(_is_object), "an object", default=None),
            format_version=d.get("format_version", FORMAT_VERSION),
            extra=_extra(d, cls),
        )

    def to_json(self) -> Json:
        return {"format": FORMAT, "kind": self.kind,
                **_dump(self, always=("samples", "clip", "noise_multiplier", "labels"))}


def parse_header(meta: Mapping[str, Any], kind: str, path: Any) -> ModelHeader | VectorHeader:
    """The typed header of a file's taskvec metadata of `kind` (`model` or `vector`), or a FileFormatError
    `PATH: taskvec KIND metadata: FIELD ...` naming the first missing or invalid field."""
    read = ModelHeader.from_json if kind == "model" else VectorHeader.from_json
    try:
        return read(meta)
    except FileFormatError as e:
        raise FileFormatError(f"{path}: taskvec {kind} metadata: {e.message}", path=path, field=e.field) from None


UNITS = ("image", "patient", "site")
RELATIONS = ("add-remove", "replace-one")
LEDGER_FIELDS = (
    "mechanism", "unit", "relation", "epsilon", "delta", "accountant", "noise_multiplier", "sample_rate", "steps",
    "run_id",
)


MAX_STEPS = 10**9  # more steps than any run takes: a ledger claiming more is refused


def is_number(x: Any) -> bool:
    """A JSON number a float can hold (not a bool; no integer beyond float's range)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    return isinstance(x, float) or abs(x) <= sys.float_info.max


def is_positive(x: Any) -> bool:
    return is_number(x) and 0 < x < math.inf


@dataclass(frozen=True)
class LedgerEntry:
    """One guarantee of a privacy ledger: its mechanism, unit of privacy, neighbouring relation, (ε, δ) and the
    accountant and parameters ε is recomputed from. `params` holds the mechanism's own parameters
    (`max_grad_norm`, `clip`, ...), which its module checks (`taskvec.privacy.mechanisms`). Training entries name
    the model they released (`model`) and whether their noise came from a given seed (`seeded`); entries written
    before those fields read as None."""

    mechanism: str
    unit: str
    relation: str
    epsilon: float
    delta: float
    accountant: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    run_id: str | None
    model: str | None = None
    seeded: bool | None = None
    params: Json = field(default_factory=dict)

    @property
    def clip(self) -> float:
        """The clipping bound its sensitivity is a multiple of (`max_grad_norm` or `clip`)."""
        return float(self.params["max_grad_norm"] if "max_grad_norm" in self.params else self.params["clip"])

    @classmethod
    def from_json(cls, d: Any) -> LedgerEntry:
        """The entry, its common fields checked (a PrivacyError naming the first bad one): noise and a clipping
        bound are required, since without them there is no DP."""
        if not isinstance(d, Mapping):
            raise PrivacyError("is not an object", field="privacy")
        missing = [f for f in LEDGER_FIELDS if f not in d]
        if missing:
            raise PrivacyError(f"lacks {', '.join(missing)}", field=missing[0])
        for fld, known in (("unit", UNITS), ("relation", RELATIONS)):
            if d[fld] not in known:
                raise PrivacyError(f"unknown {fld} {d[fld]!r} (known: {', '.join(known)})", field=fld)
        problem = _entry_problem(d)
        if problem:
            raise PrivacyError(problem[1], field=problem[0])
        names = {f.name for f in dataclasses.fields(cls)} - {"params"}
        return cls(**{k: v for k, v in d.items() if k in names}, params={k: v for k, v in d.items() if k not in names})

    def to_json(self) -> Json:
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "params"}
        return {**self.params, **{k: v for k, v in own.items() if v is not None or k == "run_id"}}


def _entry_problem(e: Mapping[str, Any]) -> tuple[str, str] | None:
    """(field, what is wrong) with an entry's common fields, or None."""
    if not isinstance(e["mechanism"], str):
        return "mechanism", f"mechanism must be a name, got {e['mechanism']!r}"
    if "model" in e and not is_sha(e["model"]):
        return "model", f"model must be the released model's identity (64 hex digits), got {e['model']!r}"
    if not isinstance(e.get("seeded", False), bool):
        return "seeded", f"seeded must be true or false, got {e['seeded']!r}"
    if not is_positive(e["noise_multiplier"]):
        return "noise_multiplier", f"noise multiplier {e['noise_multiplier']!r}; without noise there is no DP"
    if not is_positive(e.get("max_grad_norm", e.get("clip"))):
        return "clip", "no clipping bound (max_grad_norm or clip); noise without it gives no DP"
    if not (is_number(e["epsilon"]) and 0 <= e["epsilon"] < math.inf):
        return "epsilon", f"epsilon must be a finite number >= 0, got {e['epsilon']!r}"
    if not (is_number(e["delta"]) and 0 < e["delta"] < 1):
        return "delta", f"delta must be in (0, 1), got {e['delta']!r}"
    if not (is_number(e["sample_rate"]) and 0 < e["sample_rate"] <= 1):
        return "sample_rate", f"sample_rate must be in (0, 1], got {e['sample_rate']!r}"
    if not (isinstance(e["steps"], int) and not isinstance(e["steps"], bool) and 1 <= e["steps"] <= MAX_STEPS):
        return "steps", f"steps must be an integer in [1, {MAX_STEPS:.0e}], got {e['steps']!r}"
    if not isinstance(e["accountant"], str):
        return "accountant", f"accountant must be a name, got {e['accountant']!r}"
    return None
