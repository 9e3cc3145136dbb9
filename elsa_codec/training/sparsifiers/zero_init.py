"""ZerO initialisation (Zhao, Schäfer, Anandkumar 2021, "ZerO Initialization: Initializing Neural
Networks with only Zeros and Ones", TMLR 2022, Algorithm 1): every linear map starts as a partial
identity, or, where it widens (more outputs than inputs), as a scaled Hadamard matrix cut to shape;
a convolution gets that matrix at the centre of its kernel and zeros elsewhere; biases start at 0.
It is deterministic (no random numbers) and starts every layer at low rank, which the end-to-end
pruning pipeline (arXiv 2312.01653, stage 1) uses before the dense training.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ...errors import ELSAError

__all__ = ["hadamard", "zero_matrix", "zero_init_"]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def hadamard(m: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix `[2**m, 2**m]` float32 of entries +1 / -1 (``m >= 0``)."""
    h = torch.ones(1, 1)
    for _ in range(int(m)):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def zero_matrix(out_features: int, in_features: int) -> torch.Tensor:
    """ZerO's matrix `[out_features, in_features]` float32 (Zhao et al. 2021, Algorithm 1).

    - ``out == in``: the identity;
    - ``out < in``: the partial identity ``[I, 0]`` (the first ``out`` inputs);
    - ``out > in``: ``c * H[:out, :in]`` with ``H`` the Hadamard matrix of size ``2**m``,
      ``m = ceil(log2(out))`` and ``c = 2 ** (-(m - 1) / 2)``.

    Raises:
        ELSAError: a size below 1.
    """
    p, q = int(out_features), int(in_features)
    if p < 1 or q < 1:
        raise ELSAError(f"zero_matrix: sizes must be >= 1, got [{p}, {q}]")
    if p <= q:
        return torch.eye(p, q)
    m = max(1, math.ceil(math.log2(p)))
    return hadamard(m)[:p, :q] * 2.0 ** (-(m - 1) / 2.0)


@torch.no_grad()
def zero_init_(model: nn.Module, filter_fn: Callable[[nn.Module, str], bool] | None = None) -> list[str]:
    """ZerO-initialise ``model`` in place (Zhao et al. 2021): every ``nn.Linear`` and ``nn.Conv1d/2d/3d``
    (or those ``filter_fn(module, fqn)`` accepts) gets :func:`zero_matrix` (for a convolution,
    `[out, in / groups]` at the centre of the kernel, zeros elsewhere) and a zero bias. For a network
    trained from scratch: it replaces whatever the weights held. Other modules (norms, embeddings)
    keep their initialisation.

    Args:
        model: ``nn.Module``; weights of any float dtype, on any device.
        filter_fn: ``(module, fqn) -> bool`` (the torchao convention); default every Linear / Conv.

    Returns:
        The qualified names of the modules initialised.

    Raises:
        ELSAError: ``filter_fn`` selected a module that is not a Linear / Conv layer.
    """
    done = []
    for fqn, mod in model.named_modules():
        chosen = isinstance(mod, _LAYERS) if filter_fn is None else filter_fn(mod, fqn)
        if not chosen:
            continue
        if not isinstance(mod, _LAYERS):
            raise ELSAError(f"zero_init_: {fqn or 'model'} is a {type(mod).__name__}, not a Linear / Conv layer")
        w = mod.weight
        mat = zero_matrix(w.shape[0], w.shape[1]).to(device=w.device, dtype=w.dtype)
        if w.dim() == 2:
            w.copy_(mat)
        else:
            w.zero_()
            w[(slice(None), slice(None)) + tuple(k // 2 for k in w.shape[2:])] = mat
        if mod.bias is not None:
            mod.bias.zero_()
        done.append(fqn)
    return done
