"""State-dict level codec: counters -> encoded tensors with metadata; encoded -> any level.

ELSA (Halvachi et al., arXiv 2312.06872), section 2.2: each weight's counter ``N`` (the first level
whose sparse network contains it) is stored in the low mantissa bits of the weight itself, so one
dense tensor set serves every level. See docs/FORMAT.md for the metadata document.
"""
from __future__ import annotations

import json
import logging
import math
import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Mapping

import warnings

import torch

from .bits import (
    check_code_bits,
    default_code_bits,
    encode_tensor,
    extract_level,
    ulp_error,
)
from .checks import check_encoded, check_list, check_state_dict
from .errors import ELSAError, ELSAFormatError, ELSATypeError
from .masks import magnitude_mask, parse_level, parse_structure
from .select import DEFAULT_SELECT, select_weights, tie_groups, transposed_weights

logger = logging.getLogger("elsa_codec")

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "BN_PREFIX",
    "BN_STATS",
    "LevelInfo",
    "TensorInfo",
    "ELSAMeta",
    "ELSAStateDict",
    "Counters",
    "encode",
    "extract",
    "resolve_level",
    "counters_from_masks",
    "magnitude_counters",
    "default_prunable",
    "tensor_magnitude_counters",
    "global_thresholds",
    "parse_levels",
    "select_tensors",
    "counter_dtype",
]

FORMAT_NAME = "elsa-codec"
FORMAT_VERSION = 2  # the newest version this library reads; files without tied tensors are written as 1
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
            "version": 2 if self.tied else 1,  # version 1 readers know no tied tensors
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
                       "bn_modules", "bn_prefix", "tied", "training"})
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
    try:
        d = json.loads(text, object_pairs_hook=_unique_keys)
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
    }


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

class ELSAStateDict(dict):
    """An encoded state dict: ``name -> Tensor`` (encoded weights and pass-through tensors) plus
    ``.meta`` (:class:`ELSAMeta`) and ``.bn_stats`` (``{level: {module: {stat: Tensor}}}``, the
    per-level batch-norm statistics, levels ``1..T+1``; empty if none).

    A plain ``model.load_state_dict(encoded)`` gives the dense network (no decoding needed).
    :func:`elsa_codec.swap_` serves it without copying: one ``ELSAStateDict`` serves one model
    (a second model is refused; give it ``copy.deepcopy(encoded)`` or load the file again).
    """

    def __init__(self, tensors: Mapping, meta: ELSAMeta, bn_stats: Mapping | None = None):
        super().__init__(tensors)
        self.meta = meta
        self.bn_stats = {int(k): dict(v) for k, v in (bn_stats or {}).items()}

    def __getstate__(self):  # copies and pickles do not inherit the model it serves (swap_)
        return {k: v for k, v in self.__dict__.items() if k != "_served_by"}

    @property
    def num_levels(self) -> int:
        return self.meta.num_levels

    @property
    def code_bits(self) -> int:
        return self.meta.code_bits

    def __repr__(self) -> str:
        lv = ", ".join(f"{x.level}:{x.structure}@{x.sparsity:.3f}" for x in self.meta.levels)
        return f"ELSAStateDict({len(self)} tensors, {len(self.meta.tensors)} encoded, T={self.num_levels}, k={self.code_bits}, levels=[{lv}])"


class Counters(dict):
    """``name -> counters`` (integer tensors, values ``1..T+1``) with ``num_levels`` (T) and the
    ``structures`` of levels 1..T. Returned by :func:`counters_from_masks`,
    :func:`magnitude_counters` and the training procedure; accepted by :func:`encode`.
    ``transposed`` names the tensors stored `[in, out]` (transformers ``Conv1D``)."""

    def __init__(self, tensors: Mapping, num_levels: int, structures: Iterable[str] | None = None,
                 transposed: Iterable[str] = ()):
        super().__init__(tensors)
        self.num_levels = int(num_levels)
        self.structures = list(structures) if structures is not None else ["unstructured"] * self.num_levels
        self.transposed = set(transposed)


def counter_dtype(num_levels: int) -> torch.dtype:
    """The integer dtype of counters (values ``1..T+1``) for ``T`` levels: ``uint8`` up to
    ``T = 254``; ``int16`` for ``T = 255`` (float32's maximum, ``k = 8``), whose dense counter 256
    does not fit a byte."""
    return torch.uint8 if num_levels + 1 <= 255 else torch.int16


