"""Sparsifiers for ELSA training: magnitude masks distributed over layers, and the GMP schedule.

A *sparsifier* turns the current weights of the prunable tensors, the frozen masks of the levels
already embedded and a target sparsity into one boolean mask per tensor (``True`` = kept). The
masks always contain the frozen masks: frozen weights are kept and count towards the target, so
level ``t``'s network contains level ``t-1``'s (ELSA, Halvachi et al., arXiv 2312.06872,
section 2.1: "any existing technique for network sparsification" plugs in).

Two ways to plug one in (see :func:`as_sparsifier`):

- a *mask function* ``fn(name, weight, frozen_mask, target) -> mask``, called per tensor with
  ``weight`` (``Tensor``, the tensor's shape, any float dtype), ``frozen_mask`` (bool, same shape),
  ``target`` (float sparsity in ``[0, 1)``: the fraction of the tensor's weights to zero) and
  returning a bool mask of the same shape that contains ``frozen_mask``;
- a :class:`Sparsifier` subclass whose :meth:`Sparsifier.masks` sees every tensor at once (needed
  for distributions over layers such as ``global`` and ``erk``).

Built in: :class:`MagnitudeSparsifier` with the distributions ``uniform`` (every tensor at the
target), ``global`` (one magnitude threshold across tensors) and ``erk`` (Erdős-Rényi-Kernel,
Evci et al. 2020, "Rigging the Lottery", section 3 and appendix), for the structures
``unstructured``, ``N:M`` and ``block:RxC`` (via :func:`elsa_codec.format.structure.magnitude_mask`), and the
cubic gradual magnitude pruning schedule of Zhu & Gupta 2017 ("To prune, or not to prune",
section 3): :func:`gmp_sparsity` and :class:`GMPSchedule`.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import torch

from ...errors import ELSAError
from ...format.structure import Structure, mask_structure_ok, parse_structure
from ...oneshot.masks import magnitude_mask
from ..schedule import erk_densities

__all__ = ["Sparsifier", "MagnitudeSparsifier", "MaskFnSparsifier", "as_sparsifier", "check_masks", "DISTRIBUTIONS"]

#: Distributions of a target sparsity over the prunable tensors understood by :class:`MagnitudeSparsifier`.
DISTRIBUTIONS = ("uniform", "global", "erk")


# --------------------------------------------------------------------------------------------
# Sparsifiers
# --------------------------------------------------------------------------------------------
class Sparsifier:
    """Base class of the sparsifiers: turn weights + frozen masks + a target into masks.

    Subclasses implement :meth:`masks`. The ELSA procedure (:func:`elsa_codec.embed_levels`) and
    :func:`elsa_codec.prune_gmp` call it at every GMP pruning step with the schedule's sparsity and
    check what it returns with :func:`check_masks`.

    A method that decides itself when to prune inside a sparsify phase (early-bird tickets,
    lottery-ticket rounds) sets ``gradual = False`` (the GMP ramp then never prunes; the phase still
    ends on :meth:`masks` at the target) and overrides :meth:`begin_phase` / :meth:`after_step`,
    which receive the phase's :class:`elsa_codec.training.gmp.GMPControl` (``control.target``,
    ``control.steps``, ``control.masks_at(state, sparsity)``, ``control.prune(state, sparsity)``)
    and the run's mask state. Such a method keeps bookkeeping for the phase in progress: a run
    resumed from a state saved inside one of its sparsify phases is refused.
    """

    #: False: the GMP ramp does not prune; :meth:`after_step` decides when.
    gradual: bool = True

    def begin_phase(self, control, state) -> None:
        """Called when a sparsify (or :func:`elsa_codec.prune_gmp`) phase starts. Default: nothing."""

    def after_step(self, control, state, step: int) -> None:
        """Called after optimizer step ``step`` (1-based) of the phase, once the frozen weights are
        restored and the pruned ones zeroed. Default: nothing."""

    def end_phase(self, control, state) -> None:
        """Called when the phase's steps are done, before its final masks. Default: nothing."""

    def abort_phase(self, control, state) -> None:
        """Called instead of :meth:`end_phase` when ``train_fn`` raised. Default: nothing."""

    #: True when the sparsifier adds parameters in :meth:`begin_phase`: the optimizer must be
    #: created inside each phase (``embed_levels`` / ``prune_gmp`` with a ``train_fn``).
    adds_parameters: bool = False

    def masks(
        self,
        weights: Mapping[str, torch.Tensor],
        frozen: Mapping[str, torch.Tensor],
        sparsity: float,
        structure: Structure | str = "unstructured",
    ) -> dict[str, torch.Tensor]:
        """Masks at ``sparsity`` that contain ``frozen``.

        Args:
            weights: ``name -> weight`` (float tensors, Linear ``[out, in]`` or Conv2d
                ``[out, in/groups, kh, kw]``; not modified).
            frozen: ``name -> bool mask`` of the same shapes (weights that must be kept).
            sparsity: overall target sparsity (fraction of zeros over all tensors) in ``[0, 1)``.
                For an ``N:M`` structure a sparsity below ``1 - N/M`` means ``ceil``-ed ``n:M``
                groups on the way to ``N:M`` (gradual N:M pruning).
            structure: the level's structure (:func:`elsa_codec.format.structure.parse_structure`).

        Returns:
            ``name -> bool Tensor`` (``True`` = kept), one per name of ``weights``.
        """
        raise NotImplementedError


