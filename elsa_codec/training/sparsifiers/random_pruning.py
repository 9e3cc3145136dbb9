"""Random pruning with layer-wise ratios, nested over the levels.

Liu, Chen, Chen, Atashgahi, Yin, Kou, Shen, Pechenizkiy, Wang, Mocanu 2022, "The Unreasonable
Effectiveness of Random Pruning: Return of the Most Naive Baseline for Sparse Training" (ICLR;
random masks with ERK ratios match dense training for wide enough networks), with the
Erdős-Rényi-Kernel ratios of Evci, Gale, Menick, Castro, Elsen 2020, "Rigging the Lottery: Making
All Tickets Winners", section 3.

Each weight gets one fixed random score, drawn once per tensor from ``(seed, tensor name)``; a
mask keeps the frozen weights and the highest scores among the rest (:func:`magnitude_mask` with
``score=``). So the masks along a GMP ramp are nested, every denser level keeps the sparser
level's weights and adds random ones, targets are exact, and a run is reproducible whatever the
order in which the tensors are visited.
"""
from __future__ import annotations

import hashlib

import torch

from ...errors import ELSAError
from .base import MagnitudeSparsifier

__all__ = ["RandomSparsifier", "RANDOM_DISTRIBUTIONS"]

#: Layer-wise ratios of :class:`RandomSparsifier`.
RANDOM_DISTRIBUTIONS = ("uniform", "erk")


def _tensor_seed(seed: int, name: str, shape: tuple) -> int:
    """A 63-bit seed from ``(seed, name, shape)``, the same in every process and Python version."""
    key = f"{seed}\0{name}\0{'x'.join(map(str, shape))}".encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 1


class RandomSparsifier(MagnitudeSparsifier):
    """Random pruning (Liu et al. 2022) with ``uniform`` or ``erk`` layer-wise sparsities.

    Args:
        distribution: ``"uniform"`` (every tensor at the level's target) or ``"erk"`` (Erdős-Rényi-
            Kernel densities, :func:`elsa_codec.erk_densities`; the overall target is exact).
            ``N:M`` levels give every tensor the pattern, with random groups' members.
        seed: int; the random scores of a tensor depend only on ``seed``, its name and its shape.

    Scores are float32 uniform in ``[0, 1)``, drawn on the CPU and cached per tensor (one float32
    copy of each pruned weight's shape; :meth:`clear` frees them).

    Raises:
        ELSAError: an unknown distribution, or a seed that is not an int.

    Example::

        ec.embed_levels(model, [0.9, 0.75, 0.5], train_fn, steps=300, sparsifier=ec.RandomSparsifier("erk", seed=0),
                        schedule=ec.GMPSchedule(end=0.0))  # prune at once, as Liu et al. prune at init
    """

    def __init__(self, distribution: str = "erk", *, seed: int = 0):
        if distribution not in RANDOM_DISTRIBUTIONS:
            raise ELSAError(f"RandomSparsifier: unknown distribution {distribution!r}: expected one of "
                            f"{', '.join(RANDOM_DISTRIBUTIONS)}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ELSAError(f"RandomSparsifier: seed must be an int, got {seed!r}")
        super().__init__(distribution, score=self._random_score)
        self.seed = seed
        self._cache: dict[tuple, torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"RandomSparsifier({self.distribution!r}, seed={self.seed})"

    def _random_score(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        key = (name, tuple(weight.shape))
        s = self._cache.get(key)
        if s is None:
            g = torch.Generator().manual_seed(_tensor_seed(self.seed, name, key[1]))
            s = self._cache[key] = torch.rand(key[1], generator=g)
        return s.to(weight.device)

    def clear(self) -> None:
        """Free the cached scores (they are drawn again, identically, when needed)."""
        self._cache.clear()
