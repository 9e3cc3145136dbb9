"""State-dict level codec: counters -> encoded tensors with metadata; encoded -> any level.

ELSA (Halvachi et al., arXiv 2312.06872), section 2.2: each weight's counter ``N`` (the first level
whose sparse network contains it) is stored in the low mantissa bits of the weight itself, so one
dense tensor set serves every level. See docs/FORMAT.md for the metadata document.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import operator
from typing import Iterable, Mapping

import torch

from ..checks import check_encoded, check_list, check_not_meta, check_state_dict
from ..errors import ELSAError, ELSATypeError
from ..progress import progress_bar
from .bits import (
    check_code_bits,
    default_code_bits,
    encode_tensor,
    extract_level,
    ulp_error,
)
from .document import BN_STATS, ELSAMeta, TensorInfo, _make_meta
from .selection import tie_groups
from .structure import parse_structure

logger = logging.getLogger("elsa_codec")

__all__ = ["ELSAStateDict", "Counters", "encode", "extract", "resolve_level", "counters_from_masks", "counter_dtype"]

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
    """Normalise a level (``1..T+1`` or ``"dense"``, any case) to an int.

    Integer-like levels are accepted: a numpy integer scalar (``np.int64(2)``) or a 0-d integer
    tensor (``torch.tensor(2)``), converted with :func:`operator.index`. Refused: ``bool``, floats
    (even ``2.0``), float / bool / non-0-d tensors.

    Raises:
        ELSAError: not an integer (nor ``"dense"``), or out of range.
    """
    if isinstance(level, str):
        if level.strip().lower() == "dense":
            return num_levels + 1
        try:
            level = int(level)
        except ValueError:
            raise ELSAError(f"level {level!r} is not an integer in 1..{num_levels + 1} nor 'dense'") from None
    t = _level_int(level)
    if t is None:
        raise ELSAError(f"level {_level_repr(level)} is not an integer in 1..{num_levels + 1} nor 'dense'")
    if not 1 <= t <= num_levels + 1:
        raise ELSAError(f"level {t} is out of range: this checkpoint has levels 1..{num_levels} and {num_levels + 1} ('dense')")
    return t


def _level_int(level) -> int | None:
    """``level`` as an int if it is integer-like (int, numpy integer, 0-d integer tensor), else None."""
    if isinstance(level, torch.Tensor):
        if level.dim() != 0 or level.is_meta or level.dtype == torch.bool or level.is_floating_point() or level.is_complex():
            return None
        return int(level.item())
    if isinstance(level, bool) or str(getattr(level, "dtype", "")) == "bool":  # numpy.bool_ too
        return None
    try:
        return operator.index(level)
    except TypeError:
        return None


def _level_repr(level) -> str:
    """``level`` for an error message (a tensor by its shape and dtype, not its values)."""
    if isinstance(level, torch.Tensor) and (level.dim() or level.is_meta):
        return f"(a tensor of shape {tuple(level.shape)}, dtype {level.dtype})"
    r = repr(level)
    return r if len(r) <= 80 else f"(a {type(level).__name__})"


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
        progress: show a tqdm progress bar (one line on stderr when it is not a terminal: :mod:`elsa_codec.progress`).

    Returns:
        :class:`ELSAStateDict` of NEW tensors (same names, shapes and dtypes).

    Raises:
        ELSAError: a counters name missing from ``state_dict``; counters of the wrong shape, not
            integer, out of ``1..T+1``, or with different T across tensors; different counters for
            two names of one tied tensor; NaN/Inf weights;
            unsupported dtype; more levels than the dtype's code bits allow; a meta tensor
            (``device="meta"``, no data) in ``state_dict`` or ``counters``. Each names the tensor.
        ELSATypeError: ``state_dict`` or ``counters`` not a mapping of names to tensors (a model);
            ``code_bits`` or ``num_levels`` not an int.
    """
    _check_encode_args(state_dict, counters, code_bits, num_levels)
    if structures is not None:
        structures = check_list(structures, "structures", "encode", "['unstructured', '2:4']")
    per_name, canon = _tied_counters(state_dict, counters)
    T = _num_levels(per_name, state_dict, counters, num_levels)
    k = default_code_bits(T) if code_bits is None else code_bits
    for name in per_name:
        check_code_bits(state_dict[name].dtype, k, T, name=name)
    structs = list(structures) if structures is not None else list(getattr(counters, "structures", ["unstructured"] * T))
    if len(structs) != T:
        raise ELSAError(f"structures lists {len(structs)} entries for {T} levels")
    structs = [str(parse_structure(s)) for s in structs]
    _check_structures(per_name, structs, getattr(counters, "transposed", set()), canon)
    bn = _check_bn_stats(bn_stats, T, state_dict)
    out, infos = _encode_tensors(state_dict, per_name, canon, k, T, progress)
    transposed = getattr(counters, "transposed", set())
    for name, info in infos.items():
        if name in transposed or canon.get(name) in transposed:
            infos[name] = dataclasses.replace(info, transposed=True)
    tied = {n: c for n, c in canon.items() if n != c and n in infos}
    meta = _make_meta(T, k, structs, infos, bn, tied)
    return ELSAStateDict(out, meta, bn)


def _check_encode_args(state_dict, counters, code_bits, num_levels) -> None:
    """:func:`encode`'s argument types, and every counters name in the state dict."""
    check_state_dict(state_dict, "state_dict", "encode")
    if isinstance(counters, torch.nn.Module) or not isinstance(counters, Mapping):
        raise ELSATypeError(
            f"encode: counters must be a mapping of tensor names to integer tensors (e.g. from magnitude_counters), "
            f"got a {type(counters).__name__}"
        )
    if not counters:
        raise ELSAError("encode: counters is empty: name at least one tensor to encode")
    check_not_meta(counters, "counters", "encode",
                   fix="make the counters from real weights (materialise the model first: model.to_empty(device='cpu') "
                   "and load the checkpoint into it)")
    for arg, v in (("code_bits", code_bits), ("num_levels", num_levels)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise ELSATypeError(f"encode: {arg} must be an int, got {v!r}")


def _num_levels(per_name: Mapping, state_dict: Mapping, counters, num_levels) -> int:
    """T: given, or the counters', or inferred from the largest counter; every counter checked in ``1..T+1``."""
    for name in counters:
        if name not in state_dict:
            raise ELSAError(f"{name}: counters given for a tensor that is not in the state dict")
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
    return T


def _encode_tensors(state_dict: Mapping, per_name: Mapping, canon: Mapping, k: int, T: int, progress: bool):
    """``(out, infos)``: every tensor of ``state_dict`` in order, those in ``per_name`` encoded (a tie
    group once), with their records."""
    out, infos = {}, {}
    done = {}  # first name of a tie group -> (encoded, info): a tie group is encoded once
    it = list(state_dict)
    if progress:
        it = progress_bar(it, desc="encode", unit="tensor")
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
    return out, infos


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
    from .structure import mask_structure_ok

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


def _check_bn_stats(bn_stats, T: int, state_dict) -> dict:
    if not bn_stats:
        return {}
    out = {}
    for lvl, per in bn_stats.items():
        try:
            t = resolve_level(lvl, T)  # an int, a numpy integer, a 0-d integer tensor or "dense"; not a bool
        except ELSAError:
            raise ELSAError(f"batch-norm statistics given for level {lvl!r}, outside 1..{T + 1}") from None
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


