"""Early-bird tickets: draw a level's mask early, once the masks stop changing, then train it.

You, Li, Xu, Fu, Wang, Chen, Baraniuk, Wang, Lin 2020, "Drawing Early-Bird Tickets: Towards More
Efficient Training of Deep Networks" (ICLR), section 3: the magnitude mask at the target sparsity
is drawn from the network every few iterations while it trains dense; once the normalised Hamming
distance between consecutive masks stays below a threshold, the ticket is drawn: the network is
pruned to it and the rest of the training runs with that fixed mask. Within ELSA the dense
training is that of the non-frozen weights (frozen weights are kept and never counted as changes).
"""
from __future__ import annotations

from ...errors import ELSAError
from .base import MagnitudeSparsifier

__all__ = ["EarlyBirdSparsifier"]


class EarlyBirdSparsifier(MagnitudeSparsifier):
    """Early-bird tickets (You et al. 2020) as an ELSA sparsifier.

    Every ``interval`` optimizer steps of a sparsify phase the magnitude masks at the level's target
    are computed (not applied); the distance between two consecutive ones is the fraction of the
    non-frozen weights whose kept/pruned state differs. After ``patience`` distances in a row below
    ``threshold`` the last mask is applied and stays fixed to the phase's end. A phase whose masks
    never settle is pruned to the target at its end (plain one-shot magnitude at the end).

    Args:
        distribution: as :class:`elsa_codec.MagnitudeSparsifier` (``"uniform"``, ``"global"``, ``"erk"``).
        interval: optimizer steps between two mask draws (>= 1).
        threshold: distance below which two consecutive masks count as the same, in ``(0, 1)``.
        patience: how many distances in a row must be below ``threshold`` (>= 1).

    Attributes:
        draws: one dict per sparsify phase that ended: ``target`` (sparsity), ``steps`` (of the
            phase), ``drawn_at`` (the optimizer step at which the ticket was drawn, or None),
            ``distances`` (every distance measured).

    Raises:
        ELSAError: an argument out of range (names it).
    """

    gradual = False

    def __init__(self, distribution: str = "uniform", *, interval: int = 10, threshold: float = 0.1, patience: int = 3):
        super().__init__(distribution)
        for name, v in (("interval", interval), ("patience", patience)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ELSAError(f"EarlyBirdSparsifier: {name} must be an int >= 1, got {v!r}")
        if not 0.0 < float(threshold) < 1.0:
            raise ELSAError(f"EarlyBirdSparsifier: threshold must be in (0, 1), got {threshold!r}")
        self.interval, self.threshold, self.patience = interval, float(threshold), patience
        self.draws: list[dict] = []
        self._ticket = None

    def __repr__(self) -> str:
        return (f"EarlyBirdSparsifier({self.distribution!r}, interval={self.interval}, threshold={self.threshold}, "
                f"patience={self.patience})")

    def begin_phase(self, control, state) -> None:
        self._ticket, self._previous, self._calm = None, None, 0
        self._transposed = set(control.transposed)  # masks() sees those weights as [in, out]
        self.draws.append(dict(target=control.target, steps=control.steps, drawn_at=None, distances=[]))

    def after_step(self, control, state, step: int) -> None:
        if self._ticket is not None or step % self.interval:
            return
        current = control.masks_at(state, control.target, final=True)
        if self._previous is not None:
            d = _distance(self._previous, current, state.frozen)
            self.draws[-1]["distances"].append(d)
            self._calm = self._calm + 1 if d < self.threshold else 0
            if self._calm >= self.patience:
                self._ticket = current
                self.draws[-1]["drawn_at"] = step
                state.set_mask(current)
        self._previous = current

    def masks(self, weights, frozen, sparsity, structure="unstructured"):
        if self._ticket is not None and self.draws and float(sparsity) == self.draws[-1]["target"]:
            return {n: (m.t() if n in self._transposed else m) for n, m in self._ticket.items()}
        return super().masks(weights, frozen, sparsity, structure)


def _distance(a: dict, b: dict, frozen: dict) -> float:
    """Fraction of the non-frozen weights whose kept/pruned state differs between masks ``a`` and ``b``."""
    diff = sum(int(((a[n] ^ b[n]) & ~frozen[n]).sum()) for n in a)
    free = sum(int((~frozen[n]).sum()) for n in a)
    return diff / max(free, 1)
