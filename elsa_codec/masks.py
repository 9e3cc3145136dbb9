"""Structured and unstructured magnitude masks, nested on a frozen mask.

A mask is a bool tensor of the weight's shape, ``True`` = kept. Structures (DESIGN.md, "Terms"):
``unstructured``; ``N:M`` (at most ``N`` kept in each group of ``M`` consecutive weights along the
input dimension, i.e. the last dimension of a Linear weight ``[out_features, in_features]`` and the
flattened ``[in_channels/groups * kh * kw]`` dimension of a Conv weight); ``block:RxC`` (whole
``R x C`` tiles of the 2-D view ``[out, in*kh*kw]``, ranked by L2 norm).

Every function takes an optional ``frozen`` mask: frozen weights are always kept and count
towards the target, so the result contains ``frozen`` (the nesting of ELSA, arXiv 2312.06872,
section 2.1).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .errors import ELSAError

__all__ = ["Structure", "parse_structure", "parse_level", "magnitude_mask", "mask_structure_ok"]


@dataclass(frozen=True)
class Structure:
    """A mask structure: ``kind`` in {"unstructured", "nm", "block"}; ``n, m`` for N:M; ``r, c`` for blocks."""

    kind: str
    n: int = 0
    m: int = 0
    r: int = 0
    c: int = 0

    def __str__(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"block:{self.r}x{self.c}"
        return "unstructured"

    @property
    def nm_density(self) -> float:
        return self.n / self.m


def parse_structure(text) -> Structure:
    """Parse ``"unstructured"``, ``"N:M"`` (e.g. ``"2:4"``) or ``"block:RxC"`` (e.g. ``"block:64x64"``).

    Raises:
        ELSAError: anything else, or N > M, or non-positive sizes.
    """
    if isinstance(text, Structure):
        return text
    s = str(text).strip().lower()
    if s in ("unstructured", "dense", ""):
        return Structure("unstructured")
    m = re.fullmatch(r"(\d+):(\d+)", s)
    if m:
        n, mm = int(m.group(1)), int(m.group(2))
        if not 0 < n < mm:
            raise ELSAError(f"N:M structure {text!r} needs 0 < N < M")
        return Structure("nm", n=n, m=mm)
    m = re.fullmatch(r"block:(\d+)x(\d+)", s)
    if m:
        r, c = int(m.group(1)), int(m.group(2))
        if r < 1 or c < 1:
            raise ELSAError(f"block structure {text!r} needs positive tile sizes")
        return Structure("block", r=r, c=c)
    raise ELSAError(f"unknown structure {text!r}: expected 'unstructured', 'N:M' (e.g. '2:4') or 'block:RxC' (e.g. 'block:64x64')")


def parse_level(level, structure="unstructured") -> tuple[float, Structure]:
    """A level spec -> (sparsity, structure). ``level`` is a sparsity in (0, 1) or an ``"N:M"`` string."""
    if isinstance(level, str) and ":" in level and not level.startswith("block"):
        st = parse_structure(level)
        return 1.0 - st.nm_density, st
    try:
        s = float(level)
    except (TypeError, ValueError):
        raise ELSAError(f"level {level!r} is neither a sparsity in (0, 1) nor an N:M pattern") from None
    if not 0.0 < s < 1.0:
        raise ELSAError(f"level sparsity {s} is not in (0, 1)")
    st = parse_structure(structure)
    if st.kind == "nm":
        raise ELSAError("an N:M structure is given as the level itself (levels=['1:4', '2:4']), not as structure=")
    return s, st


def _as_2d(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() < 2:
        return weight.reshape(1, -1)
    return weight.reshape(weight.shape[0], math.prod(weight.shape[1:]))  # not -1: [0, K] stays [0, K]


def _topk_mask(score: torch.Tensor, frozen: torch.Tensor, keep: int, name: str) -> torch.Tensor:
    """Keep the ``keep`` highest scores over a flat vector, frozen entries first."""
    nf = int(frozen.sum())
    if nf > keep:
        raise ELSAError(
            f"{name}: the frozen weights ({nf} of {frozen.numel()}) already exceed the target of {keep} kept "
            "(levels must be given sparsest first, with non-increasing sparsity)"
        )
    s = score.to(torch.float32).clone()
    s[frozen] = float("inf")
    out = torch.zeros_like(frozen)
    if keep > 0:
        idx = torch.topk(s, keep, sorted=False).indices
        out[idx] = True
    return out


def magnitude_mask(
    weight: torch.Tensor,
    sparsity: float,
    structure="unstructured",
    frozen: torch.Tensor | None = None,
    *,
    name: str = "weight",
    score: torch.Tensor | None = None,
) -> torch.Tensor:
    """Magnitude mask of ``weight`` at ``sparsity`` that contains ``frozen``.

    Args:
        weight: float tensor ``[out, in]`` or ``[out, in/groups, kh, kw]`` (any dim >= 1).
        sparsity: fraction of zeros in ``[0, 1)``; for ``N:M`` it is implied (``1 - N/M``) and ignored.
        structure: see :func:`parse_structure`.
        frozen: bool mask of weights that must be kept (same shape), or None.
        name: tensor name for errors.
        score: importance scores of the weight's shape (default ``|weight|``).

    Returns:
        bool tensor, same shape as ``weight``.

    Raises:
        ELSAError: the frozen weights already exceed the target, a frozen group/tile breaks the
            N:M / block structure, or the shape does not suit the structure.
    """
    st = parse_structure(structure)
    if frozen is None:
        frozen = torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
    elif frozen.shape != weight.shape:
        raise ELSAError(f"{name}: frozen mask has shape {tuple(frozen.shape)}, weight has {tuple(weight.shape)}")
    sc = (weight.detach().abs() if score is None else score.detach()).to(torch.float32)
    if st.kind == "unstructured":
        keep = int(round((1.0 - sparsity) * weight.numel()))
        return _topk_mask(sc.reshape(-1), frozen.reshape(-1), keep, name).reshape(weight.shape)
    w2 = _as_2d(sc)
    f2 = _as_2d(frozen)
    rows, cols = w2.shape
    if st.kind == "nm":
        if cols % st.m:
            raise ELSAError(f"{name}: input dimension {cols} is not a multiple of M={st.m} for {st}")
        g = w2.reshape(rows, cols // st.m, st.m).clone()
        fg = f2.reshape(rows, cols // st.m, st.m)
        if fg.numel() and int(fg.sum(-1).max()) > st.n:
            raise ELSAError(f"{name}: frozen weights already exceed {st.n} per group of {st.m}")
        g[fg] = float("inf")
        idx = torch.topk(g, st.n, dim=-1).indices
        out = torch.zeros_like(fg)
        out.scatter_(-1, idx, True)
        return out.reshape(weight.shape)
    # block:RxC on the 2-D view; partial tiles at the edges are ranked by their L2 norm too.
    r, c = st.r, st.c
    nbr, nbc = -(-rows // r), -(-cols // c)
    pad = torch.zeros(nbr * r, nbc * c, dtype=torch.float32, device=weight.device)
    pad[:rows, :cols] = w2 * w2
    tile_score = pad.reshape(nbr, r, nbc, c).sum(dim=(1, 3)).sqrt()
    fpad = torch.zeros(nbr * r, nbc * c, dtype=torch.bool, device=weight.device)
    fpad[:rows, :cols] = f2
    tile_frozen = fpad.reshape(nbr, r, nbc, c).any(dim=3).any(dim=1)
    # tile counts: choose tiles until the kept weight count reaches the target
    cnt = torch.zeros(nbr * r, nbc * c, dtype=torch.float32, device=weight.device)
    cnt[:rows, :cols] = 1
    tile_size = cnt.reshape(nbr, r, nbc, c).sum(dim=(1, 3)).reshape(-1)
    target = (1.0 - sparsity) * weight.numel()
    s = tile_score.reshape(-1).clone()
    s[tile_frozen.reshape(-1)] = float("inf")
    order = torch.argsort(s, descending=True, stable=True)
    cum = torch.cumsum(tile_size[order], 0)
    ntiles = int(torch.searchsorted(cum, torch.tensor(target - 1e-9, device=cum.device)).item()) + 1 if target > 0 else 0
    ntiles = min(ntiles, order.numel())
    # keep the number of tiles whose total is nearest the target
    if 0 < ntiles and ntiles <= order.numel():
        hi = float(cum[ntiles - 1])
        lo = float(cum[ntiles - 2]) if ntiles >= 2 else 0.0
        if abs(lo - target) < abs(hi - target):
            ntiles -= 1
    nfrozen_tiles = int(tile_frozen.sum())
    if nfrozen_tiles > ntiles:
        raise ELSAError(
            f"{name}: the frozen tiles ({nfrozen_tiles}) already exceed the target of {ntiles} {st} tiles"
        )
    keep_tiles = torch.zeros(nbr * nbc, dtype=torch.bool, device=weight.device)
    keep_tiles[order[:ntiles]] = True
    full = keep_tiles.reshape(nbr, 1, nbc, 1).expand(nbr, r, nbc, c).reshape(nbr * r, nbc * c)
    return full[:rows, :cols].reshape(weight.shape).clone()


def mask_structure_ok(mask: torch.Tensor, structure) -> bool:
    """Whether ``mask`` (bool, weight shape) obeys ``structure``: at most N kept per group of M
    along the input dimension, or every block tile all kept or all dropped."""
    st = parse_structure(structure)
    if st.kind == "unstructured":
        return True
    m2 = _as_2d(mask)
    rows, cols = m2.shape
    if st.kind == "nm":
        if cols % st.m:
            return False
        if st.m in _NM_WORDS and m2.dtype == torch.bool and m2.device.type == "cpu":
            return _nm_ok_by_words(m2, st)
        return _nm_ok_by_groups(m2, st)
    r, c = st.r, st.c
    nbr, nbc = -(-rows // r), -(-cols // c)
    pad = torch.zeros(nbr * r, nbc * c, dtype=torch.int32, device=mask.device)
    pad[:rows, :cols] = m2.to(torch.int32)
    real = torch.zeros_like(pad)
    real[:rows, :cols] = 1
    kept = pad.reshape(nbr, r, nbc, c).sum(dim=(1, 3))
    size = real.reshape(nbr, r, nbc, c).sum(dim=(1, 3))
    return bool(((kept == 0) | (kept == size)).all())


def _nm_ok_by_groups(m2: torch.Tensor, st: Structure) -> bool:
    """N:M of a 2-D mask whose columns are a multiple of M: a sum over each group of M."""
    rows, cols = m2.shape
    return bool((m2.reshape(rows, cols // st.m, st.m).sum(-1) <= st.n).all())


#: N:M with M = 2, 4, 8 on a CPU bool mask: the M mask bytes of a group read as one integer;
#: times 0x01..01 puts their sum in the top byte (the partial sums never carry).
_NM_WORDS = {2: (torch.int16, 0x0101, 8), 4: (torch.int32, 0x01010101, 24), 8: (torch.int64, 0x0101010101010101, 56)}


def _nm_ok_by_words(m2: torch.Tensor, st: Structure) -> bool:
    """:func:`_nm_ok_by_groups` with one integer multiply per group (several times faster on a
    large weight: the check every load of an N:M file runs)."""
    word, ones, shift = _NM_WORDS[st.m]
    x = m2.contiguous().view(torch.uint8).reshape(-1).view(word).numpy()  # numpy: fewer passes here
    return bool((((x * x.dtype.type(ones)) >> shift) <= st.n).all())
