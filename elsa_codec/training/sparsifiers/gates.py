"""Shared machinery of the sparsifiers that train extra per-weight parameters (L0 gates, sparse
variational dropout): installed on the prunable weights with ``torch.nn.utils.parametrize`` at the
start of a sparsify phase and removed at its end, so the model handed back has plain weights and the
file format is unchanged.

The original weight stays the same ``Parameter`` object (``module.parametrizations.weight.original``),
so ELSA's optimizer hooks, masks and frozen-bit checks keep working on it; the extra parameters
are new ``Parameter`` objects inside the parametrization, which the optimizer that ``train_fn``
creates for the phase picks up from ``model.parameters()``. The phase's loss term is
:func:`sparsity_penalty`.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from ...errors import ELSAError
from .base import MagnitudeSparsifier
from .random_pruning import _tensor_seed

__all__ = ["PenaltyParametrization", "GatedSparsifier", "sparsity_penalty"]


class PenaltyParametrization(nn.Module):
    """A parametrization of one prunable weight `[out, in, ...]` that has a loss term.

    Args:
        weight: the weight (its shape, dtype and device).
        frozen: bool `[weight shape]`: weights held deterministic and out of the penalty.
    """

    def __init__(self, weight: torch.Tensor, frozen: torch.Tensor):
        super().__init__()
        self.generator = None  # the noise's own generator (set by the sparsifier: runs reproduce)
        self.register_buffer("frozen", frozen.to(device=weight.device, dtype=torch.bool).clone())
        self.register_buffer("free_count", (~self.frozen).sum().to(torch.float32))
        self.coefficient = 1.0  # the penalty's weight in :func:`sparsity_penalty` (set by the sparsifier)

    def penalty(self) -> torch.Tensor:
        """The loss term summed over the non-frozen weights (scalar float32)."""
        raise NotImplementedError

    def score(self, weight: torch.Tensor) -> torch.Tensor:
        """Importance of each weight `[weight shape]` float32 (higher = kept first), given the
        weight's current values."""
        raise NotImplementedError


def sparsity_penalty(model: nn.Module) -> torch.Tensor:
    """The loss term of the sparsifier training ``model`` now: the sum of every installed
    :class:`PenaltyParametrization`'s penalty times its ``coefficient`` (L0, variational dropout:
    the sparsifier's ``strength`` divided by the number of non-frozen weights covered, so a mean;
    the pruning pipeline's learned mask: its ``mask_strength``, so a sum); a zero tensor when none
    is installed (outside the sparsify phases of those methods). Add it to the loss in ``train_fn``::

        loss = F.cross_entropy(model(x), y) + ec.sparsity_penalty(model)
    """
    sums: dict = {}  # coefficient -> sum of the penalties that share it (summed first, then scaled)
    for m in model.modules():
        if isinstance(m, PenaltyParametrization):
            p = m.penalty()
            sums[m.coefficient] = p if m.coefficient not in sums else sums[m.coefficient] + p
    if not sums:
        return torch.zeros(())
    return sum(total * c for c, total in sums.items())


def _owners(model: nn.Module, params: dict) -> dict:
    """``name -> (module, attribute)`` of each prunable weight, found by identity."""
    want = {id(p): n for n, p in params.items()}
    out = {}
    for mod in model.modules():
        for attr, p in list(mod._parameters.items()):
            if p is not None and id(p) in want:
                out[want[id(p)]] = (mod, attr)
    missing = [n for n in params if n not in out]
    if missing:
        raise ELSAError(f"{missing[0]}: the weight is not a parameter of the model given to the sparsifier")
    return out


