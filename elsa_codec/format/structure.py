"""Structured and unstructured magnitude masks, nested on a frozen mask.

A mask is a bool tensor of the weight's shape, ``True`` = kept. Structures (docs/DESIGN.md, "Terms"):
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

from ..checks import check_list
from ..errors import ELSAError

__all__ = ["Structure", "parse_structure", "parse_level", "parse_levels", "mask_structure_ok"]


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
