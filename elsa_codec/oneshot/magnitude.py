"""One-shot nested magnitude levels (no training): :func:`magnitude_counters`, per tensor
(:func:`tensor_magnitude_counters`) and which tensors carry levels (:func:`select_tensors`).
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Mapping

import torch

from ..checks import check_list, check_removed, check_state_dict
from ..errors import ELSAError, ELSATypeError
from ..format.encode import Counters, counter_dtype
from ..format.selection import DEFAULT_SELECT, SELECT_POLICIES, select_weights, tie_groups, transposed_weights
from ..format.structure import parse_levels
from .masks import magnitude_mask
from .thresholds import _kth_largest, global_thresholds

logger = logging.getLogger("elsa_codec")

#: Keywords removed in 0.2 (CHANGELOG.md), each with its replacement.
_REMOVED = {"sparsifier": "distribution= (the one-shot name: 'uniform' or 'global')"}

__all__ = ["magnitude_counters", "tensor_magnitude_counters", "select_tensors", "default_prunable"]


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
    distribution: str = "uniform",
    names: Iterable[str] | None = None,
    model: torch.nn.Module | None = None,
    select: str | None = None,
    filter_fn: Callable[[torch.nn.Module, str], bool] | None = None,
    **removed,
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
        distribution: how a level's sparsity spreads over the tensors: ``"uniform"`` (default;
            each tensor at the level's sparsity) or ``"global"`` (one magnitude threshold across the
            tensors per level; block structures then use each tensor's resulting sparsity).
        names: without a model, the tensors to encode: a list of names.
        model: the model the state dict belongs to (when ``state_dict`` is a mapping): selects by
            module type (:func:`elsa_codec.select_weights`) and knows which weights are
            transposed (``transformers`` ``Conv1D`` `[in, out]`: N:M groups and blocks are laid
            along its dim 0, the input dimension).
        select: with a model, the selection policy: ``"blocks"`` (default; the linear layers of
            the blocks, embeddings and output head dense: the SparseGPT / Wanda convention),
            ``"blocks+head"``, ``"all"`` (also embeddings).
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
        ELSATypeError: a keyword removed in 0.2 (``sparsifier=``: use ``distribution=``; a
            ``select`` or ``names`` predicate: use ``filter_fn=``), naming its replacement.

    Example::

        >>> import torch, elsa_codec as ec
        >>> c = ec.magnitude_counters({"fc.weight": torch.randn(8, 16)}, [0.75, 0.5])
        >>> c.num_levels, sorted(c["fc.weight"].unique().tolist())
        (2, [1, 2, 3])
    """
    check_removed("magnitude_counters", removed, _REMOVED)
    model, state_dict, names = _check_inputs(state_dict, model, names)
    select = _filter_arg(select, filter_fn)
    specs = parse_levels(levels, structure, distribution)
    sps = [s for s, _ in specs]
    sel = _magnitude_selection(state_dict, names, model, select)
    transposed = transposed_weights(model) & set(sel) if model is not None else set()
    thr = None
    if distribution == "global" and specs[0][1].kind != "nm":
        thr = global_thresholds(lambda n: state_dict[n], sel, sps)
    out = {n: _tensor_counters(state_dict[n], specs, thr, n, n in transposed) for n in sel}
    return Counters(out, len(specs), [str(st) for _, st in specs], transposed=transposed)


def _check_inputs(state_dict, model, names) -> tuple:
    """``(model, state_dict, names)`` of :func:`magnitude_counters`, checked (a model as the first argument)."""
    if isinstance(state_dict, torch.nn.Module):
        if model is not None and model is not state_dict:
            raise ELSAError("magnitude_counters: pass the model once (as the first argument or as model=)")
        model, state_dict = state_dict, state_dict.state_dict()
    check_state_dict(state_dict, "state_dict", "magnitude_counters")
    if model is not None and not isinstance(model, torch.nn.Module):
        raise ELSATypeError(f"magnitude_counters: model must be a torch.nn.Module, got {type(model).__name__}")
    if names is not None:
        if callable(names):
            raise ELSATypeError("magnitude_counters: names= takes a list of tensor names; a (name, tensor) predicate "
                                "was removed in 0.2: pass the model with filter_fn=(module, fqn) -> bool")
        names = check_list(names, "names", "magnitude_counters", "['fc1.weight', 'fc2.weight']")
    return model, state_dict, names


def _tensor_counters(w: torch.Tensor, specs: list, thr, name: str, transposed: bool) -> torch.Tensor:
    """:func:`tensor_magnitude_counters` of one weight; a transposed ``[in, out]`` weight has its N:M
    groups and blocks along dim 0."""
    if transposed and specs[0][1].kind != "unstructured":
        return tensor_magnitude_counters(w.t(), specs, thr, name=name).t().contiguous().to(counter_dtype(len(specs)))
    return tensor_magnitude_counters(w, specs, thr, name=name).to(counter_dtype(len(specs)))


def _filter_arg(select, filter_fn):
    """The selection predicate ``(fqn, module)`` from ``filter_fn`` ``(module, fqn)``, or the policy."""
    if callable(select):
        raise ELSATypeError("magnitude_counters: select= takes a policy name (" + ", ".join(map(repr, SELECT_POLICIES))
                            + "); a (fqn, module) predicate was removed in 0.2: pass filter_fn=(module, fqn) -> bool")
    if filter_fn is not None:
        if not callable(filter_fn):
            raise ELSAError(f"filter_fn must be a callable (module, fqn) -> bool, got {type(filter_fn).__name__}")
        if select is not None:
            raise ELSAError("pass either select= (a policy) or filter_fn=, not both")
        return lambda fqn, m: filter_fn(m, fqn)
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


def select_tensors(names, candidates: Mapping, get_tensor, source: str) -> list:
    """The tensors to encode among ``candidates`` (``name -> tensor``, or a stand-in with the right
    ``dim()`` and floating-point-ness): ``names`` as a list, or None for :func:`default_prunable`.
    ``get_tensor`` is kept for the callers' symmetry; no tensor data is read.

    Raises:
        ELSAError: a listed name not in ``source``, nothing selected, a non-floating tensor.
    """
    if names is None:
        sel = [n for n, t in candidates.items() if isinstance(t, torch.Tensor) and default_prunable(n, t)]
    elif callable(names):
        raise ELSATypeError("names= takes a list of tensor names; a (name, tensor) predicate was removed in 0.2 "
                            "(CHANGELOG.md): list the names, or pass the model with filter_fn=(module, fqn) -> bool")
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

    ``specs``: ``[(sparsity, Structure)]`` sparsest first (:func:`elsa_codec.format.structure.parse_level`).
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