def _nm_at(st: Structure, sparsity: float) -> Structure | None:
    """The ``n:M`` pattern on the way to ``st`` at ``sparsity`` (None = dense)."""
    n = max(st.n, min(st.m, int(math.ceil((1.0 - sparsity) * st.m - 1e-9))))
    if n >= st.m:
        return None
    return Structure("nm", n=n, m=st.m)


class MagnitudeSparsifier(Sparsifier):
    """Magnitude pruning (keep the largest ``|w|``), nested on the frozen masks.

    Args:
        distribution: how the overall target is spread over the tensors: ``"uniform"`` (every
            tensor at the target), ``"global"`` (one magnitude threshold over all non-frozen
            weights; with a block structure each tensor then gets its resulting sparsity) or
            ``"erk"`` (:func:`erk_densities`). Ignored for ``N:M`` structures (every tensor gets
            the pattern).
        score: optional ``fn(name, weight) -> Tensor`` of importance scores of the weight's shape
            (default ``|weight|``).

    Raises:
        ELSAError: unknown distribution.
    """

    def __init__(self, distribution: str = "uniform", *, score: Callable | None = None):
        if distribution not in DISTRIBUTIONS:
            raise ELSAError(f"unknown distribution {distribution!r}: expected one of {', '.join(DISTRIBUTIONS)}")
        self.distribution = distribution
        self.score = score

    def __repr__(self) -> str:
        return f"MagnitudeSparsifier({self.distribution!r})"

    def _scores(self, weights):
        if self.score is None:
            return {n: w.detach().abs().to(torch.float32) for n, w in weights.items()}
        return {n: self.score(n, w).detach().to(torch.float32) for n, w in weights.items()}

    def tensor_sparsities(
        self, weights: Mapping[str, torch.Tensor], frozen: Mapping[str, torch.Tensor], sparsity: float
    ) -> dict[str, float]:
        """Per-tensor sparsities of the distribution for an overall ``sparsity`` (fractions in ``[0, 1]``).

        Raises:
            ELSAError: the frozen weights already exceed the overall target (``global``), or a
                tensor's (``uniform``, ``erk``; checked when the masks are made).
        """
        names = list(weights)
        if self.distribution == "uniform":
            return {n: float(sparsity) for n in names}
        numel = {n: weights[n].numel() for n in names}
        total = sum(numel.values())
        if self.distribution == "erk":
            d = erk_densities({n: tuple(weights[n].shape) for n in names}, 1.0 - float(sparsity))
            out = {}
            for n in names:
                sp = 1.0 - d[n]
                # ERK densities grow with the overall density, so a sparser level's frozen set fits;
                # absorb a one-weight rounding difference instead of failing on it.
                nf = int(frozen[n].sum())
                if nf > round((1.0 - sp) * numel[n]) and nf <= round((1.0 - sp) * numel[n]) + 1:
                    sp = 1.0 - nf / numel[n]
                out[n] = sp
            return out
        # global: one threshold over the non-frozen weights
        keep = int(round((1.0 - float(sparsity)) * total))
        nfrozen = {n: int(frozen[n].sum()) for n in names}
        nf = sum(nfrozen.values())
        if nf > keep:
            raise ELSAError(
                f"the frozen weights ({nf} of {total}) already exceed the target of {keep} kept "
                f"(sparsity {sparsity}); levels must be given sparsest first"
            )
        scores = self._scores(weights)
        free = torch.cat([scores[n][~frozen[n]].reshape(-1) for n in names])
        extra = keep - nf
        out = {}
        if extra <= 0 or free.numel() == 0:
            chosen = {n: 0 for n in names}
        elif extra >= free.numel():
            chosen = {n: numel[n] - nfrozen[n] for n in names}
        else:
            idx = torch.topk(free, extra, sorted=False).indices
            owner = torch.cat(
                [torch.full((numel[n] - nfrozen[n],), i, dtype=torch.int64) for i, n in enumerate(names)]
            )
            counts = torch.bincount(owner[idx], minlength=len(names))
            chosen = {n: int(counts[i]) for i, n in enumerate(names)}
        for n in names:
            out[n] = 1.0 - (nfrozen[n] + chosen[n]) / numel[n]
        return out

    def masks(self, weights, frozen, sparsity, structure="unstructured"):
        st = parse_structure(structure)
        scores = self._scores(weights)
        if st.kind == "nm":
            pat = _nm_at(st, float(sparsity))
            out = {}
            for n, w in weights.items():
                if pat is None:
                    out[n] = torch.ones(w.shape, dtype=torch.bool, device=w.device)
                else:
                    out[n] = magnitude_mask(w, 0.0, pat, frozen[n], name=n, score=scores[n])
            return out
        sps = self.tensor_sparsities(weights, frozen, sparsity)
        return {
            n: magnitude_mask(w, min(max(sps[n], 0.0), 1.0), st, frozen[n], name=n, score=scores[n])
            for n, w in weights.items()
        }


