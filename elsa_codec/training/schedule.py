"""The sparsity schedules of training: gradual magnitude pruning's cubic ramp (Zhu & Gupta 2017,
:func:`gmp_sparsity`, :class:`GMPSchedule`) and the ERK per-tensor densities (Evci et al. 2020,
:func:`erk_densities`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from ..errors import ELSAError

__all__ = ["gmp_sparsity", "GMPSchedule", "erk_densities"]


# --------------------------------------------------------------------------------------------
# GMP schedule (Zhu & Gupta 2017)
# --------------------------------------------------------------------------------------------
def gmp_sparsity(step: float, *, initial: float, final: float, begin: int, n: int, every: int) -> float:
    """Sparsity of the cubic gradual pruning schedule at training step ``step``.

    Zhu & Gupta 2017, eq. (1): ``s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (n * dt))**3`` for
    ``t`` in ``t_0 .. t_0 + n*dt``; before ``t_0`` it is ``s_i``, after ``t_0 + n*dt`` it is ``s_f``.
    The formula is evaluated at ``step`` itself (masks are recomputed only at the steps
    ``t_0 + j*dt``, see :class:`GMPSchedule`).

    Args:
        step: ``t``, optimizer steps (int or float).
        initial: ``s_i`` in ``[0, 1)``.
        final: ``s_f`` in ``[0, 1)``.
        begin: ``t_0`` (steps).
        n: number of pruning steps (``n >= 0``; ``n == 0`` jumps to ``s_f`` at ``t_0``).
        every: ``dt``, steps between pruning steps (``>= 1``).

    Returns:
        float sparsity between ``s_i`` and ``s_f``.

    Raises:
        ELSAError: sparsities outside ``[0, 1)``, ``n < 0`` or ``every < 1``.
    """
    for nm, v in (("initial", initial), ("final", final)):
        if not 0.0 <= float(v) < 1.0:
            raise ELSAError(f"GMP {nm} sparsity {v} is not in [0, 1)")
    if n < 0 or every < 1:
        raise ELSAError(f"GMP needs n >= 0 pruning steps and every >= 1, got n={n}, every={every}")
    if step < begin:
        return float(initial)
    span = n * every
    if span == 0 or step >= begin + span:
        return float(final)
    frac = 1.0 - (step - begin) / span
    return float(final + (initial - final) * frac**3)


@dataclass(frozen=True)
class GMPSchedule:
    """Where the cubic ramp sits inside a phase of ``steps`` optimizer steps.

    The ramp starts at ``round(begin * steps)`` (``t_0``) and reaches the final sparsity at
    ``round(end * steps)``; masks are recomputed every ``every`` steps (``dt``; default: the ramp
    cut into ``updates`` equal pruning steps). The steps after the ramp fine-tune the sparse
    network at the final sparsity (Zhu & Gupta 2017, section 3).

    Attributes:
        begin: fraction of the phase's steps before the first pruning step, in ``[0, 1]``.
        end: fraction of the phase's steps at which the final sparsity is reached, in ``[begin, 1]``.
        updates: number of pruning steps ``n`` when ``every`` is None (>= 1).
        every: ``dt`` in steps, or None.
        initial: ``s_i``, the sparsity the ramp starts from (fraction in ``[0, 1)``; frozen weights
            are always kept whatever it says).
    """

    begin: float = 0.0
    end: float = 0.7
    updates: int = 10
    every: int | None = None
    initial: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.begin <= self.end <= 1.0:
            raise ELSAError(f"GMP schedule needs 0 <= begin <= end <= 1, got begin={self.begin}, end={self.end}")
        if self.every is None and self.updates < 1:
            raise ELSAError(f"GMP schedule needs updates >= 1, got {self.updates}")
        if self.every is not None and self.every < 1:
            raise ELSAError(f"GMP schedule needs every >= 1 step, got {self.every}")
        if not 0.0 <= self.initial < 1.0:
            raise ELSAError(f"GMP initial sparsity {self.initial} is not in [0, 1)")

    def plan(self, steps: int) -> tuple[int, int, int]:
        """``(t_0, n, dt)`` for a phase of ``steps`` optimizer steps (``n * dt`` never passes the phase)."""
        t0 = int(round(self.begin * steps))
        ramp = max(0, int(round(self.end * steps)) - t0)
        if self.every is not None:
            dt = self.every
            n = ramp // dt
        else:
            n = min(self.updates, ramp) if ramp > 0 else 0
            dt = max(1, ramp // n) if n else 1
        return t0, n, dt

    def update_steps(self, steps: int) -> list[int]:
        """The steps (counted in optimizer steps done) after which the mask is recomputed."""
        t0, n, dt = self.plan(steps)
        return [t0 + j * dt for j in range(1, n + 1)]

    def sparsity(self, step: int, steps: int, final: float) -> float:
        """Target sparsity of the mask recomputed after ``step`` of ``steps`` optimizer steps."""
        t0, n, dt = self.plan(steps)
        return gmp_sparsity(step, initial=min(self.initial, final), final=final, begin=t0, n=n, every=dt)


# --------------------------------------------------------------------------------------------
# ERK densities (Evci et al. 2020)
# --------------------------------------------------------------------------------------------
def erk_densities(shapes: Mapping[str, tuple], density: float, *, power: float = 1.0) -> dict[str, float]:
    """Erdős-Rényi-Kernel density per tensor for an overall ``density``.

    Each tensor's density is proportional to ``sum(shape) / prod(shape)`` (for a Conv2d weight
    ``[out, in, kh, kw]``: ``(out + in + kh + kw) / (out * in * kh * kw)``; for a Linear weight
    ``[out, in]``: ``(out + in) / (out * in)``), raised to ``power``, scaled so that the kept count
    over all tensors equals ``density * total``. Tensors whose density would pass 1 are kept dense
    and the rest re-scaled (repeated until none passes 1). Evci et al. 2020 (RigL), section 3 and
    the reference code's ``get_sparsities_erdos_renyi``.

    Args:
        shapes: ``name -> shape`` (tuples of ints, any rank >= 1).
        density: overall fraction of weights kept, in ``[0, 1]``.
        power: exponent of the raw ERK score (1.0 is ERK).

    Returns:
        ``name -> density`` in ``[0, 1]``; ``sum(density_i * numel_i) == density * total`` up to
        rounding.

    Raises:
        ELSAError: empty ``shapes``, a tensor with no elements, or ``density`` outside ``[0, 1]``.
    """
    if not shapes:
        raise ELSAError("erk_densities needs at least one tensor")
    if not 0.0 <= density <= 1.0:
        raise ELSAError(f"ERK density {density} is not in [0, 1]")
    numel = {n: math.prod(s) for n, s in shapes.items()}
    for n, v in numel.items():
        if v == 0:
            raise ELSAError(f"{n}: cannot distribute sparsity over an empty tensor (shape {tuple(shapes[n])})")
    raw = {n: (sum(s) / math.prod(s)) ** power for n, s in shapes.items()}
    dense: set[str] = set()
    total = sum(numel.values())
    while True:
        budget = density * total - sum(numel[n] for n in dense)
        divisor = sum(raw[n] * numel[n] for n in shapes if n not in dense)
        if divisor <= 0:
            eps = 0.0
            break
        eps = budget / divisor
        over = [n for n in shapes if n not in dense and raw[n] * eps > 1.0]
        if not over:
            break
        # Mark the tensor with the largest raw score dense (RigL does one at a time).
        dense.add(max(over, key=lambda n: raw[n]))
    return {n: (1.0 if n in dense else max(0.0, min(1.0, raw[n] * eps))) for n in shapes}
