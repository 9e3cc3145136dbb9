"""The metadata document of an ELSA file: its schema (:class:`ELSAMeta`, :class:`LevelInfo`,
:class:`TensorInfo`), its JSON form (written canonically, read strictly) and its checks.

The document is stored as JSON in the safetensors header's ``__metadata__`` (docs/FORMAT.md).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import torch

from ..errors import ELSAFormatError
from .structure import parse_structure

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "BN_PREFIX", "BN_STATS", "LevelInfo", "TensorInfo", "ELSAMeta"]


FORMAT_NAME = "elsa-codec"


FORMAT_VERSION = 3  # the newest version this library reads; a file is written in the oldest version that holds it


#: Name prefix of the per-level batch-norm statistics tensors in a file:
#: ``__elsa_bn__.{level}.{module}.{stat}`` (stripped by the loader, see docs/FORMAT.md).
BN_PREFIX = "__elsa_bn__."


#: Batch-norm buffers stored per level.
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class LevelInfo:
    """One level: ``level`` (1..T), its mask ``structure`` and measured ``sparsity`` (fraction of
    zeros it forces in the encoded tensors, in [0, 1])."""

    level: int
    structure: str
    sparsity: float

    @property
    def density(self) -> float:
        return 1.0 - self.sparsity


@dataclass
class TensorInfo:
    """Per-tensor record: ``sparsity`` per level 1..T (list), encoding error (``max_ulp``: the
    largest error in ulp of the original value; ``sqnr_db``: SQNR of the dense level vs the
    original, dB; ``inf`` when unchanged; None when unknown, e.g. counters from a file);
    ``transposed``: the tensor is stored `[in, out]` (transformers ``Conv1D``), so N:M groups and
    block tiles lie along its dim 0 (written to the document only when true)."""

    shape: list
    dtype: str
    sparsity: list
    max_ulp: float | None = None
    sqnr_db: float | None = None
    transposed: bool = False


@dataclass
class ELSAMeta:
    """The metadata document of an ELSA checkpoint (docs/FORMAT.md, versions 1 and 2).

    ``num_levels`` is T (sparse levels; level T+1 is dense), ``code_bits`` is k, ``levels`` the
    T :class:`LevelInfo`, ``tensors`` maps each encoded tensor name to its :class:`TensorInfo`,
    ``bn_modules`` the batch-norm modules with per-level statistics, ``tied`` maps each tensor
    stored under another name (a tied weight, written once) to that name (version 2; empty in
    version 1 files).
    """

    num_levels: int
    code_bits: int
    levels: list
    tensors: dict
    bn_modules: list = field(default_factory=list)
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION
    tied: dict = field(default_factory=dict)
    training: dict | None = None  # the ELSAConfig of the run that made the file (optional)
    quality: dict | None = None  # what each level keeps, measured at conversion (version 3; docs/FORMAT.md)

    @property
    def written_version(self) -> int:
        """The version :meth:`to_json` writes: 3 with a quality report, 2 with tied tensors, else 1
        (an older reader refuses what it cannot read instead of ignoring it)."""
        return 3 if self.quality is not None else 2 if self.tied else 1

    def level_quality(self, level: int) -> dict | None:
        """The quality record of ``level`` (``1..T+1``) from the report, or None (no report)."""
        if self.quality is None:
            return None
        return next((r for r in self.quality["levels"] if r["level"] == level), None)

    @property
    def encoded(self) -> list:
        """Names of the encoded tensors."""
        return list(self.tensors)

    def sparsities(self) -> list:
        """Measured sparsity of levels 1..T."""
        return [lv.sparsity for lv in self.levels]

    def to_json(self) -> str:
        d = {
            "format": self.format,
            "version": self.written_version,  # version 1 readers know no tied tensors, 2 no quality
            "num_levels": self.num_levels,
            "code_bits": self.code_bits,
            "levels": [asdict(lv) for lv in self.levels],
            "encoded": self.encoded,
            "tensors": {k: _tensor_json(v) for k, v in self.tensors.items()},
            "bn_modules": list(self.bn_modules),
            "bn_prefix": BN_PREFIX,
        }
        if self.tied:
            d["tied"] = dict(self.tied)
        if self.training is not None:
            d["training"] = self.training
        if self.quality is not None:
            d["quality"] = self.quality
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, *, source: str = "metadata") -> "ELSAMeta":
        """Parse and validate a metadata document (docs/FORMAT.md, "Readers must refuse").

        Checked here, from the document alone: valid JSON without a duplicated key, the known keys
        with the right types, ``T`` against the levels list, ``k`` against ``T`` and each
        tensor's dtype (``MAX_CODE_BITS``), each structure (canonical), sparsities in [0, 1] and
        non-increasing over the levels, each level's sparsity against its tensors' records,
        ``encoded`` against ``tensors`` (no duplicate), the tied aliases. What the tensors must
        match (shapes, codes, measured sparsities, structures) :func:`elsa_codec.load_file` checks.

        Raises:
            ELSAFormatError: malformed JSON, wrong format name, a version from the future, or
                missing / mistyped / inconsistent fields. The message names ``source``.
        """
        d = _document(text, source)
        try:
            f = _document_fields(d)
        except (KeyError, TypeError, ValueError) as e:
            raise ELSAFormatError(f"{source}: malformed ELSA metadata ({type(e).__name__}: {e})") from None
        enc, tensors = f.pop("encoded"), f.pop("tensors")
        if len(set(enc)) != len(enc):
            dup = next(n for n in enc if enc.count(n) > 1)
            raise ELSAFormatError(f"{source}: 'encoded' lists {dup!r} twice")
        if sorted(enc) != sorted(tensors):
            raise ELSAFormatError(f"{source}: 'encoded' and 'tensors' list different tensors")
        meta = cls(tensors={n: tensors[n] for n in enc}, version=d["version"], **f)  # the file's tensor order
        _check_levels(meta, source)
        _check_records(meta, source)
        _check_tied(meta, source)
        return meta


def _tensor_json(info: TensorInfo) -> dict:
    d = _finite_json(asdict(info))
    if not d.get("transposed"):
        d.pop("transposed", None)  # version-1 documents stay byte-identical
    return d


def _finite_json(d: dict) -> dict:
    # JSON has no Infinity: write "inf" / "-inf" as strings (-inf: an all-zero original tensor).
    return {k: (("inf" if v > 0 else "-inf") if isinstance(v, float) and math.isinf(v) else v) for k, v in d.items()}


#: The keys of the ``elsa`` document; a new key needs a new format version (a reader must not
#: silently ignore what it does not understand). ``training`` is informative (any version).
_DOC_KEYS = frozenset({"format", "version", "num_levels", "code_bits", "levels", "encoded", "tensors",
                       "bn_modules", "bn_prefix", "tied", "training", "quality"})


_LEVEL_KEYS = frozenset({"level", "structure", "sparsity"})


_RECORD_KEYS = frozenset({"shape", "dtype", "sparsity", "max_ulp", "sqnr_db", "transposed"})


_RECORD_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


#: Tolerance between a recorded sparsity and the one measured or recomputed from the records.
_SPARSITY_TOL = 1e-9


def _unique_keys(pairs: list) -> dict:
    """``object_pairs_hook`` for ``json.loads``: a repeated key is an error, not "the last wins"."""
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicated key {k!r}")
        d[k] = v
    return d


def _document(text, source: str) -> dict:
    """The JSON object of a metadata document, with its format name, a version this library
    reads, no unknown key, no ``tied`` in version 1, the standard ``bn_prefix``."""
    from .jsonio import loads

    try:
        d = loads(text)
    except (TypeError, ValueError) as e:
        raise ELSAFormatError(f"{source}: the ELSA metadata document is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ELSAFormatError(f"{source}: the ELSA metadata document is not a JSON object")
    if d.get("format") != FORMAT_NAME:
        raise ELSAFormatError(f"{source}: metadata format is {d.get('format')!r}, expected {FORMAT_NAME!r}")
    ver = d.get("version")
    if not isinstance(ver, int) or isinstance(ver, bool):
        raise ELSAFormatError(f"{source}: metadata has no integer 'version'")
    if ver > FORMAT_VERSION:
        raise ELSAFormatError(
            f"{source}: format version {ver} is newer than this library supports ({FORMAT_VERSION}); upgrade elsa-codec"
        )
    if ver < 1:
        raise ELSAFormatError(f"{source}: unknown format version {ver}")
    unknown = sorted(set(d) - _DOC_KEYS)
    if unknown:
        raise ELSAFormatError(f"{source}: unknown key {unknown[0]!r} in the ELSA metadata document (corrupted)")
    if ver == 1 and "tied" in d:
        raise ELSAFormatError(f"{source}: a version 1 document has 'tied' (tied tensors need version 2)")
    if ver < 3 and "quality" in d:
        raise ELSAFormatError(f"{source}: a version {ver} document has 'quality' (a quality report needs version 3)")
    if d.get("bn_prefix", BN_PREFIX) != BN_PREFIX:
        raise ELSAFormatError(f"{source}: bn_prefix is {d['bn_prefix']!r}, expected {BN_PREFIX!r}")
    return d


def _document_fields(d: dict) -> dict:
    """The typed fields of a document (``ELSAMeta`` arguments plus ``encoded``); KeyError,
    TypeError or ValueError naming the field that is missing or of the wrong type."""
    training = d.get("training")
    if training is not None and not isinstance(training, dict):
        raise TypeError("'training' is not an object")
    return {
        "num_levels": _json_int(d["num_levels"], "num_levels"),
        "code_bits": _json_int(d["code_bits"], "code_bits"),
        "levels": [_json_level(x) for x in _json_list(d["levels"], "levels")],
        "encoded": [_json_str(n, "an 'encoded' name") for n in _json_list(d["encoded"], "encoded")],
        "tensors": {n: _json_record(v, n) for n, v in _json_object(d["tensors"], "tensors").items()},
        "bn_modules": [_json_str(m, "a bn_modules name") for m in _json_list(d.get("bn_modules", []), "bn_modules")],
        "tied": {a: _json_str(b, f"tied[{a!r}]") for a, b in _json_object(d.get("tied", {}), "tied").items()},
        "training": training,
        "quality": _json_quality(d["quality"], _json_int(d["num_levels"], "num_levels")) if "quality" in d else None,
    }


#: The measures a quality record of a level may hold (each a number, or null when not measured).
QUALITY_MEASURES = ("cosine", "perplexity")


def _json_quality(v, T: int) -> dict:
    """The ``quality`` report: an object whose ``levels`` lists one record per level ``1..T+1``
    in order, ``{"level": t, "cosine": number in [-1, 1], "perplexity": number > 0 or null}``;
    its other keys (method, calibration, eval) are informative."""
    q = _json_object(v, "quality", required=("levels",))
    rows = _json_list(q["levels"], "quality.levels")
    if [r.get("level") if isinstance(r, dict) else None for r in rows] != list(range(1, T + 2)):
        raise ValueError(f"quality.levels must list levels 1..{T + 1} in order")
    for r in rows:
        _json_object(r, f"quality.levels[{r['level']}]", frozenset({"level", *QUALITY_MEASURES}), ("level", "cosine"))
        cos = _json_number(r["cosine"], f"quality.levels[{r['level']}].cosine")
        if not -1.0 - 1e-6 <= cos <= 1.0 + 1e-6:
            raise ValueError(f"quality.levels[{r['level']}].cosine is {cos}, outside [-1, 1]")
        ppl = r.get("perplexity")
        if ppl is not None and not _json_number(ppl, f"quality.levels[{r['level']}].perplexity") > 0:
            raise ValueError(f"quality.levels[{r['level']}].perplexity is {ppl}, expected > 0")
    return q


def _json_int(v, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{what} is {v!r}, expected an integer")
    return v


def _json_number(v, what: str) -> float:
    """A finite JSON number (not a boolean), as a float."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise TypeError(f"{what} is {v!r}, expected a finite number")
    return float(v)


