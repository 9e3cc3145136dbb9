"""Lottery tickets with rewinding: iterative magnitude pruning, rewinding the survivors.

Frankle, Dziugaite, Roy, Carbin 2019, "Stabilizing the Lottery Ticket Hypothesis" (arXiv
1903.01611; "Linear Mode Connectivity and the Lottery Ticket Hypothesis", ICML 2020), section 3:
train, prune the smallest weights, rewind the surviving weights to their values at an early
iteration ``k`` (not to initialisation), train again; repeat. Within an ELSA sparsify phase the
rounds prune the non-frozen weights along a geometric schedule of the kept fraction to the
level's target, and only the non-frozen survivors rewind (frozen weights never change).
"""
from __future__ import annotations

import torch

from ...errors import ELSAError
from .base import MagnitudeSparsifier

__all__ = ["LotteryTicketSparsifier"]


class LotteryTicketSparsifier(MagnitudeSparsifier):
    """Iterative magnitude pruning with rewinding (Frankle et al. 2019) as an ELSA sparsifier.

    A sparsify phase of ``S`` steps: the non-frozen weights are saved after step
    ``k = max(1, round(rewind * S))``; the remaining steps are cut into ``rounds + 1`` equal
    training segments; at the end of segment ``r`` (``r = 1..rounds``) the network is pruned by
    magnitude to the kept fraction ``d**(r / rounds)`` of the level's target ``d = 1 - sparsity``
    (the last round hits the target exactly, with the level's structure) and every surviving
    non-frozen weight is set back to its saved value; the last segment trains the ticket. The
    optimizer's own state (momentum, Adam moments) is the user's and is not rewound.

    Args:
        distribution: as :class:`elsa_codec.MagnitudeSparsifier`.
        rounds: pruning rounds per level (>= 1).
        rewind: the rewinding point as a fraction of the phase, in ``[0, 1)``.

    Attributes:
        rounds_done: one list per sparsify phase that ran: ``(step, sparsity)`` of each round.

    Raises:
        ELSAError: an argument out of range (names it); a phase too short for its rounds
            (fewer than ``rounds + 1`` steps after the rewinding point).
    """

    gradual = False

    def __init__(self, distribution: str = "uniform", *, rounds: int = 3, rewind: float = 0.05):
        super().__init__(distribution)
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ELSAError(f"LotteryTicketSparsifier: rounds must be an int >= 1, got {rounds!r}")
        if not 0.0 <= float(rewind) < 1.0:
            raise ELSAError(f"LotteryTicketSparsifier: rewind must be in [0, 1), got {rewind!r}")
        self.rounds, self.rewind = rounds, float(rewind)
        self.rounds_done: list[list] = []
        self._saved = None

    def __repr__(self) -> str:
        return f"LotteryTicketSparsifier({self.distribution!r}, rounds={self.rounds}, rewind={self.rewind})"

    def begin_phase(self, control, state) -> None:
        steps = control.steps
        self._k = max(1, round(self.rewind * steps))
        seg = (steps - self._k) / (self.rounds + 1)
        if steps and seg < 1:
            raise ELSAError(f"LotteryTicketSparsifier: a sparsify phase of {steps} steps is too short for "
                            f"{self.rounds} rounds after rewinding at step {self._k}; give it at least "
                            f"{self._k + self.rounds + 1} steps or fewer rounds")
        self._ends = {int(round(self._k + r * seg)): r for r in range(1, self.rounds + 1)}
        self._saved = None
        self.rounds_done.append([])

    def after_step(self, control, state, step: int) -> None:
        if step == self._k:
            self._saved = {n: w.clone() for n, w in state.local_weights().items()}
        r = self._ends.get(step)
        if r is None:
            return
        density = (1.0 - control.target) ** (r / self.rounds)
        sparsity = control.target if r == self.rounds else 1.0 - density
        control.prune(state, sparsity, final=r == self.rounds)
        self._rewind(state)
        self.rounds_done[-1].append((step, sparsity))

    @torch.no_grad()
    def _rewind(self, state) -> None:
        """Surviving non-frozen weights back to their values after step ``k``."""
        for n, w in state.local_weights().items():
            survive = state.mask[n] & ~state.frozen[n]
            w.copy_(torch.where(survive, self._saved[n], w))