def resolve_level(level, num_levels: int) -> int:
    """Normalise a level (``1..T+1`` or ``"dense"``) to an int; ELSAError if out of range."""
    if isinstance(level, str):
        if level.strip().lower() == "dense":
            return num_levels + 1
        try:
            level = int(level)
        except ValueError:
            raise ELSAError(f"level {level!r} is not an integer in 1..{num_levels + 1} nor 'dense'") from None
    if isinstance(level, bool) or not isinstance(level, int):
        raise ELSAError(f"level {level!r} is not an integer in 1..{num_levels + 1} nor 'dense'")
    if not 1 <= level <= num_levels + 1:
        raise ELSAError(f"level {level} is out of range: this checkpoint has levels 1..{num_levels} and {num_levels + 1} ('dense')")
    return level


def _check_counters(name: str, c, ref: torch.Tensor) -> torch.Tensor:
    if not isinstance(c, torch.Tensor):
        raise ELSAError(f"{name}: counters must be a torch.Tensor, got {type(c).__name__}")
    if c.shape != ref.shape:
        raise ELSAError(f"{name}: counters have shape {tuple(c.shape)} but the tensor has shape {tuple(ref.shape)}")
    if c.is_floating_point() or c.is_complex() or c.dtype == torch.bool:
        raise ELSAError(f"{name}: counters must be an integer tensor, got dtype {c.dtype}")
    return c


