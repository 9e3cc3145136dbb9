"""Post-pruning training aids of the end-to-end pruning pipeline (arXiv 2312.01653, stage 4): soft
activations, soft skip connections and label smoothing, each with a strength ``alpha`` that the
pipeline anneals from 1 to 0 after pruning, so training starts smooth and ends on the network's own
architecture and loss.

All three work through forward hooks and a registry outside the model: nothing is added to the
module tree or the state dict, and :meth:`SoftStages.remove` leaves the modules exactly as they were.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SoftStages", "label_smoothing", "skip_eligible"]

#: model -> the SoftStages installed on it (read by :func:`label_smoothing`).
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, SoftStages]" = weakref.WeakKeyDictionary()


def label_smoothing(model: nn.Module) -> float:
    """The label smoothing the pruning pipeline asks for now, for ``model`` (or a wrapper of it, such
    as DDP): a float in ``[0, 1)``; 0.0 outside the post-pruning part of a phase. Pass it to the
    loss in ``train_fn``::

        loss = F.cross_entropy(logits, y, label_smoothing=ec.label_smoothing(model))
    """
    if not _ACTIVE:  # outside the post-pruning steps: no walk over the modules on every step
        return 0.0
    for m in model.modules():
        stages = _ACTIVE.get(m)
        if stages is not None:
            return stages.smoothing * stages.alpha
    return 0.0


def skip_eligible(module: nn.Module) -> bool:
    """Whether a soft skip can bypass ``module``: any ``nn.Linear``; an ``nn.Conv1d/2d/3d`` with
    stride 1, one group and padding that keeps the spatial size (``padding == dilation * (k - 1) / 2``,
    odd kernels, zero padding mode)."""
    if isinstance(module, nn.Linear):
        return True
    if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or module.groups != 1:
        return False
    if isinstance(module.padding, str):
        return module.padding == "same" and all(s == 1 for s in module.stride)
    return module.padding_mode == "zeros" and all(
        s == 1 and k % 2 == 1 and p == d * (k - 1) // 2
        for s, k, p, d in zip(module.stride, module.kernel_size, module.padding, module.dilation))


def _partial_identity(x: torch.Tensor, out_features: int, dim: int) -> torch.Tensor:
    """``x`` with its feature dimension ``dim`` cut or zero-padded to ``out_features``."""
    n = x.shape[dim]
    if n >= out_features:
        return x.narrow(dim, 0, out_features)
    pad = list(x.shape)
    pad[dim] = out_features - n
    return torch.cat([x, x.new_zeros(pad)], dim)


class SoftStages:
    """Soft activations, soft skips and label smoothing on one model, all scaled by :attr:`alpha`.

    - soft activations: every ``nn.ReLU`` module returns ``(1 - alpha) * relu(x) + alpha * silu(x)``
      (Swish, as the pipeline's summary names it); ``inplace`` is turned off while installed;
    - soft skips: every module of ``skip_modules`` for which :func:`skip_eligible` holds returns
      ``layer(x) + alpha * skip * P(x)``, ``P`` the partial identity (features cut or zero-padded);
    - label smoothing: :func:`label_smoothing` returns ``smoothing * alpha``.

    Args:
        model: the model trained.
        activations: install the soft activations.
        skip_modules: modules to bypass (empty: no soft skips).
        skip: the skips' weight at ``alpha = 1``.
        smoothing: the label smoothing at ``alpha = 1`` (0: none).
    """

    def __init__(self, model: nn.Module, *, activations: bool, skip_modules=(), skip: float = 1.0,
                 smoothing: float = 0.0):
        self.model, self.alpha, self.skip, self.smoothing = model, 1.0, float(skip), float(smoothing)
        self._handles, self._inplace = [], []
        if activations:
            for m in model.modules():
                if isinstance(m, nn.ReLU):
                    self._inplace.append((m, m.inplace))
                    m.inplace = False
                    self._handles.append(m.register_forward_hook(self._soft_relu))
        self.softened = [m for m, _ in self._inplace]  # the ReLU modules blended into Swish
        self.skipped = [m for m in skip_modules if skip_eligible(m)]  # the layers bypassed
        for m in self.skipped:
            self._handles.append(m.register_forward_hook(self._soft_skip))
        _ACTIVE[model] = self

    def _soft_relu(self, module, inputs, output):
        if self.alpha == 0.0:
            return output
        return (1.0 - self.alpha) * output + self.alpha * F.silu(inputs[0])

    def _soft_skip(self, module, inputs, output):
        if self.alpha == 0.0 or self.skip == 0.0:
            return output
        dim = -1 if isinstance(module, nn.Linear) else 1
        return output + (self.alpha * self.skip) * _partial_identity(inputs[0], output.shape[dim], dim)

    def remove(self) -> None:
        """Remove every hook, restore ``inplace``, and unregister (idempotent)."""
        for h in self._handles:
            h.remove()
        for m, inplace in self._inplace:
            m.inplace = inplace
        self._handles, self._inplace = [], []
        if _ACTIVE.get(self.model) is self:
            del _ACTIVE[self.model]