class GatedSparsifier(MagnitudeSparsifier):
    """Base of L0, sparse variational dropout and the pruning pipeline's learned mask: per-weight
    parameters trained during a sparsify phase, then a ranking of the non-frozen weights by their
    :meth:`PenaltyParametrization.score` to the level's exact target: one global ranking by default
    (the per-layer distribution is learned, not set), or within each tensor for a ``"uniform"`` /
    ``"erk"`` ``distribution``. Unstructured levels only; one process (not DDP / FSDP)."""

    gradual = False
    adds_parameters = True
    #: True: the penalty is ``strength`` times the mean over the non-frozen weights; False: times the sum.
    penalty_mean = True

    def __init__(self, strength: float, init: float, seed: int = 0, distribution: str = "global"):
        super().__init__(distribution, score=self._learned_score)
        name = type(self).__name__
        if not float(strength) >= 0.0:
            raise ELSAError(f"{name}: strength must be >= 0, got {strength!r}")
        if not math.isfinite(float(init)):
            raise ELSAError(f"{name}: init must be finite, got {init!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ELSAError(f"{name}: seed must be an int, got {seed!r}")
        self.strength, self.init, self.seed, self.phases = float(strength), float(init), seed, 0
        self._installed: dict = {}
        self.learned_scores: dict = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(strength={self.strength}, init={self.init}, seed={self.seed})"

    def make(self, weight: torch.Tensor, frozen: torch.Tensor) -> PenaltyParametrization:
        raise NotImplementedError

    def _learned_score(self, name, weight):
        """The learned score once a phase ended; |weight| before (the up-front check of prune_gmp)."""
        s = self.learned_scores.get(name)
        return weight.detach().abs() if s is None or s.shape != weight.shape else s

    def _refuse_structured(self, control) -> None:
        if str(control.structure) != "unstructured":
            raise ELSAError(f"{type(self).__name__} makes unstructured levels only, not {control.structure}")

    def _scores_now(self, state) -> dict:
        """``name -> score`` of every installed parametrization, for the weights as they are now."""
        return {n: par.score(state.params[n].detach()).detach() for n, (_, _, par, _) in self._installed.items()}

    def begin_phase(self, control, state) -> None:
        self._refuse_structured(control)
        if control.model is None:
            raise ELSAError(f"{type(self).__name__} needs the model (embed_levels or prune_gmp)")
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ELSAError(f"{type(self).__name__} runs in one process: the parameters it adds in a phase are "
                            "not known to DDP / FSDP, so ranks would drift apart")
        self.learned_scores = {}
        for n, (mod, attr) in _owners(control.model, state.params).items():
            p = state.params[n]
            par = self.make(p, state.frozen[n])
            par.generator = torch.Generator(device=p.device).manual_seed(
                _tensor_seed(self.seed * 1_000_003 + self.phases, n, tuple(p.shape)))
            order = list(mod._parameters)
            parametrize.register_parametrization(mod, attr, par, unsafe=True)
            self._installed[n] = (mod, attr, par, order)
        count = sum(float(par.free_count) for _, _, par, _ in self._installed.values())
        for _, _, par, _ in self._installed.values():
            par.coefficient = self.strength / max(count, 1.0) if self.penalty_mean else self.strength
        self.phases += 1

    def end_phase(self, control, state) -> None:
        """Keep the learned scores, fold what the parametrization leaves in (see :meth:`fold`), remove it."""
        self.learned_scores = self._scores_now(state)
        self.fold(state)
        self.abort_phase(control, state)

    def fold(self, state) -> None:
        """Write the deterministic effect of the parametrization into the non-frozen weights (default: none)."""

    def abort_phase(self, control, state) -> None:
        """Remove the parametrizations; each module's parameters keep their original order."""
        for mod, attr, _, order in self._installed.values():
            if parametrize.is_parametrized(mod, attr):
                parametrize.remove_parametrizations(mod, attr, leave_parametrized=False)
            params = dict(mod._parameters)
            mod._parameters.clear()
            mod._parameters.update({k: params[k] for k in order if k in params})
            mod._parameters.update({k: v for k, v in params.items() if k not in order})
        self._installed = {}
