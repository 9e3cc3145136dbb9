"""Per-level batch-norm statistics (ELSA, arXiv 2312.06872, section 2.2).

Each level is a different network, so its batch-norm layers need their own running statistics:
after training, the statistics are recomputed for every level ``1..T+1`` from calibration
batches (:func:`level_bn_stats`) and stored in the file beside the weights.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn

from ..errors import ELSAError
from ..progress import progress_bar

__all__ = ["recalibrate_bn", "level_bn_stats", "bn_modules", "calibration_batches"]


def _batch_forward(model: nn.Module, batch):
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        return model(batch[0])
    raise ELSAError(f"cannot feed a batch of type {type(batch).__name__} to the model; pass bn_forward=")


def bn_modules(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """``fqn -> module`` of the batch-norm layers that track running statistics (names of the
    bare model: wrapper prefixes stripped)."""
    from ..wrappers import strip_wrapper_prefix, unwrap_model

    return {
        strip_wrapper_prefix(n): m
        for n, m in unwrap_model(model).named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None
    }


def calibration_batches(batches, num_batches):
    """Calibration batches that can be walked once per level: an iterable or a callable is kept,
    a one-shot iterator is read into a list (at most ``num_batches``).

    Raises:
        ELSAError: ``batches`` is neither an iterable nor a callable.
    """
    if batches is None:
        return None
    if callable(batches) and not isinstance(batches, torch.Tensor):
        return batches
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    try:
        it = iter(batches)
    except TypeError:
        raise ELSAError(f"bn_calibration must be an iterable of batches or a callable returning one, got {type(batches).__name__}") from None
    if it is batches:  # a one-shot iterator: keep the batches for every level
        out = []
        for b in it:
            out.append(b)
            if num_batches is not None and len(out) >= num_batches:
                break
        return out
    return batches


def recalibrate_bn(
    model: nn.Module,
    batches,
    *,
    num_batches: int | None = None,
    bn_forward: Callable | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Recompute the batch-norm running statistics of ``model`` with its current weights.

    Resets every BatchNorm's running statistics, then runs forward passes in train mode without
    gradients over ``batches`` with a cumulative average (``momentum=None``), so the statistics
    are the exact mean over the batches. Module modes and momenta are restored afterwards; the new
    statistics stay in the model. ELSA section 2.2 (per-level batch-norm statistics).

    Args:
        model: any module; without BatchNorm layers nothing happens.
        batches: iterable of batches (``Tensor`` -> ``model(x)``; tuple/list -> ``model(b[0])``;
            dict -> ``model(**b)``), or a callable returning such an iterable.
        num_batches: use at most this many batches (None: all).
        bn_forward: ``fn(model, batch)`` to run one forward pass instead.

    Returns:
        ``{bn_module_fqn: {"running_mean", "running_var", "num_batches_tracked": Tensor}}`` (clones).

    Raises:
        ELSAError: no batch seen, or a batch the model cannot take; ``model`` not a module.
    """
    from ..checks import check_module

    check_module(model, "model", "recalibrate_bn")
    bns = bn_modules(model)
    if not bns:
        return {}
    src = batches() if callable(batches) else batches
    saved_mode = {n: m.training for n, m in model.named_modules()}
    saved_mom = {n: m.momentum for n, m in bns.items()}
    fwd = bn_forward or _batch_forward
    seen = 0
    try:
        for m in bns.values():
            m.reset_running_stats()
            m.momentum = None
        model.train()
        with torch.no_grad():
            for b in src:
                if num_batches is not None and seen >= num_batches:
                    break
                fwd(model, b)
                seen += 1
    finally:
        for n, m in bns.items():
            m.momentum = saved_mom[n]
        for n, m in model.named_modules():
            m.training = saved_mode.get(n, m.training)
    if seen == 0:
        raise ELSAError("batch-norm recalibration saw no batch: bn_calibration is empty")
    return {
        n: {
            "running_mean": m.running_mean.detach().clone(),
            "running_var": m.running_var.detach().clone(),
            "num_batches_tracked": m.num_batches_tracked.detach().clone(),
        }
        for n, m in bns.items()
    }


def level_bn_stats(
    model: nn.Module,
    counters: Mapping[str, torch.Tensor],
    batches,
    *,
    num_levels: int | None = None,
    num_batches: int | None = None,
    bn_forward: Callable | None = None,
    progress: bool = False,
    params: Mapping[str, torch.Tensor] | None = None,
) -> dict[int, dict]:
    """Per-level batch-norm statistics: for each level ``t = 1..T+1``, the weights named in
    ``counters`` are replaced by the level's network ``where(counter <= t, W, 0)`` and the
    statistics recalibrated (:func:`recalibrate_bn`). The weights are restored afterwards and the
    model's own statistics are left at the dense level's.

    Args:
        model: the model; ``counters`` names its parameters.
        counters: ``name -> integer Tensor`` of counters ``1..T+1``.
        batches, num_batches, bn_forward: as in :func:`recalibrate_bn`.
        num_levels: T (default ``counters.num_levels``).
        progress: a tqdm bar over the levels (one line on stderr when it is not a terminal: :mod:`elsa_codec.progress`).
        params: ``name -> Parameter`` for the names of ``counters`` (default: the model's
            ``named_parameters()``; give it for a wrapped model or tied weights).

    Returns:
        ``{level: {bn_module_fqn: {stat: Tensor}}}`` for levels ``1..T+1`` (``{}`` without BatchNorm).
    """
    if not bn_modules(model):
        return {}
    T = num_levels if num_levels is not None else counters.num_levels
    params = dict(model.named_parameters()) if params is None else params
    saved = {n: params[n].detach().clone() for n in counters}
    out = {}
    try:
        for t in progress_bar(range(1, T + 2), desc="batch-norm recalibration", unit="level", enabled=progress, leave=False):
            with torch.no_grad():
                for n, c in counters.items():
                    p = params[n]
                    p.copy_(torch.where(c.to(p.device) <= t, saved[n], torch.zeros((), dtype=p.dtype, device=p.device)))
            out[t] = recalibrate_bn(model, batches, num_batches=num_batches, bn_forward=bn_forward)
    finally:
        with torch.no_grad():
            for n in counters:
                params[n].copy_(saved[n])
    return out
