"""Levels, phases and the plan of an ELSA run (arXiv 2312.06872, section 2.1).

A run of ``T`` levels is ``2T`` phases: for each level ``t`` (sparsest first) a *sparsify* phase
(GMP towards the level's target) and a *densify* phase (train the non-frozen weights; the last
one trains the dense network). Each phase covers a range of the run's optimizer steps, so one
learning-rate schedule and one ``max_steps`` cover the whole run.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Phase", "build_plan", "phase_seed"]


@dataclass(frozen=True)
class Phase:
    """One training phase (handed to ``train_fn(model, phase)``; ``LevelEmbedder.phase``).

    Attributes:
        kind: ``"sparsify"`` (GMP towards level ``level``), ``"densify"`` (train the non-frozen
            weights after freezing level ``level``; with ``final`` it is the dense network's
            training), ``"gmp"`` (:func:`elsa_codec.prune_gmp`) or ``"dense"`` (free for the
            user's own use).
        index: 0-based number of the phase within the run.
        steps: optimizer steps of the phase (the GMP ramp is laid out over them).
        level: the ELSA level ``1..T`` the phase belongs to (None for ``"gmp"``/``"dense"``).
        sparsity: the phase's target sparsity (fraction of zeros over the prunable tensors at the
            end of the phase; ``0.0`` for densify phases).
        structure: the level's structure (``"unstructured"``, ``"2:4"``, ``"block:4x4"``).
        seed: derived from the run's seed and ``index`` (None without a seed). ELSA never seeds
            the global RNG with it: seed your data order with it.
        final: True for the last densify phase (training of the dense network).
        start: the run's optimizer step at which the phase begins (``end = start + steps``).
    """

    kind: str
    index: int
    steps: int
    level: int | None = None
    sparsity: float = 0.0
    structure: str = "unstructured"
    seed: int | None = None
    final: bool = False
    start: int = 0

    @property
    def end(self) -> int:
        """The run's optimizer step at which the phase ends (exclusive)."""
        return self.start + self.steps

    @property
    def name(self) -> str:
        """Readable name, e.g. ``"level 2 sparsify -> 75.0%"``."""
        if self.kind == "sparsify":
            return f"level {self.level} sparsify -> {self.sparsity:.1%}"
        if self.kind == "densify":
            return "dense training" if self.final else f"level {self.level} densify"
        if self.kind == "gmp":
            return f"GMP -> {self.sparsity:.1%}"
        return self.kind


def phase_seed(seed: int | None, index: int) -> int | None:
    """The seed offered to phase ``index`` of a run seeded with ``seed`` (None without one)."""
    return None if seed is None else int(seed) * 1_000_003 + 7919 * index


def build_plan(specs, *, steps: int, densify_steps: int, final_steps: int, seed: int | None) -> list[Phase]:
    """The ``2T`` phases of a run, with their step ranges: per level a sparsify phase of
    ``steps`` and a densify phase of ``densify_steps`` (``final_steps`` for the last level)."""
    plan, start = [], 0
    T = len(specs)
    for t, (sp, st) in enumerate(specs, start=1):
        for kind in ("sparsify", "densify"):
            final = kind == "densify" and t == T
            n = steps if kind == "sparsify" else (final_steps if final else densify_steps)
            i = len(plan)
            plan.append(Phase(kind, i, int(n), t, float(sp) if kind == "sparsify" else 0.0, str(st),
                              phase_seed(seed, i), final, start))
            start += int(n)
    return plan
