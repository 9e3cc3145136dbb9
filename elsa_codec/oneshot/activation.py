"""One-shot activation-aware nested levels from calibration inputs: :func:`activation_counters`
(Wanda, RIA; the scores are :mod:`elsa_codec.oneshot.scores`) and the statistics behind them
(:func:`input_norms`: forward hooks, one sum of squares per input feature, never an activation
tensor kept).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_module
from ..errors import ELSAError, ELSATypeError
from ..format.encode import Counters
from ..format.selection import _weighted_modules, transposed_weights
from ..format.structure import parse_levels
from .magnitude import _filter_arg, _magnitude_selection, _tensor_counters
from .scores import _check_method, tensor_activation_counters

logger = logging.getLogger("elsa_codec")

__all__ = ["activation_counters", "weight_statistics", "input_norms", "SCORED_KINDS"]

#: Module kinds (:func:`elsa_codec.format.selection.module_kind`) scored from their inputs; other
#: selected weights (embeddings) get magnitude levels: their input is a one-hot row lookup.
SCORED_KINDS = ("linear", "conv", "conv1d_t")


def _features(m: nn.Module, kind: str, x: torch.Tensor) -> torch.Tensor:
    """The module's input as ``[groups, in_features, tokens]`` columns of its matrix product
    (a convolution's input unfolded, zero padding as ``F.conv`` pads)."""
    if kind == "linear":
        return x.reshape(-1, x.shape[-1]).t().unsqueeze(0)
    if kind == "conv1d_t":
        return x.reshape(-1, m.weight.shape[0]).t().unsqueeze(0)
    if x.dim() == m.weight.dim() - 1:  # an unbatched input
        x = x.unsqueeze(0)
    if m.weight.dim() == 3:  # Conv1d: as a Conv2d of height 1
        x, k, d, p, s = x.unsqueeze(2), (1, *m.kernel_size), (1, *m.dilation), (0, *m.padding), (1, *m.stride)
    else:
        k, d, p, s = m.kernel_size, m.dilation, m.padding, m.stride
    if isinstance(p, str):
        raise ELSAError(f"padding={p!r} convolutions are not supported by activation-aware levels")
    cols = F.unfold(x, k, dilation=d, padding=p, stride=s)  # [B, C * kh * kw, L]
    g = m.groups
    return cols.reshape(cols.shape[0], g, -1, cols.shape[-1]).permute(1, 2, 0, 3).reshape(g, cols.shape[1] // g, -1)


def _hook(fqn: str, kind: str, sums: dict, counts: dict):
    """A forward pre-hook adding the squares of ``fqn``'s input features to ``sums[fqn]``."""
    def hook(m, args, kwargs):
        x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        x = x.detach()
        cols = _features(m, kind, x)
        add = cols.to(torch.float32).pow(2).sum(-1)
        if not torch.isfinite(add).all():
            raise ELSAError(f"{fqn}: NaN or Inf in the input activations during calibration (batch {counts['batches']})")
        sums[fqn] = add if fqn not in sums else sums[fqn].add_(add)
        counts[fqn] = counts.get(fqn, 0) + cols.shape[-1]
    return hook


def _batches(inputs, device) -> Iterable[dict]:
    if isinstance(inputs, (Mapping, torch.Tensor, str, bytes)) or not isinstance(inputs, Iterable):
        raise ELSATypeError(f"inputs must be an iterable of dicts of model keyword arguments (e.g. a list of tokenized "
                            f"batches), got {type(inputs).__name__}")
    for i, b in enumerate(inputs):
        if not isinstance(b, Mapping) or not all(isinstance(k, str) for k in b):
            raise ELSATypeError(f"inputs[{i}] is a {type(b).__name__}, expected a dict of model keyword arguments")
        yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}


def input_norms(model: nn.Module, fqns: Iterable[str], inputs, *, progress: Callable | None = None) -> tuple:
    """Sum over the calibration tokens of the square of each input feature of the modules ``fqns``.

    Runs ``model(**batch)`` for every batch of ``inputs`` in eval mode under
    ``torch.inference_mode()``, with a forward pre-hook on each module that adds
    ``x_j ** 2`` over the batch's tokens in float32 (one ``[groups, in_features]`` vector per
    module; the activation itself is never kept). Hooks are removed and the train/eval mode put
    back also when a batch fails.

    Args:
        model: the model; batches are moved to the device of its first parameter.
        fqns: module names (Linear, Conv1d/2d, transformers Conv1D).
        inputs: an iterable of dicts of keyword arguments (tokenized batches).
        progress: called with each finished batch's index.

    Returns:
        ``({fqn: float32 [groups, in_features]}, {fqn: tokens seen}, batches)``.

    Raises:
        ELSAError: no batch; a module never called; NaN or Inf in an input (naming the module).
        ELSATypeError: ``inputs`` not an iterable of dicts.
    """
    mods = _weighted_modules(model)
    sums, counts = {}, {"batches": 0}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    handles = [mods[f][0].register_forward_pre_hook(_hook(f, mods[f][1], sums, counts), with_kwargs=True) for f in fqns]
    was = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.inference_mode():
            for b in _batches(inputs, device):
                model(**b)
                if progress is not None:
                    progress(counts["batches"])
                counts["batches"] += 1
    finally:
        for h in handles:
            h.remove()
        for m, t in was.items():
            m.training = t
    n = counts.pop("batches")
    if n == 0:
        raise ELSAError("inputs: no calibration batch (give at least one dict of model keyword arguments)")
    missing = [f for f in fqns if f not in sums]
    if missing:
        raise ELSAError(f"{missing[0]}: the module was never called on the calibration inputs (no statistics)")
    return sums, counts, n


def activation_counters(
    model: nn.Module,
    levels,
    inputs,
    *,
    method: str = "wanda",
    structure: str = "unstructured",
    select: str | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> Counters:
    """One-shot nested activation-aware levels from calibration inputs (no weight update).

    Each selected weight gets one score per entry from the model's own activations on
    ``inputs`` (Wanda: ``|W_ij| * ||X_j||_2``; RIA: relative importance in row and column times
    ``||X_j||_2 ** 0.5``; :mod:`elsa_codec.oneshot.scores` gives the sources); level ``t`` keeps the
    highest scores, so the levels nest. The statistics come from forward hooks, one module's
    ``[in_features]`` sums of squares in float32, on the model's device (:func:`input_norms`).

    Args:
        model: the dense model (not modified; run in eval mode, its mode put back).
        levels: sparsest first, as :func:`elsa_codec.magnitude_counters` (``[0.9, 0.7, 0.5]`` or
            ``["2:4"]``).
        inputs: an iterable of dicts of the model's keyword arguments, e.g.
            ``[tokenizer(texts, return_tensors="pt", padding=True), ...]`` (a padded token counts:
            give ``attention_mask`` and prefer unpadded windows of text).
        method: ``"wanda"`` (default) or ``"ria"``.
        structure: ``"unstructured"`` (compared within each output row, as both papers do) or
            ``"block:RxC"``; N:M levels compare within each group of M along the input dimension.
        select, filter_fn: which weights carry levels, as :func:`elsa_codec.magnitude_counters`
            (default: the blocks' linear layers). A selected embedding gets magnitude levels
            (logged): a row lookup has no input features to weigh.

    A tie group (one Parameter under several names) is scored once, from the inputs of every
    module that uses it.

    Returns:
        :class:`~elsa_codec.Counters` with the meaning and shapes of :func:`magnitude_counters`.

    Raises:
        ELSAError: unknown method; bad levels or selection (as ``magnitude_counters``); no batch;
            a selected module not called by the model; NaN or Inf in a module's input (named).
        ELSATypeError: ``model`` not a Module; ``inputs`` not an iterable of dicts.

    Example::

        >>> import torch, elsa_codec as ec
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
        >>> batches = [{"input": torch.randn(4, 16)} for _ in range(2)]
        >>> c = ec.activation_counters(model, [0.75, 0.5], batches, filter_fn=lambda m, fqn: True)
        >>> sorted(c), c.num_levels
        (['0.weight', '2.weight'], 2)
    """
    check_module(model, "model", "activation_counters", order="activation_counters(model, levels, inputs)")
    _check_method(method)
    specs = parse_levels(levels, structure)
    sd = model.state_dict()
    sel = _magnitude_selection(sd, None, model, _filter_arg(select, filter_fn))
    stats, tokens, n = weight_statistics(model, sel, inputs)
    transposed = transposed_weights(model) & set(sel)
    out = {}
    for name in sel:
        if name in stats:
            out[name] = tensor_activation_counters(sd[name], specs, stats[name], method, transposed=name in transposed,
                                                   name=name)
        else:
            logger.info("activation_counters: %s has no input features to weigh (an embedding): magnitude levels", name)
            out[name] = _tensor_counters(sd[name], specs, None, name, name in transposed)
    logger.info("activation_counters: %s levels of %d tensors from %d batches (%d tokens)", method, len(out), n, tokens)
    return Counters(out, len(specs), [str(st) for _, st in specs], transposed=transposed)


def weight_statistics(model: nn.Module, names: list, inputs, *, progress: Callable | None = None) -> tuple:
    """The input statistics of the weights ``names`` (one name per tie group) on ``inputs``.

    Returns:
        ``({name: float32 [groups, in_features]}, tokens, batches)``: the sum of squares of each
        input feature over the tokens of every module whose weight is that tensor (a weight used
        by several modules sums the inputs of all its uses); names whose modules are not scored
        (:data:`SCORED_KINDS`: embeddings) are absent. ``tokens``: the most any module saw.

    Raises:
        As :func:`input_norms`.
    """
    users = _users(model, names)
    scored = sorted({f for fs in users.values() for f in fs})
    if not scored:
        return {}, 0, 0
    sums, counts, n = input_norms(model, scored, inputs, progress=progress)
    out = {}
    for name, fs in users.items():
        if fs:
            ss = sums[fs[0]]
            for f in fs[1:]:
                ss = ss + sums[f]
            out[name] = ss
    return out, max(counts.values(), default=0), n


def _users(model: nn.Module, sel: list) -> dict:
    """``{selected name: [fqn of every scored module whose weight is that tensor]}``."""
    by_id = {id(p): n for n, p in model.named_parameters(remove_duplicate=False) if n in sel}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), n)
    out = {n: [] for n in sel}
    for fqn, (m, kind) in _weighted_modules(model).items():
        owner = by_id.get(id(m.weight))
        if owner in out and kind in SCORED_KINDS:
            out[owner].append(fqn)
    return out
