"""The per-step work that keeps frozen weights bit for bit and pruned weights at +0.0.

Each optimizer attached to a run gets a :class:`StepPlan` for its parameters, rebuilt when the
masks change (a GMP mask update, a freeze, a resume), when a group's weight decay changes and when
the optimizer's state is loaded. A prunable weight with entries that must not move (frozen or
pruned) is guarded in one of two ways:

- **grad mode** (one integer pass per step): its gradient is masked before the step
  (``grad & keep``) and, at each plan rebuild, its first-moment state (``exp_avg``,
  ``momentum_buffer``) is zeroed at those entries. Then an element-wise optimizer of
  :data:`ZERO_UPDATE` cannot move them: its update there is ``0 / denominator`` times a step
  size, and ``w + (-0.0) == w`` bit for bit. It applies when the optimizer's type is in
  :data:`ZERO_UPDATE` (exactly: a subclass may change the update) and either the weight has no
  frozen entry or its group has ``weight_decay == 0`` (decay moves a nonzero frozen weight; a
  pruned +0.0 stays +0.0 under coupled and decoupled decay), and no other attached optimizer
  holds the weight. Nothing runs after the step.
- **restore mode** (the general case: any optimizer, weight decay): after the step the weight's
  bits become ``(bits & keep) | base`` (two integer passes, one when nothing is frozen), and before
  it the gradients of pruned entries are masked so their optimizer state decays as if absent.

Shared parameters frozen whole lose their gradient (``grad = None``: every torch optimizer skips
them); in restore mode they are also copied back after the step. ``torch`` has no
``_foreach_bitwise_and_``, so the passes run per tensor (a few microseconds of Python per tensor;
the pass itself is memory-bound). Measured in ``bench/results/train-overhead``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..format.bits import bits_view
from .distributed import local_tensor
from .state import MaskState

__all__ = ["ZERO_UPDATE", "StepPlan", "StepGuard"]

#: Optimizer types whose update of an entry with a zero gradient and zero first-moment state is
#: exactly zero (element-wise, no cross-entry term), with the state keys that hold the first
#: moment. Each is tested bit for bit (tests/training/test_guard.py).
ZERO_UPDATE: dict[type, tuple[str, ...]] = {
    torch.optim.SGD: ("momentum_buffer",),
    torch.optim.Adam: ("exp_avg",),
    torch.optim.AdamW: ("exp_avg",),
    torch.optim.Adamax: ("exp_avg",),
    torch.optim.NAdam: ("exp_avg",),
    torch.optim.RAdam: ("exp_avg",),
    torch.optim.Adagrad: (),
    torch.optim.RMSprop: ("momentum_buffer",),
    torch.optim.Adadelta: (),
}


@dataclass
class StepPlan:
    """What one optimizer's hooks do each step (names are :class:`MaskState` weight names).

    Attributes:
        generation: the :attr:`MaskState.generation` it was built for.
        decay: the groups' ``weight_decay`` values it was built for.
        grad: weights whose gradient is masked before the step (``grad & keep``).
        restore: weights restored after the step (restore mode).
        exempt: weights in grad mode (nothing after the step).
        zero: weights whose first-moment state is zeroed before the next step (then emptied).
        keys: the first-moment state keys of this optimizer type (grad mode).
        shared: shared parameters frozen whole that this optimizer holds.
        copy_shared: whether those are copied back after the step (restore mode).
    """

    generation: int
    decay: tuple
    grad: list = field(default_factory=list)
    restore: list = field(default_factory=list)
    exempt: list = field(default_factory=list)
    zero: list = field(default_factory=list)
    keys: tuple = ()
    shared: list = field(default_factory=list)
    copy_shared: bool = True


def _decay(opt: torch.optim.Optimizer) -> tuple:
    return tuple(g.get("weight_decay", 0) for g in opt.param_groups)


def _holders(optimizers) -> dict[int, int]:
    """``id(param) -> number of optimizers holding it``."""
    n: dict[int, int] = {}
    for opt in optimizers:
        for i in {id(p) for g in opt.param_groups for p in g["params"]}:
            n[i] = n.get(i, 0) + 1
    return n


def plan_for(state: MaskState, opt: torch.optim.Optimizer, holders: dict[int, int]) -> StepPlan:
    """The :class:`StepPlan` of ``opt`` for the current masks (see the module docstring)."""
    keys = ZERO_UPDATE.get(type(opt))
    plan = StepPlan(state.generation, _decay(opt), keys=keys or (), copy_shared=keys is None)
    guarded, shared_ids = set(state.restore_names), {id(p): n for n, p in state.shared.items()}
    for g in opt.param_groups:
        for p in g["params"]:
            n = state.name_of.get(id(p))
            if n is None:
                if id(p) in shared_ids:
                    plan.shared.append(shared_ids[id(p)])
                continue
            if n not in guarded:
                continue
            free = keys is not None and holders.get(id(p), 0) == 1
            if free and (n not in state.frozen_names or g.get("weight_decay", 0) == 0):
                plan.grad.append(n)
                plan.exempt.append(n)
                continue
            if n in state.pruned_names:
                plan.grad.append(n)
            plan.restore.append(n)
    plan.zero = list(plan.exempt)
    return plan


class StepGuard:
    """The pre- and post-step work of a run's optimizers (one :class:`StepPlan` each).

    Args:
        state: the run's :class:`MaskState`.
        optimizers: ``key -> torch.optim.Optimizer`` (the binding's, read at each step).

    Attributes:
        plans: ``key -> StepPlan``.
        stale: keys whose plan is rebuilt at their next step (the optimizer was just attached, or its
            state was loaded: its moments are zeroed again at the frozen and pruned entries).
    """

    def __init__(self, state: MaskState, optimizers: dict):
        self.state, self.optimizers = state, optimizers
        self.plans: dict[int, StepPlan] = {}
        self.stale: set[int] = set()

    def plan(self, key: int) -> StepPlan:
        """The current plan of optimizer ``key`` (rebuilt when stale)."""
        p, opt = self.plans.get(key), self.optimizers[key]
        if p is None or key in self.stale or p.generation != self.state.generation or p.decay != _decay(opt):
            p = self.plans[key] = plan_for(self.state, opt, _holders(self.optimizers.values()))
            self.stale.discard(key)
        return p

    @torch.no_grad()
    def grads(self, key: int) -> None:
        """Once the step's gradients exist (before the update): mask them, zero new first
        moments, drop the gradients of frozen shared parameters."""
        st, plan = self.state, self.plan(key)
        for n in plan.grad:
            p = st.params[n]
            if p.grad is not None:
                bits_view(local_tensor(p.grad) if st.sharded else p.grad).bitwise_and_(st.keep[n])
        if plan.zero:
            self._zero_moments(self.optimizers[key], plan)
        for n in plan.shared:
            st.shared[n].grad = None

    def _zero_moments(self, opt: torch.optim.Optimizer, plan: StepPlan) -> None:
        st = self.state
        for n in plan.zero:
            entry = opt.state.get(st.params[n], {})
            for k in plan.keys:
                s = entry.get(k)
                if isinstance(s, torch.Tensor):
                    s = local_tensor(s)
                    keep = st.keep[n]
                    if s.dtype == st.params[n].dtype and s.shape == keep.shape:
                        bits_view(s).bitwise_and_(keep)
                    else:
                        s.masked_fill_(keep.to(s.device) == 0, 0)
        plan.zero = []

    @torch.no_grad()
    def post(self, key: int) -> None:
        """After ``optimizer.step()``: restore the weights in restore mode."""
        plan = self.plans.get(key) or self.plan(key)
        self.state.restore(plan.restore, plan.shared if plan.copy_shared else ())

    def loaded(self, key: int) -> None:
        """The optimizer's state was loaded: rebuild its plan (and zero its moments) at its next step."""
        self.stale.add(key)
