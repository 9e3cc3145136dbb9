"""Optimizer binding: step hooks on the optimizers an embedder is attached to (and only those).

``Optimizer.register_step_pre_hook`` / ``register_step_post_hook`` (the per-optimizer hooks, not
the global ones) call the embedder before and after each ``step()``. Several optimizers may share
the model (e.g. one per parameter group kind): each restores its own parameters, and the run
advances by one step when every attached optimizer has stepped once more.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ..errors import ELSAError

__all__ = ["OptimizerBinding", "torch_optimizer", "auto_attach"]


def torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` inside a wrapper (accelerate's ``AcceleratedOptimizer``:
    ``.optimizer``; Lightning's ``LightningOptimizer``: ``._optimizer``).

    Raises:
        ELSAError: no torch optimizer inside.
    """
    for _ in range(4):  # AcceleratedOptimizer subclasses Optimizer without its state: unwrap it too
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ELSAError(f"attach needs a torch.optim.Optimizer (or a wrapper of one), got {type(optimizer).__name__}")
    return optimizer


class OptimizerBinding:
    """Per-optimizer hooks calling ``pre(key, ids)`` / ``post(key, ids)`` around each step,
    ``grads(key)`` once the step's gradients exist, and ``loaded(key)`` after
    ``optimizer.load_state_dict``.

    ``key`` identifies the optimizer; ``ids`` is the set of ``id()`` of the model's parameters it
    holds (None when it holds all of them: the fast path). ``grads`` runs right after ``pre``, or,
    when the step is given a closure (Lightning's automatic optimization, ``LBFGS``), after each
    call of the closure (the pre-step hook wraps it), since the closure computes the gradients
    inside ``step()``.
    """

    def __init__(self, pre: Callable, post: Callable, loaded: Callable | None = None, grads: Callable | None = None):
        self.pre, self.post, self.loaded, self.grads = pre, post, loaded, grads
        self.handles: dict[int, tuple] = {}
        self.ids: dict[int, set | None] = {}
        self.optimizers: dict[int, torch.optim.Optimizer] = {}

    def attach(self, optimizer, model_ids: set) -> int:
        """Register the hooks on ``optimizer``; returns its key.

        Raises:
            ELSAError: not a torch optimizer, or one that holds no parameter of the model.
        """
        opt = torch_optimizer(optimizer)
        key = id(opt)
        if key in self.handles:
            return key
        held = {id(p) for g in opt.param_groups for p in g["params"]}
        if not held & model_ids:
            raise ELSAError(f"attach: the {type(opt).__name__} holds no parameter of the model (were they replaced "
                            "after the LevelEmbedder was built, e.g. by fully_shard? shard the model first)")
        mine = held & model_ids
        self.ids[key] = None if mine == model_ids else mine
        pre = opt.register_step_pre_hook(self._pre_hook(key))
        post = opt.register_step_post_hook(lambda o, a, k: self.post(key, self.ids[key]))
        handles = [pre, post]
        if self.loaded is not None:
            handles.append(opt.register_load_state_dict_post_hook(lambda o: self.loaded(key)))
        self.handles[key] = tuple(handles)
        self.optimizers[key] = opt
        return key

    def _pre_hook(self, key: int) -> Callable:
        def hook(opt, args, kwargs):
            self.pre(key, self.ids[key])
            if self.grads is None:
                return None
            closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args[0] is the optimizer
            if closure is None:
                self.grads(key)
                return None

            def wrapped():
                loss = closure()
                self.grads(key)
                return loss

            if "closure" in kwargs:
                return args, {**kwargs, "closure": wrapped}
            return (args[0], wrapped, *args[2:]), kwargs

        return hook

    def detach(self) -> None:
        """Remove every hook."""
        for handles in self.handles.values():
            for h in handles:
                h.remove()
        self.handles.clear()
        self.ids.clear()
        self.optimizers.clear()

    def __len__(self) -> int:
        return len(self.handles)


@contextmanager
def auto_attach(binding: OptimizerBinding, model_ids: set, attach: Callable):
    """While the block runs, ``attach(optimizer)`` every optimizer that steps for the first time
    and holds a parameter of the model (one global pre-step hook; the ELSA work itself runs in the
    per-optimizer hooks ``attach`` registers). For ``train_fn`` APIs that create their optimizer
    inside the function (:func:`elsa_codec.embed_levels`, :func:`elsa_codec.prune_gmp`)."""

    def hook(opt, args, kwargs):
        if id(opt) not in binding.handles and any(id(p) in model_ids for g in opt.param_groups for p in g["params"]):
            attach(opt)

    handle = register_optimizer_step_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()
