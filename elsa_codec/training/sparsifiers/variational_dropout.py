"""Sparse variational dropout (Molchanov, Ashukha, Vetrov 2017, "Variational Dropout Sparsifies
Deep Neural Networks", ICML), sections 4.1-4.2: each weight ``theta`` gets a variance
``sigma^2`` (``log_sigma2`` trained), the additive reparameterisation ``w = theta + sigma * eps``,
``log alpha = log sigma^2 - log theta^2``, and the approximation of the KL term
``-KL ~ k1 * sigmoid(k2 + k3 * log alpha) - 0.5 * log(1 + 1 / alpha) - k1`` (k1 = 0.63576,
k2 = 1.87320, k3 = 1.48695); weights with a large ``log alpha`` are pruned.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .gates import GatedSparsifier, PenaltyParametrization

__all__ = ["VariationalDropoutSparsifier"]

K1, K2, K3 = 0.63576, 1.87320, 1.48695


class VDNoise(PenaltyParametrization):
    """``theta + sigma * eps`` in training, ``theta`` in eval; frozen weights get no noise."""

    def __init__(self, weight, frozen, init: float):
        super().__init__(weight, frozen)
        self.log_sigma2 = torch.nn.Parameter(torch.full(tuple(weight.shape), float(init), dtype=torch.float32,
                                                        device=weight.device))
        self.__dict__["theta"] = weight  # the weight's Parameter, not registered twice: the KL's gradient reaches it

    def forward(self, w):
        if not self.training:
            return w
        eps = torch.randn(self.log_sigma2.shape, generator=self.generator, device=self.log_sigma2.device)
        noise = torch.where(self.frozen, torch.zeros((), device=eps.device), torch.exp(0.5 * self.log_sigma2) * eps)
        return w + noise.to(w.dtype)

    def log_alpha(self, theta: torch.Tensor) -> torch.Tensor:
        return (self.log_sigma2 - torch.log(theta.float() ** 2 + 1e-8)).clamp(-10.0, 10.0)

    def penalty(self):
        la = self.log_alpha(self.theta)
        kl = -(K1 * torch.sigmoid(K2 + K3 * la) - 0.5 * F.softplus(-la) - K1)
        return kl[~self.frozen].sum()

    def score(self, weight):
        return -self.log_alpha(weight).detach()


class VariationalDropoutSparsifier(GatedSparsifier):
    """Sparse variational dropout (Molchanov et al. 2017) as an ELSA sparsifier.

    During a sparsify phase every prunable weight gets ``log_sigma2`` (initialised to ``init``)
    and Gaussian noise of that variance on the weight in training mode (one sample per forward; the
    paper's local reparameterisation would need the layer's pre-activations); frozen weights get
    none. ``train_fn`` adds :func:`elsa_codec.sparsity_penalty` (``strength`` times the mean KL
    approximation over the non-frozen weights) to its loss and creates its optimizer in the phase.
    At the end the noise is removed (the weights are the means ``theta``) and the non-frozen weights
    are ranked by ``log alpha`` across all layers (lowest kept) to the level's exact target.

    Args:
        strength: weight of the KL term (the paper's 1 / dataset size times the number of weights), >= 0.
        init: initial ``log_sigma2`` (default -10).
        seed: int; the noise comes from generators seeded by it, the phase and the tensor.

    Raises:
        ELSAError: a negative strength; a non-finite init; at the phase start, a structured level.
    """

    def __init__(self, strength: float = 0.1, *, init: float = -10.0, seed: int = 0):
        super().__init__(strength, init, seed)

    def make(self, weight, frozen):
        return VDNoise(weight, frozen, self.init)