def _json_sparsity(v, what: str) -> float:
    s = _json_number(v, what)
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"{what} is {s!r}, outside [0, 1]")
    return s


def _json_str(v, what: str) -> str:
    if not isinstance(v, str) or not v:
        raise TypeError(f"{what} is {v!r}, expected a non-empty string")
    return v


def _json_list(v, what: str) -> list:
    if not isinstance(v, list):
        raise TypeError(f"{what} is a {type(v).__name__}, expected a list")
    return v


def _json_object(v, what: str, keys: frozenset | None = None, required: tuple = ()) -> dict:
    """``v`` must be a JSON object with string keys, only ``keys`` (if given), all ``required``."""
    if not isinstance(v, dict):
        raise TypeError(f"{what} is a {type(v).__name__}, expected an object")
    extra = sorted(set(v) - keys) if keys is not None else []
    if extra:
        raise ValueError(f"{what} has an unknown key {extra[0]!r}")
    for k in required:
        if k not in v:
            raise KeyError(f"{what} has no {k!r}")
    return v


def _json_level(x) -> LevelInfo:
    x = _json_object(x, "a level", _LEVEL_KEYS, tuple(_LEVEL_KEYS))
    t = _json_int(x["level"], "a level's number")
    return LevelInfo(t, _json_structure(x["structure"], f"level {t}'s structure"), _json_sparsity(x["sparsity"], f"level {t}'s sparsity"))


