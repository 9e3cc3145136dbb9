"""GMP control inside a sparsify phase (Zhu & Gupta 2017, section 3; ELSA sec. 2.1).

The cubic ramp of :class:`elsa_codec.GMPSchedule` decides after which optimizer steps of the
phase the mask is recomputed (``updates``, 10 by default: mask work is amortised over the phase)
and at which sparsity; the sparsifier makes the masks, nested on the frozen masks, and
:func:`elsa_codec.training.sparsifiers.base.check_masks` checks them. The phase always ends on the target mask.
"""
from __future__ import annotations

from .schedule import GMPSchedule
from .sparsifiers.base import Sparsifier, check_masks
from .state import MaskState

__all__ = ["GMPControl"]


class GMPControl:
    """When and how the mask of one sparsify (or ``"gmp"``) phase is recomputed.

    Args:
        sparsifier: makes the masks (:class:`elsa_codec.Sparsifier`).
        schedule: the ramp (:class:`elsa_codec.GMPSchedule`).
        target: the phase's final sparsity (fraction).
        structure: the level's :class:`elsa_codec.format.structure.Structure`.
        steps: optimizer steps of the phase.
        transposed: names of `[in, out]` weights (structured masks are laid on their transpose).
    """

    def __init__(self, sparsifier: Sparsifier, schedule: GMPSchedule, target: float, structure, steps: int,
                 transposed=frozenset()):
        self.sparsifier, self.schedule = sparsifier, schedule
        self.target, self.structure, self.steps = float(target), structure, int(steps)
        self.transposed = set(transposed) if str(structure) != "unstructured" else set()
        gradual = sparsifier.gradual
        self.updates = set(schedule.update_steps(self.steps)) if gradual else set()
        self.last = max(self.updates, default=0)
        _, n, _ = schedule.plan(self.steps)
        self.no_ramp = gradual and (n == 0 or self.steps == 0)  # prune at once, then train at the target
        self.final_reached = False
        self.model = None

    def start(self, state: MaskState, model=None) -> None:
        """Begin the phase: the sparsifier's :meth:`~elsa_codec.Sparsifier.begin_phase` (``model``
        is offered as ``control.model``), then, without a ramp, the target mask at once."""
        self.model = model
        self.sparsifier.begin_phase(self, state)
        if self.no_ramp:
            self.finish(state)

    def end(self, state: MaskState) -> None:
        """The phase's steps are done: the sparsifier's :meth:`~elsa_codec.Sparsifier.end_phase`."""
        self.sparsifier.end_phase(self, state)

    def abort(self, state: MaskState) -> None:
        """``train_fn`` raised: the sparsifier's :meth:`~elsa_codec.Sparsifier.abort_phase`."""
        self.sparsifier.abort_phase(self, state)

    def due(self, local_step: int) -> bool:
        """Whether the mask is recomputed after optimizer step ``local_step`` of the phase."""
        return local_step in self.updates

    def sparsity_at(self, local_step: int) -> tuple[float, bool]:
        """``(sparsity, final)`` of the mask recomputed after ``local_step``."""
        if local_step >= self.last:
            return self.target, True
        return self.schedule.sparsity(local_step, self.steps, self.target), False

    def masks_at(self, state: MaskState, sparsity: float, final: bool = False) -> dict:
        """The sparsifier's checked masks at ``sparsity`` for the current weights (``name -> bool``,
        the weights' orientation), without applying them; the structure is enforced when ``final``.

        Raises:
            ELSAError: a mask that drops frozen weights, of the wrong shape, or (final) breaking the structure.
        """
        tr = self.transposed

        def view(d):
            return {n: (v.t() if n in tr else v) for n, v in d.items()}

        weights = view(state.local_weights())  # the local shards when sharded
        frozen = view(state.frozen)
        masks = self.sparsifier.masks(weights, frozen, float(sparsity), self.structure)
        masks = check_masks(masks, weights, frozen, self.structure if final else None)
        return {n: (m.t().contiguous() if n in tr else m) for n, m in masks.items()}

    def prune(self, state: MaskState, sparsity: float, final: bool = False) -> None:
        """Compute the masks at ``sparsity`` (:meth:`masks_at`) and apply them."""
        state.set_mask(self.masks_at(state, sparsity, final))
        self.final_reached = self.final_reached or final

    def after_step(self, state: MaskState, local_step: int) -> None:
        """Recompute the mask if the ramp says so after ``local_step``; then the sparsifier's own
        :meth:`~elsa_codec.Sparsifier.after_step`."""
        if self.due(local_step):
            s, final = self.sparsity_at(local_step)
            self.prune(state, s, final)
        self.sparsifier.after_step(self, state, local_step)

    def finish(self, state: MaskState) -> None:
        """End on the target mask, whatever number of steps ran."""
        if not self.final_reached:
            self.prune(state, self.target, final=True)