class MaskFnSparsifier(Sparsifier):
    """Adapter of a per-tensor mask function ``fn(name, weight, frozen_mask, target) -> mask``.

    ``target`` is the overall sparsity (every tensor gets the same target; for an ``N:M`` level it is
    ``1 - N/M`` at the end of the ramp and the function is responsible for the pattern).
    """

    def __init__(self, fn: Callable):
        if not callable(fn):
            raise ELSAError(f"a mask function must be callable, got {type(fn).__name__}")
        self.fn = fn

    def __repr__(self) -> str:
        return f"MaskFnSparsifier({getattr(self.fn, '__name__', self.fn)!r})"

    def masks(self, weights, frozen, sparsity, structure="unstructured"):
        return {n: self.fn(n, w, frozen[n], float(sparsity)) for n, w in weights.items()}


def as_sparsifier(spec) -> Sparsifier:
    """Normalise a sparsifier spec.

    Args:
        spec: None or ``"magnitude"`` (uniform magnitude), ``"uniform"``, ``"global"``, ``"erk"``,
            a :class:`Sparsifier`, or a mask function ``(name, weight, frozen_mask, target) -> mask``.

    Raises:
        ELSAError: anything else.
    """
    if spec is None or spec == "magnitude":
        return MagnitudeSparsifier("uniform")
    if isinstance(spec, Sparsifier):
        return spec
    if isinstance(spec, str):
        return MagnitudeSparsifier(spec)
    if callable(spec):
        return MaskFnSparsifier(spec)
    raise ELSAError(
        f"sparsifier {spec!r} is neither a distribution name ({', '.join(DISTRIBUTIONS)}), a Sparsifier, nor a mask function"
    )


def check_masks(
    masks: Mapping[str, torch.Tensor],
    weights: Mapping[str, torch.Tensor],
    frozen: Mapping[str, torch.Tensor],
    structure: Structure | str | None = None,
) -> dict[str, torch.Tensor]:
    """Check a sparsifier's output: one bool mask per tensor, the weight's shape, containing the
    frozen mask (and obeying ``structure`` when given). Returns the masks on the weights' devices.

    Raises:
        ELSAError: a missing mask, wrong type or shape, a frozen weight dropped (names the tensor
            and counts the dropped weights), or a mask that breaks the structure.
    """
    if not isinstance(masks, Mapping):
        raise ELSAError(f"a sparsifier must return a mapping of names to masks, got {type(masks).__name__}")
    out = {}
    for n, w in weights.items():
        m = masks.get(n)
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise ELSAError(f"{n}: the sparsifier returned {type(m).__name__ if not isinstance(m, torch.Tensor) else m.dtype}, expected a bool mask")
        if m.shape != w.shape:
            raise ELSAError(f"{n}: the sparsifier's mask has shape {tuple(m.shape)}, the weight has {tuple(w.shape)}")
        m = m.to(w.device)
        dropped = int((frozen[n] & ~m).sum())
        if dropped:
            raise ELSAError(f"{n}: the sparsifier's mask drops {dropped} frozen weights (a level's mask must contain the previous level's)")
        if structure is not None and not mask_structure_ok(m, structure):
            raise ELSAError(f"{n}: the sparsifier's mask does not obey the structure {parse_structure(structure)}")
        out[n] = m
    return out
