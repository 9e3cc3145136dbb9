"""L0 regularisation with hard-concrete gates (Louizos, Welling, Kingma 2018, "Learning Sparse
Neural Networks through L0 Regularization", ICLR), section 3: each weight is multiplied by a gate
``z = min(1, max(0, s * (zeta - gamma) + gamma))``, ``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``
with ``u ~ U(0, 1)`` during training; the expected L0 norm ``sum sigmoid(log_alpha - beta * log(-gamma / zeta))``
is the penalty; at test time ``z = min(1, max(0, sigmoid(log_alpha) * (zeta - gamma) + gamma))``.
"""
from __future__ import annotations

import math

import torch

from .gates import GatedSparsifier, PenaltyParametrization

__all__ = ["L0Sparsifier"]

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1  # the paper's hard-concrete constants


class L0Gate(PenaltyParametrization):
    """``weight * z`` with a hard-concrete gate per weight; frozen weights keep ``z = 1``."""

    def __init__(self, weight, frozen, init: float):
        super().__init__(weight, frozen)
        self.log_alpha = torch.nn.Parameter(torch.full(tuple(weight.shape), float(init), dtype=torch.float32,
                                                       device=weight.device))

    def gate(self) -> torch.Tensor:
        if self.training:
            u = torch.rand(self.log_alpha.shape, generator=self.generator, device=self.log_alpha.device)
            u = u.clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / BETA)
        else:
            s = torch.sigmoid(self.log_alpha)
        z = (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)
        return torch.where(self.frozen, torch.ones((), device=z.device), z)

    def forward(self, w):
        return w * self.gate().to(w.dtype)

    def penalty(self):
        p_open = torch.sigmoid(self.log_alpha - BETA * math.log(-GAMMA / ZETA))
        return p_open[~self.frozen].sum()

    def score(self, weight):
        """``|weight| * z``, the magnitude the test-time gate lets through (the gate alone ties at 1
        wherever it saturates)."""
        with torch.no_grad():
            was = self.training
            self.eval()
            z = self.gate()
            self.train(was)
        return weight.detach().abs().float() * z


class L0Sparsifier(GatedSparsifier):
    """L0 regularisation (Louizos et al. 2018) as an ELSA sparsifier.

    During a sparsify phase every prunable weight is multiplied by a hard-concrete gate with its own
    ``log_alpha`` (initialised to ``init``), held open on frozen weights; ``train_fn`` adds
    :func:`elsa_codec.sparsity_penalty` (``strength`` times the mean probability that a non-frozen
    gate is open) to its loss and creates its optimizer in the phase (``model.parameters()`` then
    holds the gates). At the phase's end the test-time gate value is folded into the non-frozen
    weights, the gates are removed, and the non-frozen weights are ranked across all layers by
    ``|w| * z`` (the magnitude the test-time gate lets through; the gate alone ties at 1 wherever
    it saturates) to the level's exact target.

    Args:
        strength: weight of the penalty (the paper's lambda times the number of gates), >= 0.
        init: initial ``log_alpha`` (default 2.0: gates open with probability ~0.88).
        seed: int; the gates' noise comes from generators seeded by it, the phase and the tensor.

    Raises:
        ELSAError: a negative strength; a non-finite init; at the phase start, a structured level.
    """

    def __init__(self, strength: float = 0.1, *, init: float = 2.0, seed: int = 0):
        super().__init__(strength, init, seed)

    def make(self, weight, frozen):
        return L0Gate(weight, frozen, self.init)

    @torch.no_grad()
    def fold(self, state) -> None:
        for n, (_, _, par, _) in self._installed.items():
            par.eval()
            w = state.params[n]
            w.copy_(torch.where(par.frozen, w, w * par.gate().to(w.dtype)))
