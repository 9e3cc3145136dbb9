"""One-shot magnitude masks of one tensor: keep the largest ``|w|`` (unstructured), the largest N
of each group of M along the input dimension (N:M), or the tiles of largest L2 norm (block),
nested inside an already frozen mask.
"""
from __future__ import annotations

import torch

from ..errors import ELSAError
from ..format.structure import _as_2d, parse_structure

__all__ = ["magnitude_mask"]


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
    w2, f2 = _as_2d(sc), _as_2d(frozen)
    if st.kind == "nm":
        return _nm_mask(w2, f2, st, name).reshape(weight.shape)
    return _block_mask(w2, f2, st, sparsity, weight.numel(), name).reshape(weight.shape)


def _nm_mask(w2: torch.Tensor, f2: torch.Tensor, st, name: str) -> torch.Tensor:
    """The N:M mask of the 2-D scores ``w2`` ``[rows, cols]`` holding the frozen ``f2``."""
    rows, cols = w2.shape
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
    return out


def _block_mask(w2: torch.Tensor, f2: torch.Tensor, st, sparsity: float, numel: int, name: str) -> torch.Tensor:
    """The block:RxC mask of the 2-D scores ``w2`` ``[rows, cols]`` holding the frozen tiles of ``f2``;
    partial tiles at the edges are ranked by their L2 norm too."""
    rows, cols = w2.shape
    device = w2.device
    r, c = st.r, st.c
    nbr, nbc = -(-rows // r), -(-cols // c)
    pad = torch.zeros(nbr * r, nbc * c, dtype=torch.float32, device=device)
    pad[:rows, :cols] = w2 * w2
    tile_score = pad.reshape(nbr, r, nbc, c).sum(dim=(1, 3)).sqrt()
    fpad = torch.zeros(nbr * r, nbc * c, dtype=torch.bool, device=device)
    fpad[:rows, :cols] = f2
    tile_frozen = fpad.reshape(nbr, r, nbc, c).any(dim=3).any(dim=1)
    # tile counts: choose tiles until the kept weight count reaches the target
    cnt = torch.zeros(nbr * r, nbc * c, dtype=torch.float32, device=device)
    cnt[:rows, :cols] = 1
    tile_size = cnt.reshape(nbr, r, nbc, c).sum(dim=(1, 3)).reshape(-1)
    target = (1.0 - sparsity) * numel
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
    keep_tiles = torch.zeros(nbr * nbc, dtype=torch.bool, device=device)
    keep_tiles[order[:ntiles]] = True
    full = keep_tiles.reshape(nbr, 1, nbc, 1).expand(nbr, r, nbc, c).reshape(nbr * r, nbc * c)
    return full[:rows, :cols].clone()