def _json_structure(v, what: str) -> str:
    """A structure in the canonical spelling :func:`parse_structure` gives back (``"2:4"``)."""
    s = _json_str(v, what)
    canon = str(parse_structure(s))
    if canon != s:
        raise ValueError(f"{what} is {s!r}, not the canonical {canon!r}")
    return s


def _json_record(v, name: str) -> TensorInfo:
    v = _json_object(v, f"tensors[{name!r}]", _RECORD_KEYS, ("shape", "dtype", "sparsity"))
    shape = [_json_int(x, f"{name}'s shape") for x in _json_list(v["shape"], f"{name}'s shape")]
    if any(x < 0 for x in shape):
        raise ValueError(f"{name}'s shape {shape} has a negative size")
    dtype = _json_str(v["dtype"], f"{name}'s dtype")
    if dtype not in _RECORD_DTYPES:
        raise ValueError(f"{name}'s dtype is {dtype!r}, expected one of {sorted(_RECORD_DTYPES)}")
    transposed = v.get("transposed", False)
    if not isinstance(transposed, bool) or (transposed and len(shape) != 2):
        raise ValueError(f"{name}'s transposed is {transposed!r} for shape {shape} (only a 2-D weight can be transposed)")
    max_ulp = v.get("max_ulp")
    if max_ulp is not None and _json_number(max_ulp, f"{name}'s max_ulp") < 0:
        raise ValueError(f"{name}'s max_ulp is negative")
    sqnr = v.get("sqnr_db")
    return TensorInfo(
        shape=shape,
        dtype=dtype,
        sparsity=[_json_sparsity(s, f"{name}'s sparsity") for s in _json_list(v["sparsity"], f"{name}'s sparsity")],
        max_ulp=None if max_ulp is None else float(max_ulp),
        sqnr_db=None if sqnr is None else (math.inf if sqnr == "inf" else -math.inf if sqnr == "-inf" else _json_number(sqnr, f"{name}'s sqnr_db")),
        transposed=transposed,
    )


