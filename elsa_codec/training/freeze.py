"""Freeze and encode (ELSA sec. 2.1-2.2; docs/DESIGN.md "The code rule"), and the checks before a run.

A level's weights are encoded with their code ``t - 1`` the moment they are frozen, so the sparse
network that was evaluated is bit for bit the one that ships; the dense-only weights are encoded
with code ``T`` last.
"""
from __future__ import annotations

import math

import torch

from ..errors import ELSAError
from ..format.bits import check_code_bits, encode_tensor
from .distributed import local_tensor
from .state import MaskState

__all__ = ["encode_as", "freeze_level", "encode_dense_rest", "check_prunable", "check_encode_dtype", "input_dim"]


def input_dim(w: torch.Tensor, transposed: bool = False) -> int:
    """The input dimension N:M groups lie along: dim 0 of a transposed (transformers ``Conv1D``,
    `[in, out]`) weight, else the flattened `[in/groups * kh * kw]` of `[out, ...]`."""
    if transposed:
        return w.shape[0]
    return math.prod(w.shape[1:]) if w.dim() >= 2 else w.numel()


def encode_as(p: torch.Tensor, code: int, k: int, name: str, dt) -> torch.Tensor:
    """``p`` encoded with ``code`` everywhere, in ``dt`` when given (returned in ``p``'s dtype, exactly)."""
    codes = torch.full(p.shape, code, dtype=torch.int32, device=p.device)
    if dt is None or dt == p.dtype:
        return encode_tensor(p.detach(), codes, k, name=name)
    return encode_tensor(p.detach().to(dt), codes, k, name=name).to(p.dtype)


@torch.no_grad()
def freeze_level(state: MaskState, counters: dict, t: int, k: int, dt) -> None:
    """Freeze the weights of the current mask that are not frozen yet as level ``t``: encode
    them with code ``t - 1``, set their counters to ``t``, zero the pruned weights (element-wise:
    on the local shards when sharded, no communication)."""
    for n, p in state.local_weights().items():
        mask = state.mask[n] if state.mask is not None else torch.ones_like(state.frozen[n])
        new = mask & ~state.frozen[n]
        p.copy_(torch.where(new, encode_as(p, t - 1, k, n, dt), p))
        p.masked_fill_(~mask, 0)
        counters[n][new] = t
    state.freeze({n: (state.mask[n] if state.mask is not None else torch.ones_like(f)) for n, f in state.frozen.items()})


@torch.no_grad()
def encode_dense_rest(state: MaskState, T: int, k: int, dt) -> None:
    """Encode the dense-only weights (not frozen yet) with code ``T`` and freeze everything."""
    state.set_mask(None)
    for n, p in state.local_weights().items():
        new = ~state.frozen[n]
        p.copy_(torch.where(new, encode_as(p, T, k, n, dt), p))
    state.freeze({n: torch.ones_like(f) for n, f in state.frozen.items()})


@torch.no_grad()
def round_shared(named: dict, dt) -> None:
    """Round the shared parameters frozen with level 1 to ``dt`` (exactly representable in the file)."""
    if dt is None:
        return
    for p in named.values():
        p = local_tensor(p)
        if p.is_floating_point() and p.dtype != dt:
            p.copy_(p.to(dt).to(p.dtype))


def check_prunable(params: dict, specs, k: int, T: int, transposed=frozenset()) -> None:
    """Before any change: code bits fit each weight's dtype, weights finite, N:M fits the input dim.

    Raises:
        ELSAError: naming the tensor.
    """
    st = specs[-1][1]
    for n, p in params.items():
        check_code_bits(p.dtype, k, T, name=n)
        if not torch.isfinite(local_tensor(p)).all():
            raise ELSAError(f"{n}: weights must be finite before ELSA training")
        cols = input_dim(p, n in transposed)
        if st.kind == "nm" and cols % st.m:
            raise ELSAError(
                f"{n}: input dimension {cols} is not a multiple of M={st.m} for the {st} levels; "
                "leave this layer out with select= or filter_fn="
            )


def check_encode_dtype(dt, params: dict, k: int, T: int):
    """``encode_dtype`` checked against the weights (float32 master weights or the same dtype).

    Raises:
        ELSAError: a dtype other than float32/float16/bfloat16, narrower weights, too many code bits.
    """
    if dt is None:
        return None
    if dt not in (torch.float32, torch.float16, torch.bfloat16):
        raise ELSAError(f"encode_dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dt!r}")
    for n, p in params.items():
        if p.dtype != dt and p.dtype != torch.float32:
            raise ELSAError(
                f"{n}: cannot ship {p.dtype} weights as {dt}: encode_dtype must equal the weights' dtype, or the "
                "weights must be float32 (master weights)"
            )
        check_code_bits(dt, k, T, name=n)
    return dt
