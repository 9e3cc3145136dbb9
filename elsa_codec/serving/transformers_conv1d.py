"""``ELSATransformersConv1D``: the ``transformers`` ``Conv1D`` (GPT-2 family) serving one encoded weight.

``transformers.pytorch_utils.Conv1D`` is a linear layer with a transposed weight `[in, out]`
(``y = addmm(bias, x, W)``). ELSA (arXiv 2312.06872, sec. 2.2) serves it like
:class:`~elsa_codec.serving.linear.ELSALinear`: dense level = the stock ``addmm`` on the stored tensor; sparse
level on the CPU = the packed level of ``W.t()`` and the ``sparse-cpu`` kernels (or ``addmm``
with the decoded weight of the level, cached, on the reference backend); on CUDA = the fused
Triton GEMM :func:`elsa_codec.kernels.triton.elsa_linear` on the transposed view ``W.t()``
(`[out, in]`, strides swapped, no copy) with its tile table.

Importing this module imports ``transformers``; :func:`elsa_codec.swap_` imports it only when the
model holds a ``Conv1D`` (so ``transformers`` is loaded already).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import ELSAError
from . import base as _elsa_nn
from .base import ELSAModule, _encode_weight

__all__ = ["ELSATransformersConv1D"]


class ELSATransformersConv1D(ELSAModule, Conv1D):
    """``transformers`` ``Conv1D`` serving an encoded weight at any of its levels (ELSA, sec. 2.2).

    Args:
        nf: output features. nx: input features.
        num_levels, code_bits, structures, level, backend, cache, compile_mode, device, dtype: as
            :class:`~elsa_codec.serving.linear.ELSALinear`.

    The weight `[nx, nf]` (``[in_features, out_features]``, as ``Conv1D``) is a frozen
    ``nn.Parameter`` named ``weight``; the bias `[nf]` a normal parameter. Forward:
    `[*, nx]` -> `[*, nf]` in the weight's dtype. ``isinstance(m, Conv1D)`` holds.

    Raises:
        ELSAError: as :class:`~elsa_codec.serving.linear.ELSALinear`.
    """

    _kernel_fn = "elsa_linear"
    _sparse_cpu_ok = True
    elsa_kind = "conv1d_t"

    def _linear_weight(self) -> torch.Tensor:
        return self.weight.t()  # `[nf, nx]`: output features first

    def __init__(self, nf: int, nx: int, *, num_levels: int, code_bits: int | None = None, structures=None,
                 level=None, backend: str = "auto", cache: bool = True, compile_mode: str = "tensor",
                 device=None, dtype=None, _weight=None, _bias=None, _sparsities=None, _tensor_info=None):
        nn.Module.__init__(self)  # Conv1D.__init__ would allocate and initialise a weight we replace
        self.nf, self.nx = nf, nx
        dtype = dtype or torch.get_default_dtype()
        blank = _weight is None  # no encoded weight yet: the first one loaded sets the record
        if blank:
            _weight = torch.zeros(nx, nf, device=device, dtype=dtype)
        if _bias is None:
            _bias = torch.zeros(nf, device=_weight.device, dtype=_weight.dtype)
        if tuple(_weight.shape) != (nx, nf):
            raise ELSAError(f"ELSATransformersConv1D: weight has shape {tuple(_weight.shape)}, expected [nx, nf] = ({nx}, {nf})")
        if tuple(_bias.shape) != (nf,):
            raise ELSAError(f"ELSATransformersConv1D: bias has shape {tuple(_bias.shape)}, expected ({nf},)")
        self._elsa_init(_weight, _bias, num_levels=num_levels, code_bits=code_bits, structures=structures,
                        sparsities=_sparsities, tensor_info=_tensor_info, level=level, backend=backend,
                        cache=cache, compile_mode=compile_mode, blank=blank)

    @classmethod
    def from_encoded(cls, weight: torch.Tensor, bias: torch.Tensor, *, num_levels: int, code_bits: int | None = None,
                     structures=None, sparsities=None, tensor_info=None, **kwargs) -> "ELSATransformersConv1D":
        """Wrap an already encoded weight `[nx, nf]` (no copy; a ``nn.Parameter`` is kept as it is)
        and its bias `[nf]` (a ``nn.Parameter`` is kept, another tensor copied).

        Raises:
            ELSAError: weight not 2-D, bias of another shape, unsupported dtype or ``code_bits``.
        """
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ELSAError(f"ELSATransformersConv1D: the encoded weight must be a 2-D tensor [nx, nf], got {getattr(weight, 'shape', type(weight))}")
        nx, nf = weight.shape
        return cls(nf, nx, num_levels=num_levels, code_bits=code_bits, structures=structures, dtype=weight.dtype,
                   _weight=weight, _bias=bias, _sparsities=sparsities, _tensor_info=tensor_info, **kwargs)

    @classmethod
    def from_conv1d(cls, conv: Conv1D, counters, *, code_bits: int | None = None, num_levels: int | None = None,
                    structures=None, **kwargs) -> "ELSATransformersConv1D":
        """Encode ``conv.weight`` (`[nx, nf]`) with ``counters`` of the same shape (values
        ``1..T+1``, or a :class:`~elsa_codec.format.encode.Counters`) into a new module; ``conv`` is never
        modified.

        Raises:
            ELSAError: not a ``Conv1D``; the errors of :func:`elsa_codec.encode`.
        """
        if not isinstance(conv, Conv1D):
            raise ELSAError(f"from_conv1d needs a transformers Conv1D, got {type(conv).__name__}")
        w, kw = _encode_weight(conv, counters, code_bits, num_levels, structures, "weight")
        return cls.from_encoded(w, conv.bias.detach().clone(), **kw, **kwargs)

    def tile_table(self) -> torch.Tensor:
        """The per-64x64-tile minimum-code table of ``weight.t()`` (uint8
        `[cdiv(nf, 64), cdiv(nx, 64)]`), computed once, runtime only."""
        return self._cached_tile_table(self.weight.t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        x2 = x.view(-1, x.size(-1))
        t = self._level
        if torch.compiler.is_compiling():
            K = _elsa_nn._KERNELS
            if self.compile_mode == "static" and t <= self.num_levels and self._triton and K:
                y = K.elsa_linear(x2, self.weight.t(), t, self.code_bits, self.bias)
            else:
                y = torch.addmm(self.bias, x2, self._compiled_weight())
        elif t > self.num_levels:
            y = torch.addmm(self.bias, x2, self.weight)
        elif self._triton:
            k = self._kernels_for("elsa_linear")
            y = k.elsa_linear(x2, self.weight.t(), t, self.code_bits, self.bias, tile_table=self.tile_table())
        elif self._sparse_cpu and (y := self._sparse_cpu_linear(x2)) is not None:
            pass
        else:
            y = torch.addmm(self.bias, x2, self.decoded_weight())
        return y.view(size_out)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}, {self._elsa_repr()}"

    def __repr__(self) -> str:  # Conv1D overrides __repr__; use nn.Module's, which shows extra_repr
        return nn.Module.__repr__(self)