def _check_levels(meta: "ELSAMeta", source: str) -> None:
    """``T`` and ``k`` fit each other, the levels are ``1..T``, their sparsities non-increasing
    and each equal to what its tensors' records give (tied aliases counted once)."""
    T, k = meta.num_levels, meta.code_bits
    if T < 1 or not 1 <= k <= 8:
        raise ELSAFormatError(f"{source}: bad num_levels={T!r} or code_bits={k!r}")
    if T + 1 > (1 << k):
        raise ELSAFormatError(f"{source}: {T} levels do not fit in code_bits={k}")
    if [lv.level for lv in meta.levels] != list(range(1, T + 1)):
        raise ELSAFormatError(f"{source}: metadata lists levels {[lv.level for lv in meta.levels]}, expected 1..{T}")
    sps = meta.sparsities()
    if any(b > a for a, b in zip(sps, sps[1:])):
        raise ELSAFormatError(f"{source}: level sparsities {sps} increase (nested levels: level t+1 keeps what level t keeps)")
    if any(len(ti.sparsity) != T for ti in meta.tensors.values()):
        return  # _check_records names the tensor
    own = [ti for n, ti in meta.tensors.items() if n not in meta.tied]
    total = sum(math.prod(ti.shape) for ti in own) or 1
    for t, lv in enumerate(meta.levels, start=1):
        got = sum(ti.sparsity[t - 1] * math.prod(ti.shape) for ti in own) / total
        if abs(got - lv.sparsity) > _SPARSITY_TOL:
            raise ELSAFormatError(f"{source}: level {t}: sparsity recorded {lv.sparsity:.6f}, its tensors' records give {got:.6f}")


