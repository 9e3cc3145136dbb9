"""The end-to-end pruning pipeline with sparsity enforcement (Dogariu 2023, "An End-to-End Network
Pruning Pipeline with Sparsity Enforcement", arXiv 2312.01653) as an ELSA sparsifier: every stage of
training adapted to sparsity.

1. **Initialisation**: ZerO (:func:`elsa_codec.zero_init_`), before the dense training
   (:meth:`PruningPipeline.initialize_`).
2. **Pre-pruning training with a learned mask**: each non-frozen weight is multiplied by a mask
   ``sigmoid(s) / sigmoid(s0)`` of a real-valued score ``s`` trained with the weights, and the loss
   gets a sparsity-enforcing regulariser, ``mask_strength`` times the sum of the soft masks
   ``sigmoid(s)`` (:func:`elsa_codec.sparsity_penalty`).
3. **Pruning**: magnitude pruning guided by the learned mask: the non-frozen weights are ranked by
   ``|w * mask|``, gradually along the phase's GMP schedule within stage 2 (or at once at its end,
   ``pruning="one-shot"``), to the level's exact target; then the mask is folded into the weights.
4. **Post-pruning training**: label smoothing, soft activations (ReLU blended with Swish) and soft
   skip connections (:mod:`.soft_training`), all annealed to zero, so the network that ends the
   phase has its own architecture and loss.

Within ELSA one sparsify phase of ``S`` steps runs stages 2 and 3 for the first
``k = round(mask_fraction * S)`` steps (the GMP ramp scaled to ``k`` steps), then stage 4 for the
rest; the anneal takes ``anneal_fraction`` of those steps and the last ones train the plain sparse
network. Frozen weights keep a mask of 1, stay
out of the regulariser and are never changed. Everything the pipeline adds (scores, hooks, the
label smoothing) is gone when the phase ends: the model holds plain modules and weights and the file
format is unchanged.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ...errors import ELSAError
from .gates import GatedSparsifier, PenaltyParametrization, _owners
from .soft_training import SoftStages
from .zero_init import zero_init_

__all__ = ["PruningPipeline", "LearnedMask", "STAGES"]

#: The stages an ablation can turn off, by their :class:`PruningPipeline` argument.
STAGES = ("zero_init", "learned_mask", "label_smoothing", "soft_activations", "soft_skips")


class LearnedMask(PenaltyParametrization):
    """``weight * m``, ``m = sigmoid(scale * p) / sigmoid(init)``, one score ``p`` per weight
    (``scale * p`` starts at ``init``, so ``m`` starts at exactly 1); frozen weights keep ``m = 1``.

    ``scale`` multiplies the gradient that reaches ``p`` and so (SGD) the scores' learning rate by
    ``scale ** 2`` against the weights', with the user's one optimizer."""

    def __init__(self, weight, frozen, init: float, scale: float):
        super().__init__(weight, frozen)
        self.init, self.scale = float(init), float(scale)
        self.scores = nn.Parameter(torch.full(tuple(weight.shape), self.init / self.scale, dtype=torch.float32,
                                              device=weight.device))

    def soft(self) -> torch.Tensor:
        """``sigmoid(scale * p)`` `[weight shape]` float32."""
        return torch.sigmoid(self.scale * self.scores)

    def mask(self) -> torch.Tensor:
        m = self.soft() / (1.0 / (1.0 + math.exp(-self.init)))
        return torch.where(self.frozen, torch.ones((), device=m.device), m)

    def forward(self, w):
        return w * self.mask().to(w.dtype)

    def penalty(self):
        return self.soft()[~self.frozen].sum()

    def score(self, weight):
        """``|weight * m|``: the magnitude the mask lets through."""
        with torch.no_grad():
            return (weight.detach().float() * self.mask()).abs()


class PruningPipeline(GatedSparsifier):
    """The end-to-end pruning pipeline (arXiv 2312.01653) as an ELSA sparsifier; each stage can be
    turned off (the ablation).

    Use: ``pipe.initialize_(model)`` before the dense training (ZerO; a no-op with
    ``zero_init=False``), then ``embed_levels(..., sparsifier=pipe)`` or
    ``prune_gmp(..., sparsifier=pipe)``. ``train_fn`` creates its optimizer in each phase (the scores
    are new parameters) and computes its loss as::

        loss = F.cross_entropy(logits, y, label_smoothing=ec.label_smoothing(model)) + ec.sparsity_penalty(model)

    Args:
        distribution: how the target is spread over the tensors (as :class:`elsa_codec.MagnitudeSparsifier`):
            ``"erk"`` (default), ``"uniform"``, or ``"global"`` (one ranking: the learned mask sets
            each layer's share).
        zero_init: stage 1, used by :meth:`initialize_`.
        learned_mask: stage 2; off: plain magnitude ranking at the pruning step.
        label_smoothing: stage 4's label smoothing right after pruning, in ``[0, 1)`` (0: off).
        soft_activations: stage 4's soft activations (needs ``nn.ReLU`` modules: functional
            ``F.relu`` cannot be reached).
        soft_skips: stage 4's soft skip connections over the prunable layers.
        mask_fraction: share of a sparsify phase trained with the learned mask before pruning, in ``(0, 1]``.
        anneal_fraction: share of the post-pruning steps over which stage 4 anneals to 0, in ``(0, 1]``.
        mask_strength: the regulariser's weight, times the sum of the soft masks of the non-frozen
            weights (each score gets the same push whatever the model's size), >= 0.
        mask_init: the scores' initial value (``sigmoid(mask_init)`` is the initial soft mask).
        mask_scale: the scores' reparametrisation scale (> 0; see :class:`LearnedMask`).
        skip: the soft skips' initial weight (> 0).
        pruning: ``"gradual"`` (the phase's GMP ramp, scaled to stage 2's steps, ranked by
            ``|w * mask|``) or ``"one-shot"`` (all at once at the end of stage 2).

    Attributes:
        history: one dict per sparsify phase: ``target``, ``steps``, ``pruned_at`` (the step),
            ``anneal_steps``, ``skips`` (layers bypassed), ``activations`` (ReLU modules softened).

    Raises:
        ELSAError: an argument out of range (names it); at a phase's start: a structured level,
            soft activations on a model without ``nn.ReLU`` modules, several processes.
    """

    gradual = False
    penalty_mean = False

    def __init__(self, distribution: str = "erk", *, zero_init: bool = True, learned_mask: bool = True,
                 label_smoothing: float = 0.1, soft_activations: bool = True, soft_skips: bool = True,
                 mask_fraction: float = 0.5, anneal_fraction: float = 0.5, mask_strength: float = 0.03,
                 mask_init: float = 3.0, mask_scale: float = 10.0, skip: float = 0.1, pruning: str = "gradual"):
        super().__init__(mask_strength, mask_init, 0, distribution)
        if pruning not in ("gradual", "one-shot"):
            raise ELSAError(f"PruningPipeline: pruning must be 'gradual' or 'one-shot', got {pruning!r}")
        self.pruning = pruning
        for name, v, lo, hi, closed in (("label_smoothing", label_smoothing, 0.0, 1.0, False),
                                        ("mask_fraction", mask_fraction, 0.0, 1.0, True),
                                        ("anneal_fraction", anneal_fraction, 0.0, 1.0, True)):
            ok = (lo <= float(v) < hi) if not closed else (lo < float(v) <= hi)
            if not ok:
                raise ELSAError(f"PruningPipeline: {name} must be in {'[' if not closed else '('}{lo}, {hi}"
                                f"{')' if not closed else ']'}, got {v!r}")
        for name, v in (("mask_scale", mask_scale), ("skip", skip)):
            if not float(v) > 0.0 or not math.isfinite(float(v)):
                raise ELSAError(f"PruningPipeline: {name} must be > 0, got {v!r}")
        self.zero_init, self.learned_mask = bool(zero_init), bool(learned_mask)
        self.label_smoothing, self.soft_activations = float(label_smoothing), bool(soft_activations)
        self.soft_skips, self.mask_fraction = bool(soft_skips), float(mask_fraction)
        self.anneal_fraction, self.mask_scale, self.skip = float(anneal_fraction), float(mask_scale), float(skip)
        self.adds_parameters = self.learned_mask
        self.history: list[dict] = []
        self._soft = None

    def __repr__(self) -> str:
        off = [s for s in STAGES if not getattr(self, s)]
        return (f"PruningPipeline({self.distribution!r}, mask_fraction={self.mask_fraction}, anneal_fraction="
                f"{self.anneal_fraction}, off={off})")

    def initialize_(self, model: nn.Module, filter_fn=None) -> list[str]:
        """Stage 1: ZerO-initialise ``model`` in place (:func:`elsa_codec.zero_init_`) when
        ``zero_init``; returns the modules initialised (none when off)."""
        return zero_init_(model, filter_fn) if self.zero_init else []

    def make(self, weight, frozen):
        return LearnedMask(weight, frozen, self.init, self.mask_scale)

    def begin_phase(self, control, state) -> None:
        steps = control.steps
        self._k = min(steps, max(1, round(self.mask_fraction * steps)))
        self._anneal = max(1, round(self.anneal_fraction * (steps - self._k)))
        self._pruned, self._soft = False, None
        self._ramp = set(control.schedule.update_steps(self._k)) if self.pruning == "gradual" else set()
        if self.soft_activations and control.model is not None and \
                not any(isinstance(m, nn.ReLU) for m in control.model.modules()):
            raise ELSAError("PruningPipeline: soft_activations needs nn.ReLU modules and the model has none "
                            "(functional F.relu cannot be reached); pass soft_activations=False")
        if self.learned_mask:
            super().begin_phase(control, state)
        else:
            self.learned_scores = {}
            self._refuse_structured(control)
        self.history.append(dict(target=control.target, steps=steps, pruned_at=None, anneal_steps=0, skips=0,
                                 activations=0))

    def after_step(self, control, state, step: int) -> None:
        if step < self._k and step in self._ramp:
            self._refresh_scores(state)
            control.prune(state, control.schedule.sparsity(step, self._k, control.target))
        elif step == self._k:
            self._prune(control, state)
            self._start_soft(control, state, step)
        elif self._soft is not None and step > self._k:
            self._soft.alpha = max(0.0, 1.0 - (step - self._k) / self._anneal)
            if self._soft.alpha == 0.0:
                self._soft.remove()
                self._soft = None

    def _refresh_scores(self, state) -> None:
        """The ranking of a gradual step: ``|w * m|`` with the mask as it is now (``|w|`` without one)."""
        self.learned_scores = self._scores_now(state)

    def _prune(self, control, state) -> None:
        """Stage 3: fold the learned mask, remove it, prune to the target by ``|w * m|``."""
        if self.learned_mask:
            GatedSparsifier.end_phase(self, control, state)
        control.prune(state, control.target, final=True)
        self._pruned = True
        self.history[-1]["pruned_at"] = self._k

    def _start_soft(self, control, state, step: int) -> None:
        if step >= control.steps or control.model is None:
            return
        wanted = self.soft_activations or self.soft_skips or self.label_smoothing > 0.0
        if not wanted:
            return
        skips = [mod for mod, _ in _owners(control.model, state.params).values()] if self.soft_skips else []
        self._soft = SoftStages(control.model, activations=self.soft_activations, skip_modules=skips,
                                skip=self.skip, smoothing=self.label_smoothing)
        self.history[-1].update(anneal_steps=self._anneal, skips=len(self._soft.skipped),
                                activations=len(self._soft.softened))

    @torch.no_grad()
    def fold(self, state) -> None:
        for n, (_, _, par, _) in self._installed.items():
            w = state.params[n]
            w.copy_(torch.where(par.frozen, w, w * par.mask().to(w.dtype)))

    def end_phase(self, control, state) -> None:
        """A phase shorter than its pruning step: fold and remove the mask now (the control then
        prunes to the target); stage 4's hooks are removed in any case."""
        if not self._pruned and self.learned_mask:
            GatedSparsifier.end_phase(self, control, state)
        self._remove_soft()

    def abort_phase(self, control, state) -> None:
        super().abort_phase(control, state)
        self._remove_soft()

    def _remove_soft(self) -> None:
        if self._soft is not None:
            self._soft.remove()
            self._soft = None