def encode(
    state_dict: Mapping[str, torch.Tensor],
    counters: Mapping[str, torch.Tensor],
    *,
    code_bits: int | None = None,
    num_levels: int | None = None,
    structures: Iterable[str] | None = None,
    bn_stats: Mapping | None = None,
    progress: bool = False,
) -> ELSAStateDict:
    """Encode each tensor named in ``counters`` with its counters (the code rule); pass the rest through.

    Tied tensors (names that share one storage in ``state_dict``, as ``model.state_dict()`` gives
    a tied ``lm_head`` and token embedding) are one tensor: counters for any of the names encode
    it once, and every name of the group gets the same encoded tensor and record (``meta.tied``
    maps the others to the first name; the file stores it once).

    Args:
        state_dict: ``name -> Tensor``. Encoded tensors must be float32 / float16 / bfloat16 and
            finite. Never modified.
        counters: ``name -> integer Tensor`` of the same shape, values in ``1..T+1`` (a
            :class:`Counters` carries T and the level structures). The same T for every tensor.
        code_bits: ``k``; default ``max(1, ceil(log2(T+1)))``. At most 8 (float32), 4 (float16),
            3 (bfloat16).
        num_levels: T; default ``counters.num_levels``, else inferred (every tensor's largest
            counter must then be the same ``T+1``).
        structures: structure of levels 1..T (``"unstructured"``, ``"2:4"``, ``"block:64x64"``);
            default ``counters.structures`` or ``"unstructured"``.
        bn_stats: per-level batch-norm statistics ``{level: {module_fqn: {stat: Tensor}}}`` for
            levels ``1..T+1`` (section 2.2 of the paper), stored under :data:`BN_PREFIX`.
        progress: show a tqdm progress bar.

    Returns:
        :class:`ELSAStateDict` of NEW tensors (same names, shapes and dtypes).

    Raises:
        ELSAError: a counters name missing from ``state_dict``; counters of the wrong shape, not
            integer, out of ``1..T+1``, or with different T across tensors; different counters for
            two names of one tied tensor; NaN/Inf weights;
            unsupported dtype; more levels than the dtype's code bits allow. Each names the tensor.
    """
    check_state_dict(state_dict, "state_dict", "encode")
    if isinstance(counters, torch.nn.Module) or not isinstance(counters, Mapping):
        raise ELSATypeError(
            f"encode: counters must be a mapping of tensor names to integer tensors (e.g. from magnitude_counters), "
            f"got a {type(counters).__name__}"
        )
    if not counters:
        raise ELSAError("encode: counters is empty: name at least one tensor to encode")
    for arg, v in (("code_bits", code_bits), ("num_levels", num_levels)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise ELSATypeError(f"encode: {arg} must be an int, got {v!r}")
    if structures is not None:
        structures = check_list(structures, "structures", "encode", "['unstructured', '2:4']")
    for name in counters:
        if name not in state_dict:
            raise ELSAError(f"{name}: counters given for a tensor that is not in the state dict")
    per_name, canon = _tied_counters(state_dict, counters)
    ranges = {}
    for name, c in per_name.items():
        _check_counters(name, c, state_dict[name])
        if c.numel():
            ranges[name] = (int(c.min()), int(c.max()))
    T = num_levels if num_levels is not None else getattr(counters, "num_levels", None)
    if T is None:
        tops = {name: hi for name, (lo, hi) in ranges.items()}
        if len(set(tops.values())) > 1:
            a, b = sorted(tops.items(), key=lambda kv: kv[1])[0], sorted(tops.items(), key=lambda kv: kv[1])[-1]
            raise ELSAError(
                f"counters have different T across tensors: {a[0]!r} reaches level {a[1]} but {b[0]!r} reaches {b[1]}; "
                "pass num_levels= (or a Counters) to say T"
            )
        T = max(tops.values()) - 1
    if not isinstance(T, int) or T < 1:
        raise ELSAError(f"number of levels T must be >= 1, got {T!r}")
    for name, (lo, hi) in ranges.items():
        if lo < 1 or hi > T + 1:
            raise ELSAError(f"{name}: counters must lie in 1..{T + 1} (T={T}), got {lo}..{hi}")
    k = default_code_bits(T) if code_bits is None else code_bits
    for name in per_name:
        check_code_bits(state_dict[name].dtype, k, T, name=name)
    structs = list(structures) if structures is not None else list(getattr(counters, "structures", ["unstructured"] * T))
    if len(structs) != T:
        raise ELSAError(f"structures lists {len(structs)} entries for {T} levels")
    structs = [str(parse_structure(s)) for s in structs]
    _check_structures(per_name, structs, getattr(counters, "transposed", set()), canon)
    bn = _check_bn_stats(bn_stats, T, state_dict)

    out = {}
    infos = {}
    done = {}  # first name of a tie group -> (encoded, info): a tie group is encoded once
    names = list(state_dict)
    it = names
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(names, desc="encode", unit="tensor")
    for name in it:
        x = state_dict[name]
        if name not in per_name:
            out[name] = x
            continue
        key = canon.get(name, name)
        if key not in done:
            c = per_name[name].to(device=x.device)
            y = encode_tensor(x, c - 1, k, name=name)
            done[key] = (y, _tensor_info(x, y, c, T))
        out[name], infos[name] = done[key]
    transposed = getattr(counters, "transposed", set())
    for name, info in infos.items():
        if name in transposed or canon.get(name) in transposed:
            infos[name] = dataclasses.replace(info, transposed=True)
    tied = {n: c for n, c in canon.items() if n != c and n in infos}
    meta = _make_meta(T, k, structs, infos, bn, tied)
    return ELSAStateDict(out, meta, bn)


def _check_structures(per_name: Mapping, structs: list, transposed, canon: Mapping) -> None:
    """:func:`check_counter_structures` of every tensor (a tied name counts as its group's
    first name for ``transposed``)."""
    for name, c in per_name.items():
        check_counter_structures(name, c, structs, name in transposed or canon.get(name) in transposed)


def check_counter_structures(name: str, c: torch.Tensor, structs: list, transposed: bool) -> None:
    """Each structured level's mask (``c <= t``) must hold its structure (N:M groups along the
    input dimension, block tiles; dim 0 for a ``transposed`` ``[in, out]`` weight): a file must
    never claim a 2:4 level whose mask is not 2:4 (the 2:4 kernels would compute a wrong
    product). N:M masks are checked per block of rows (a few 4M-element chunks of memory, as the
    streaming encode needs); block masks and transposed weights as a whole.

    Raises:
        ELSAError: names the tensor, the level and its structure.
    """
    from .masks import mask_structure_ok

    for t, st in enumerate(structs, start=1):
        if st == "unstructured":
            continue
        full = c.t() if transposed else c
        if parse_structure(st).kind == "nm" and not transposed and full.dim() >= 2 and full.shape[0]:
            step = max(1, _STAT_CHUNK // max(full[0].numel(), 1))
            blocks = (full[r : r + step] for r in range(0, full.shape[0], step))
        else:
            blocks = [full]
        for b in blocks:
            if not mask_structure_ok(b <= t, st):
                raise ELSAError(
                    f"{name}: structures say level {t} is {st}, but its mask (counters <= {t}) is not {st}; "
                    "give the structures the counters were made with"
                )


def _tied_counters(state_dict: Mapping, counters: Mapping) -> tuple[dict, dict]:
    """``(name -> counters, name -> first name of its tie group)``: every tie group (tensors sharing
    storage, e.g. a tied ``lm_head`` and token embedding) gets ONE counters tensor; the tensor is
    encoded once and every name of the group gets the encoded result.

    Raises:
        ELSAError: two names of one tie group with different counters (names both).
    """
    out, canon = dict(counters), {}
    for group in tie_groups(state_dict):
        named = [n for n in group if n in counters]
        if not named:
            continue
        first = counters[named[0]]
        for n in named[1:]:
            c = counters[n]
            if c.shape != first.shape or not torch.equal(c.to(torch.int64), first.to(torch.int64)):
                raise ELSAError(
                    f"{named[0]!r} and {n!r} are one tied tensor (shared storage) but their counters differ; "
                    "a tied weight has one set of levels: give both the same counters, or one of them"
                )
        for n in group:
            out[n] = first
            canon[n] = group[0]
        if len(named) < len(group):
            logger.info("encode: %s is tied to %s: encoded once, served under every name",
                        named[0], ", ".join(n for n in group if n not in named))
    return out, canon


def _tensor_info(x: torch.Tensor, y: torch.Tensor | None, c: torch.Tensor, T: int) -> TensorInfo:
    flat = c.reshape(-1)
    counts = torch.bincount(flat if flat.dtype == torch.uint8 else flat.to(torch.int64), minlength=T + 2)[1 : T + 2]
    n = max(c.numel(), 1)
    kept = torch.cumsum(counts, 0)[:T]
    sp = [1.0 - float(kv) / n for kv in kept]
    max_ulp = sq = None
    if y is not None:
        # In chunks, so that the statistics add little to the peak memory of a streaming encode.
        xf, yf = x.detach().reshape(-1), y.detach().reshape(-1)
        max_ulp, signal, noise = 0.0, 0.0, 0.0
        for s in range(0, xf.numel(), _STAT_CHUNK):
            xs, ys = xf[s : s + _STAT_CHUNK], yf[s : s + _STAT_CHUNK]
            max_ulp = max(max_ulp, float(ulp_error(xs, ys).max()))
            signal += float(torch.linalg.vector_norm(xs, dtype=torch.float64)) ** 2
            noise += float(torch.linalg.vector_norm(ys.to(torch.float32) - xs.to(torch.float32), dtype=torch.float64)) ** 2
        sq = math.inf if noise == 0.0 else (-math.inf if signal == 0.0 else 10.0 * math.log10(signal / noise))
    return TensorInfo(shape=list(x.shape), dtype=str(x.dtype).replace("torch.", ""), sparsity=sp, max_ulp=max_ulp, sqnr_db=sq)


_STAT_CHUNK = 1 << 22


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
    return ELSAMeta(num_levels=T, code_bits=k, levels=levels, tensors=infos, bn_modules=bn_modules, tied=tied)


def _check_bn_stats(bn_stats, T: int, state_dict) -> dict:
    if not bn_stats:
        return {}
    out = {}
    for lvl, per in bn_stats.items():
        t = resolve_level(lvl, T) if not isinstance(lvl, int) else lvl
        if not isinstance(t, int) or not 1 <= t <= T + 1:
            raise ELSAError(f"batch-norm statistics given for level {lvl!r}, outside 1..{T + 1}")
        out[t] = {}
        for mod, stats in per.items():
            for s, v in stats.items():
                if s not in BN_STATS:
                    raise ELSAError(f"batch-norm statistics of {mod!r} at level {t}: unknown buffer {s!r}")
                if not isinstance(v, torch.Tensor):
                    raise ELSAError(f"batch-norm statistics {mod}.{s} at level {t} is not a tensor")
                ref = state_dict.get(f"{mod}.{s}")
                if ref is not None and ref.shape != v.shape:
                    raise ELSAError(f"batch-norm statistics {mod}.{s} at level {t} have shape {tuple(v.shape)}, the model's have {tuple(ref.shape)}")
            out[t][mod] = {s: v.detach().clone() for s, v in stats.items()}
    levels = sorted(out)
    if levels != list(range(1, T + 2)):
        raise ELSAError(f"batch-norm statistics must be given for every level 1..{T + 1}, got levels {levels}")
    mods = {t: sorted(per) for t, per in out.items()}
    first = mods[1]
    for t, m in mods.items():
        if m != first:
            raise ELSAError(f"batch-norm statistics of level {t} cover modules {m}, level 1 covers {first}")
    return out


def extract(encoded: ELSAStateDict, level) -> dict:
    """The plain state dict of level ``t``: ``where(code < t, W, 0)`` for encoded tensors, the
    others unchanged, and the level's batch-norm statistics in place of the model's.

    Args:
        encoded: an :class:`ELSAStateDict` (from :func:`encode` or :func:`load_file`).
        level: ``1..T``, ``T+1`` or ``"dense"``.

    Returns:
        ``dict[str, Tensor]`` loadable by ``model.load_state_dict`` of the original model. At the
        dense level the encoded tensors are returned as they are (no copy).

    Raises:
        ELSAError: level out of range; ``encoded`` has no metadata.
    """
    meta = check_encoded(encoded, "encoded", "extract").meta
    T, k = meta.num_levels, meta.code_bits
    t = resolve_level(level, T)
    out = {}
    for name, x in encoded.items():
        out[name] = extract_level(x, t, k, T) if name in meta.tensors else x
    for mod, stats in getattr(encoded, "bn_stats", {}).get(t, {}).items():
        for s, v in stats.items():
            out[f"{mod}.{s}"] = v
    return out


def counters_from_masks(masks, *, structures: Iterable[str] | None = None) -> Counters:
    """Nested boolean masks, sparsest first -> :class:`Counters`.

    Args:
        masks: either a list (one per level 1..T, sparsest first) of ``{name: bool Tensor}``, or
            ``{name: [bool Tensor per level]}``. ``True`` = the weight is in the level's network.
        structures: structures of the levels (default unstructured).

    Returns:
        :class:`Counters` with ``N = `` the first level whose mask holds the weight, ``T+1`` if none
        (uint8 tensors; int16 for T = 255, :func:`counter_dtype`).

    Raises:
        ELSAError: masks not nested (names the tensor, the levels and the first position), not
            boolean, of differing shapes, or differing names / level counts across tensors.
    """
    if isinstance(masks, Mapping):
        per_name = {n: check_list(v, f"masks[{n!r}]", "counters_from_masks", "[level-1 mask, level-2 mask]") for n, v in masks.items()}
    else:
        levels = check_list(masks, "masks", "counters_from_masks", "[{name: level-1 mask}, {name: level-2 mask}]")
        if not levels:
            raise ELSAError("counters_from_masks needs at least one level of masks")
        names = list(levels[0])
        for i, lv in enumerate(levels):
            if set(lv) != set(names):
                raise ELSAError(f"masks of level {i + 1} name tensors {sorted(lv)}, level 1 names {sorted(names)}")
        per_name = {n: [lv[n] for lv in levels] for n in names}
    if not per_name:
        raise ELSAError("counters_from_masks needs at least one tensor")
    Ts = {n: len(v) for n, v in per_name.items()}
    T = next(iter(Ts.values()))
    if any(v != T for v in Ts.values()) or T < 1:
        raise ELSAError(f"every tensor needs the same number of level masks, got {Ts}")
    out = {}
    for name, ms in per_name.items():
        for t, m in enumerate(ms, start=1):
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
                raise ELSAError(f"{name}: mask of level {t} must be a bool tensor")
            if m.shape != ms[0].shape:
                raise ELSAError(f"{name}: mask of level {t} has shape {tuple(m.shape)}, level 1 has {tuple(ms[0].shape)}")
        for t in range(1, T):
            bad = ms[t - 1] & ~ms[t]
            if bad.any():
                pos = tuple(int(i) for i in bad.nonzero()[0])
                raise ELSAError(
                    f"{name}: masks are not nested: position {pos} is in level {t} but not in level {t + 1}"
                )
        n = torch.full(ms[0].shape, T + 1, dtype=torch.int64, device=ms[0].device)
        for m in ms:
            n -= m.to(torch.int64)
        out[name] = n.to(counter_dtype(T))
    return Counters(out, T, structures)


def default_prunable(name: str, tensor: torch.Tensor) -> bool:
    """Default tensor filter of :func:`magnitude_counters`: float ``*.weight`` tensors of 2 or 4
    dimensions (Linear ``[out, in]`` and Conv2d ``[out, in/groups, kh, kw]``), except embedding
    tables (names containing ``embed``)."""
    return (
        name.endswith("weight")
        and tensor.dim() in (2, 4)
        and tensor.is_floating_point()
        and "embed" not in name.lower()
    )


def magnitude_counters(
    state_dict,
    levels,
    *,
    structure: str = "unstructured",
    sparsifier: str | None = None,
    names: Iterable[str] | Callable[[str, torch.Tensor], bool] | None = None,
    model: torch.nn.Module | None = None,
    select=None,
    filter_fn: Callable[[torch.nn.Module, str], bool] | None = None,
    distribution: str | None = None,
) -> Counters:
    """One-shot nested magnitude levels (no training): a baseline and a way to encode any checkpoint.

    Args:
        state_dict: ``name -> Tensor`` (not modified), or the model itself (an ``nn.Module``: its
            ``state_dict()`` is used and the model drives the selection).
        levels: sparsest first. Sparsities in (0, 1), strictly decreasing (``[0.9, 0.75, 0.5]``),
            or N:M patterns with increasing N and the same M (``["1:4", "2:4"]``: groups of M along
            the input dimension).
        structure: for fractional levels, ``"unstructured"`` or ``"block:RxC"`` (tiles of the 2-D
            view ``[out, in*kh*kw]`` ranked by L2 norm).
        sparsifier: how a level's sparsity spreads over the tensors (the name
            :class:`~elsa_codec.ELSAConfig` uses): ``"uniform"`` (default; each tensor at the
            level's sparsity) or ``"global"`` (one magnitude threshold across the tensors per
            level; block structures then use each tensor's resulting sparsity).
        distribution: the former name of ``sparsifier`` (still accepted).
        names: the tensors to encode: a list of names or a predicate ``(name, tensor) -> bool``.
        model: the model the state dict belongs to (when ``state_dict`` is a mapping): selects by
            module type (:func:`elsa_codec.select.select_weights`) and knows which weights are
            transposed (``transformers`` ``Conv1D`` `[in, out]`: N:M groups and blocks are laid
            along its dim 0, the input dimension).
        select: with a model, the selection policy: ``"blocks"`` (default; the linear layers of
            the blocks, embeddings and output head dense: the SparseGPT / Wanda convention),
            ``"blocks+head"``, ``"all"`` (also embeddings); a predicate ``(fqn, module) -> bool``
            still works but is deprecated: use ``filter_fn``.
        filter_fn: with a model, ``(module, fqn) -> bool`` called on every module with a
            ``weight`` Parameter (the torchao convention, as :func:`elsa_codec.swap_` and
            :class:`~elsa_codec.ELSAConfig`); replaces ``select``.

    Without a model and ``names``, :func:`default_prunable` picks 2-D/4-D ``*.weight`` tensors
    that are not embeddings; a tensor tied to one it leaves out (a tied ``lm_head``) is left out
    too. Either way the selection is logged (INFO, logger ``elsa_codec``). A tie group (tensors
    sharing storage) appears once in the result, under its first selected name; :func:`encode`
    encodes it once and serves every name of the group.

    Returns:
        :class:`Counters` (uint8; int16 for 255 levels), ``num_levels = len(levels)``, with the level structures.

    Raises:
        ELSAError: levels not sparsest first or out of (0, 1), mixed N:M and fractional levels,
            no tensor selected, unknown distribution or policy, ``select`` without a model or
            with ``names``, shapes that do not suit the structure.
    """
    if isinstance(state_dict, torch.nn.Module):
        if model is not None and model is not state_dict:
            raise ELSAError("magnitude_counters: pass the model once (as the first argument or as model=)")
        model, state_dict = state_dict, state_dict.state_dict()
    check_state_dict(state_dict, "state_dict", "magnitude_counters")
    if model is not None and not isinstance(model, torch.nn.Module):
        raise ELSATypeError(f"magnitude_counters: model must be a torch.nn.Module, got {type(model).__name__}")
    if names is not None:
        names = check_list(names, "names", "magnitude_counters", "['fc1.weight', 'fc2.weight']", allow_callable=True)
    distribution = _sparsifier_arg(sparsifier, distribution)
    select = _filter_arg(select, filter_fn)
    specs = parse_levels(levels, structure, distribution)
    sps = [s for s, _ in specs]
    sel = _magnitude_selection(state_dict, names, model, select)
    transposed = transposed_weights(model) & set(sel) if model is not None else set()
    thr = None
    if distribution == "global" and specs[0][1].kind != "nm":
        thr = global_thresholds(lambda n: state_dict[n], sel, sps)
    out = {}
    for n in sel:
        w = state_dict[n]
        if n in transposed and specs[0][1].kind != "unstructured":  # [in, out]: N:M groups / blocks along dim 0
            out[n] = tensor_magnitude_counters(w.t(), specs, thr, name=n).t().contiguous().to(counter_dtype(len(specs)))
        else:
            out[n] = tensor_magnitude_counters(w, specs, thr, name=n).to(counter_dtype(len(specs)))
    return Counters(out, len(specs), [str(st) for _, st in specs], transposed=transposed)


def _sparsifier_arg(sparsifier, distribution) -> str:
    """One value from ``sparsifier=`` and its former name ``distribution=``."""
    if sparsifier is not None and distribution is not None and sparsifier != distribution:
        raise ELSAError(f"magnitude_counters: sparsifier={sparsifier!r} and distribution={distribution!r} disagree "
                        "(distribution is the former name of sparsifier: pass one)")
    return sparsifier or distribution or "uniform"


def _filter_arg(select, filter_fn):
    """The selection predicate in ``select``'s convention ``(fqn, module)`` from ``filter_fn``
    ``(module, fqn)``; a ``select`` predicate warns (deprecated)."""
    if filter_fn is not None:
        if not callable(filter_fn):
            raise ELSAError(f"filter_fn must be a callable (module, fqn) -> bool, got {type(filter_fn).__name__}")
        if select is not None:
            raise ELSAError("pass either select= (a policy) or filter_fn=, not both")
        return lambda fqn, m: filter_fn(m, fqn)
    if callable(select):
        warnings.warn("magnitude_counters(select=predicate) with (fqn, module) is deprecated: pass "
                      "filter_fn=(module, fqn) -> bool, the convention of swap_ and ELSAConfig", DeprecationWarning, stacklevel=3)
    return select


def _magnitude_selection(state_dict: Mapping, names, model, select) -> list:
    """The names :func:`magnitude_counters` encodes: one per tie group, logged."""
    if select is not None and model is None:
        raise ELSAError("select= chooses weights by module type and needs the model: magnitude_counters(model, levels, select=...)")
    if select is not None and names is not None:
        raise ELSAError("pass either names= or select=, not both")
    groups = tie_groups(state_dict)
    if names is None and model is not None:
        picked = select_weights(model, select or DEFAULT_SELECT)
        missing = [n for n in picked if n not in state_dict]
        if missing:
            raise ELSAError(f"{missing[0]}: selected in the model but not in the state dict")
        how = f"select={select or DEFAULT_SELECT!r}"
    elif names is None:
        picked = select_tensors(None, state_dict, state_dict.__getitem__, "the state dict")
        left = {n for g in groups if any(m not in picked for m in g) for n in g}
        picked = [n for n in picked if n not in left]  # a tied lm_head stays dense with its embedding
        if not picked:
            raise ELSAError("no tensor selected for encoding in the state dict (every 2-D/4-D '*.weight' is an embedding or tied to one; pass names=)")
        how = "default_prunable (2-D/4-D '*.weight', no embeddings)"
    else:
        picked = select_tensors(names, state_dict, state_dict.__getitem__, "the state dict")
        how = "names="
    seen, sel = set(), []
    first_of = {n: g[0] for g in groups for n in g}
    for n in picked:
        key = first_of.get(n, n)
        if key not in seen:
            seen.add(key)
            sel.append(n)
    logger.info("magnitude_counters: %d tensors selected by %s: %s", len(sel), how, ", ".join(sel))
    return sel


def parse_levels(levels, structure: str = "unstructured", distribution: str = "uniform") -> list:
    """Check a list of levels (sparsest first) and parse it into ``[(sparsity, Structure)]``.

    Raises:
        ELSAError: unknown distribution, no level, levels not sparsest first or out of (0, 1),
            N:M patterns mixed with sparsities or with different M.
    """
    if distribution not in ("uniform", "global"):
        raise ELSAError(f"unknown distribution {distribution!r}: expected 'uniform' or 'global'")
    levels = check_list(levels, "levels", "levels", "[0.9, 0.75, 0.5] or ['1:4', '2:4']")
    if not levels:
        raise ELSAError("levels must list at least one level")
    specs = [parse_level(lv, structure) for lv in levels]
    sps = [s for s, _ in specs]
    if len({st.kind == "nm" for _, st in specs}) > 1:
        raise ELSAError(f"levels {levels} mix N:M patterns and sparsities")
    if any(b >= a for a, b in zip(sps, sps[1:])):
        raise ELSAError(f"levels {levels} must be sparsest first (strictly decreasing sparsity)")
    if specs[0][1].kind == "nm" and len({st.m for _, st in specs}) > 1:
        raise ELSAError(f"N:M levels {levels} must share the same M")
    return specs


def select_tensors(names, candidates: Mapping, get_tensor, source: str) -> list:
    """The tensors to encode among ``candidates`` (``name -> tensor``, or a stand-in with the right
    ``dim()`` and floating-point-ness): ``names`` as a list, a predicate ``(name, tensor) -> bool``
    (called with ``get_tensor(name)``), or None for :func:`default_prunable`.

    Raises:
        ELSAError: a listed name not in ``source``, nothing selected, a non-floating tensor.
    """
    if names is None:
        sel = [n for n, t in candidates.items() if isinstance(t, torch.Tensor) and default_prunable(n, t)]
    elif callable(names):
        sel = [n for n in candidates if names(n, get_tensor(n))]
    else:
        sel = check_list(names, "names", "select", "['fc1.weight', 'fc2.weight']")
        for n in sel:
            if not isinstance(n, str):
                raise ELSATypeError(f"names: {n!r} is a {type(n).__name__}, expected a tensor name (str)")
            if n not in candidates:
                raise ELSAError(f"{n}: not in {source}")
    if not sel:
        raise ELSAError(f"no tensor selected for encoding in {source} (no 2-D/4-D '*.weight' tensor found; pass names=)")
    for n in sel:
        if not candidates[n].is_floating_point():
            raise ELSAError(f"{n}: cannot prune a {candidates[n].dtype} tensor")
    return sel


def tensor_magnitude_counters(weight: torch.Tensor, specs: list, thresholds: list | None = None, *, name: str = "weight") -> torch.Tensor:
    """Counters (integer tensor of ``weight``'s shape, values ``1..T+1``) of nested magnitude levels.

    ``specs``: ``[(sparsity, Structure)]`` sparsest first (:func:`elsa_codec.masks.parse_level`).
    ``thresholds``: per level, a global magnitude threshold (from :func:`global_thresholds`); the
    tensor's sparsity at that level is then the fraction of ``|w|`` below it.
    """
    T = len(specs)
    a = weight.detach().abs().float()
    sps = [s for s, _ in specs]
    if thresholds is not None:
        sps = [float((a < thr).sum()) / max(a.numel(), 1) for thr in thresholds]
    if all(st.kind == "unstructured" for _, st in specs):
        # Nested unstructured levels with one selection per level instead of a sort: level t keeps
        # the keep_t largest |w|; ties at the threshold go to the lowest indices (the order of a
        # stable descending sort), so the levels nest and the counts are exact. Peak memory
        # stays near 3x the tensor (a streaming encode relies on it).
        flat = a.reshape(-1)
        n = flat.numel()
        c = torch.full((n,), T + 1, dtype=counter_dtype(T), device=weight.device)
        keeps = [int(round((1.0 - s) * n)) for s in sps]
        thrs = _kth_largest(flat, [kp for kp in keeps if 0 < kp < n])
        for keep in keeps:
            if keep <= 0:
                continue
            if keep >= n:
                c.sub_(1)
                continue
            thr = thrs[keep]
            inside = flat > thr
            need = keep - int(inside.sum())
            if need > 0:
                inside[(flat == thr).nonzero().reshape(-1)[:need]] = True
            c.sub_(inside.to(c.dtype))
        return c.reshape(weight.shape)
    c = torch.full(weight.shape, T + 1, dtype=torch.int64, device=weight.device)
    frozen = None
    for i, (_, st) in enumerate(specs):
        s = sps[i]
        m = magnitude_mask(weight, s, st, frozen, name=name)
        c -= m.to(torch.int64)
        frozen = m
    return c


def _kth_largest(flat: torch.Tensor, keeps: list) -> dict:
    """``{keep: the keep-th largest value of flat}`` (1-based), as 0-d tensors on flat's device.

    On CPU one ``numpy.partition`` (a single copy, no index tensor) serves every level.
    """
    if not keeps:
        return {}
    n = flat.numel()
    if flat.device.type == "cpu":
        import numpy as np

        pos = sorted({n - kp for kp in keeps})
        part = np.partition(flat.numpy(), pos)
        out = {kp: torch.tensor(part[n - kp]) for kp in keeps}
        del part
        return out
    return {kp: torch.kthvalue(flat, n - kp + 1).values for kp in keeps}


def global_thresholds(get_tensor, names: list, sparsities: list) -> list:
    """Exact global magnitude thresholds (one per sparsity) over the tensors ``names``, streaming.

    ``get_tensor(name)`` returns a tensor; it is called twice per name, so peak memory stays near
    the largest tensor. The threshold of sparsity ``s`` is the ``round(s * total)``-th smallest
    ``|w|`` (0-based) over all the tensors, found with a 65,536-bin histogram of the float32 bit
    patterns, then an exact sort inside the one bin that holds it.
    """
    hist = torch.zeros(1 << 16, dtype=torch.int64)
    total = 0
    for n in names:
        b = (get_tensor(n).detach().abs().float().reshape(-1).view(torch.int32) >> 15).cpu()
        hist += torch.bincount(b, minlength=1 << 16)
        total += b.numel()
    cum = torch.cumsum(hist, 0)
    want = []
    for s in sparsities:
        k = min(max(int(round(s * total)), 0), total - 1)
        b = int(torch.searchsorted(cum, torch.tensor(k), right=True))
        want.append((b, k - (int(cum[b - 1]) if b else 0)))
    vals = {b: [] for b, _ in want}
    for n in names:
        w = get_tensor(n).detach().abs().float().reshape(-1).cpu()
        bb = w.view(torch.int32) >> 15
        for b in vals:
            vals[b].append(w[bb == b])
    return [float(torch.sort(torch.cat(vals[b])).values[r]) for b, r in want]