def _check_records(meta: "ELSAMeta", source: str) -> None:
    """Each encoded tensor's record: a name outside the reserved prefix, ``T`` non-increasing
    sparsities, ``k`` within its dtype's code bits."""
    from .bits import MAX_CODE_BITS

    T, k = meta.num_levels, meta.code_bits
    for name, ti in meta.tensors.items():
        if name.startswith(BN_PREFIX):
            raise ELSAFormatError(f"{source}: encoded tensor {name!r} uses the reserved prefix {BN_PREFIX!r}")
        if len(ti.sparsity) != T:
            raise ELSAFormatError(f"{source}: tensor {name!r} records {len(ti.sparsity)} sparsities for {T} levels")
        if any(b > a for a, b in zip(ti.sparsity, ti.sparsity[1:])):
            raise ELSAFormatError(f"{source}: tensor {name!r} records sparsities {ti.sparsity} that increase over the levels")
        kmax = MAX_CODE_BITS[_RECORD_DTYPES[ti.dtype]]
        if k > kmax:
            raise ELSAFormatError(f"{source}: code_bits={k} exceeds the {kmax} code bits of {ti.dtype} tensor {name!r}")
    if len(set(meta.bn_modules)) != len(meta.bn_modules):
        raise ELSAFormatError(f"{source}: bn_modules lists a module twice")


def _check_tied(meta: "ELSAMeta", source: str) -> None:
    """Each alias points to another name that is no alias and no batch-norm statistic (whether
    the file holds it, and the records of an encoded alias, :func:`elsa_codec.load_file` checks)."""
    for alias, target in meta.tied.items():
        if target in meta.tied or alias == target or any(n.startswith(BN_PREFIX) for n in (alias, target)):
            raise ELSAFormatError(f"{source}: tied tensor {alias!r} points to {target!r}, which is not a stored tensor")


def _make_meta(T: int, k: int, structs: list, infos: dict, bn: dict, tied: dict | None = None) -> ELSAMeta:
    """The document for ``infos``; ``tied`` (alias -> stored name) tensors count once in the level
    sparsities."""
    tied = dict(tied or {})
    own = [ti for n, ti in infos.items() if n not in tied]
    total = sum(math.prod(ti.shape) for ti in own) or 1
    levels = []
    for t in range(1, T + 1):
        zeros = sum(ti.sparsity[t - 1] * math.prod(ti.shape) for ti in own)
        levels.append(LevelInfo(t, structs[t - 1], zeros / total))
    bn_modules = sorted({m for per in bn.values() for m in per})
    return ELSAMeta(num_levels=T, code_bits=k, levels=levels, tensors=infos, bn_modules=bn_modules, tied=tied,
                    version=2 if tied else 1)  # the version it is written in
