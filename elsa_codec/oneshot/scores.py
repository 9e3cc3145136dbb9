"""Activation-aware scores of one weight and the nested counters they give (Wanda, RIA).

A level is a threshold on one score per weight, so one score makes nested levels by
construction; no weight is updated (SparseGPT's reconstruction changes the values and cannot be
shared by several levels of one tensor set).

- Wanda (Sun et al., "A Simple and Effective Pruning Approach for Large Language Models",
  arXiv 2306.11695, sec. 3): ``S_ij = |W_ij| * ||X_j||_2``, compared within each output row.
- RIA (Zhang et al., "Plug-and-Play: An Efficient Post-training Pruning Method for Large
  Language Models", ICLR 2024, sec. 3): ``S_ij = (|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|)
  * ||X_j||_2 ** a`` with ``a = 0.5``, compared within each output row.

``||X_j||_2`` is the L2 norm of input feature ``j`` over every calibration token; it is passed as
``sumsq``, the sum of squares ``[groups, in_features]`` (``groups`` = 1 but for a grouped
convolution, whose row ``o`` reads the inputs of group ``o // (out / groups)``).
"""
from __future__ import annotations

import torch

from ..errors import ELSAError
from ..format.encode import counter_dtype
from ..format.structure import _as_2d
from .masks import magnitude_mask

__all__ = ["METHODS", "RIA_ALPHA", "activation_scores", "tensor_activation_counters", "row_counters"]

#: The activation-aware one-shot methods.
METHODS = ("wanda", "ria")

#: RIA's exponent on the activation norm (Zhang et al. 2024, sec. 3: a = 0.5).
RIA_ALPHA = 0.5

#: Rows ranked at once by :func:`row_counters` (bounds the int64 sort buffers).
_ROW_CHUNK = 256


def _check_method(method) -> str:
    if method not in METHODS:
        raise ELSAError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    return method


def activation_scores(w2: torch.Tensor, sumsq: torch.Tensor, method: str, *, name: str = "weight") -> torch.Tensor:
    """The score of every weight of the 2-D view ``w2`` ``[out_features, in_features]`` (float32).

    Args:
        w2: the weight as ``[out, in]`` (a Conv2d weight as ``[out, in/groups * kh * kw]``).
        sumsq: float32 ``[groups, in]``: the sum over calibration tokens of each input feature's
            square (``groups`` divides ``out``).
        method: ``"wanda"`` or ``"ria"`` (module docstring).
        name: the tensor's name for errors.

    Raises:
        ELSAError: unknown method; ``sumsq`` of the wrong shape, negative or not finite.
    """
    _check_method(method)
    rows, cols = w2.shape
    if sumsq.dim() != 2 or sumsq.shape[1] != cols or sumsq.shape[0] < 1 or rows % sumsq.shape[0]:
        raise ELSAError(f"{name}: input statistics of shape {tuple(sumsq.shape)} do not fit the weight "
                        f"[{rows}, {cols}] (expected [groups, {cols}], groups dividing {rows})")
    if not torch.isfinite(sumsq).all() or bool((sumsq < 0).any()):
        raise ELSAError(f"{name}: the input statistics hold NaN, Inf or negative values")
    g = sumsq.shape[0]
    a = w2.detach().to(torch.float32).abs().reshape(g, rows // g, cols)
    norm = sumsq.to(a.device, torch.float32).sqrt().unsqueeze(1)  # ||X_j||_2, [g, 1, in]
    if method == "wanda":
        return (a * norm).reshape(rows, cols)
    col = a.sum(dim=1, keepdim=True)  # sum over the rows of each input column (within its group)
    row = a.sum(dim=2, keepdim=True)
    rel = torch.where(col > 0, a / col, 0.0) + torch.where(row > 0, a / row, 0.0)
    return (rel * norm.pow(RIA_ALPHA)).reshape(rows, cols)


def row_counters(score: torch.Tensor, sparsities: list, dtype: torch.dtype) -> torch.Tensor:
    """Nested unstructured counters ``1..T+1`` compared within each row of ``score`` ``[rows, cols]``.

    Level ``t`` keeps, in every row, the ``round((1 - s_t) * cols)`` highest scores; ties go to
    the lowest column (a stable descending sort), so the levels nest and every row's counts are
    exact. Counter = ``1 + #{t : rank >= keep_t}``.
    """
    rows, cols = score.shape
    keeps = torch.tensor([int(round((1.0 - s) * cols)) for s in sparsities], dtype=torch.int64, device=score.device)
    out = torch.empty(rows, cols, dtype=dtype, device=score.device)
    ar = torch.arange(cols, device=score.device)
    for r0 in range(0, rows, _ROW_CHUNK):
        s = score[r0:r0 + _ROW_CHUNK]
        order = torch.argsort(s, dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, ar.expand_as(order))
        out[r0:r0 + _ROW_CHUNK] = 1 + (rank.unsqueeze(-1) >= keeps).sum(-1).to(dtype)
    return out


def tensor_activation_counters(weight: torch.Tensor, specs: list, sumsq: torch.Tensor, method: str, *,
                               transposed: bool = False, name: str = "weight") -> torch.Tensor:
    """Counters (``weight``'s shape, values ``1..T+1``) of nested activation-aware levels.

    Args:
        weight: ``[out, in]`` (Linear), ``[out, in/groups, k...]`` (Conv1d/2d) or, with
            ``transposed``, ``[in, out]`` (transformers ``Conv1D``). Not modified.
        specs: ``[(sparsity, Structure)]`` sparsest first
            (:func:`elsa_codec.format.structure.parse_levels`).
        sumsq: float32 ``[groups, in * k...]``, as :func:`activation_scores`.
        method: ``"wanda"`` or ``"ria"``.

    Unstructured levels compare within each output row (both papers' comparison group); N:M
    levels keep the N best scores of each group of M along the input dimension; block levels keep
    the tiles of highest score L2 norm over the tensor (as :func:`elsa_codec.magnitude_mask`
    does with ``|w|``).

    Returns:
        ``uint8`` counters (``int16`` for 255 levels).

    Raises:
        ELSAError: as :func:`activation_scores`; shapes that do not suit the structure.
    """
    w = weight.t() if transposed else weight
    score = activation_scores(_as_2d(w), sumsq, method, name=name)
    T, dt = len(specs), counter_dtype(len(specs))
    if all(st.kind == "unstructured" for _, st in specs):
        c = row_counters(score, [s for s, _ in specs], dt)
    else:
        c = torch.full(score.shape, T + 1, dtype=torch.int64, device=score.device)
        frozen = None
        for s, st in specs:
            m = magnitude_mask(score, s, st, frozen, name=name, score=score)
            c -= m.to(torch.int64)
            frozen = m
        c = c.to(dt)
    c = c.reshape(w.shape)
    return c.t().contiguous() if transposed else c
