""":class:`ELSALinear`: an ``nn.Linear`` serving one encoded weight ``[out_features, in_features]``
at any level (ELSA, arXiv 2312.06872, section 2.2); the paths are :class:`~elsa_codec.serving.base.ELSAModule`'s.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ELSAError
from . import base as _base
from .base import ELSAModule, _encode_weight
from .gpu_plan import gpu_packed_for, refresh_gpu_packed

__all__ = ["ELSALinear"]


class ELSALinear(ELSAModule, nn.Linear):
    """``nn.Linear`` serving an encoded weight at any of its levels (ELSA, arXiv 2312.06872, sec. 2.2).

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        num_levels: ``T``.
        code_bits: ``k``; default ``max(1, ceil(log2(T+1)))``.
        structures: structures of levels ``1..T``.
        level: initial level (default dense, ``T+1``).
        backend: ``"auto"`` | ``"reference"`` | ``"triton"`` | ``"triton-packed"`` | ``"sparse-cpu"``
            | ``"semi-structured"``.
        cache: cache the decoded weight of the current sparse level (reference path).
        compile_mode: ``"tensor"`` (default) | ``"static"``.
        device, dtype: of the (zero-initialised) weight; float32 / float16 / bfloat16.

    The weight `[out_features, in_features]` is a frozen ``nn.Parameter`` (``requires_grad=False``)
    named ``weight``; the bias `[out_features]` is a normal parameter. Build one with
    :meth:`from_linear` (encodes a ``nn.Linear``) or :meth:`from_encoded`, or let
    :func:`elsa_codec.swap_` do it.

    Forward: `[*, in_features]` -> `[*, out_features]`, in the weight's dtype. On CUDA a sparse
    level runs the fused decode-in-GEMM. With ``backend = "triton-packed"`` (or ``"auto"`` when
    the router :func:`elsa_codec.kernels.triton.cuda_route` predicts it faster: with today's
    model, never) the level is also packed at the level switch
    (:func:`elsa_codec.kernels.triton.pack_level`, its resident bytes in ``repr``) and calls of at
    most 32 rows that need no gradient run :func:`elsa_codec.kernels.triton.packed_linear`.
    ``backend = "triton"`` keeps the fused kernel only: no memory beside the encoded weight.

    Raises:
        ELSAError: bad ``num_levels`` / ``code_bits`` for the dtype, ``structures`` of the wrong
            length, unknown ``backend`` or ``compile_mode``, a level out of range.
    """

    _kernel_fn = "elsa_linear"
    _sparse_cpu_ok = True
    elsa_kind = "linear"
    _gpu_packed = None  # (key, PackedLevel) of the current level on CUDA (serving/gpu_plan.py)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, num_levels: int,
                 code_bits: int | None = None, structures=None, level=None, backend: str = "auto",
                 cache: bool = True, compile_mode: str = "tensor", device=None, dtype=None,
                 _weight=None, _bias=None, _sparsities=None, _tensor_info=None):
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device="meta", dtype=dtype)
        dtype = dtype or torch.get_default_dtype()
        blank = _weight is None  # no encoded weight yet: the first one loaded sets the record
        if blank:
            _weight = torch.zeros(out_features, in_features, device=device, dtype=dtype)
        if bias and _bias is None:
            _bias = torch.zeros(out_features, device=_weight.device, dtype=_weight.dtype)
        if tuple(_weight.shape) != (out_features, in_features):
            raise ELSAError(f"ELSALinear: weight has shape {tuple(_weight.shape)}, expected ({out_features}, {in_features})")
        self._elsa_init(_weight, _bias if bias else None, num_levels=num_levels, code_bits=code_bits,
                        structures=structures, sparsities=_sparsities, tensor_info=_tensor_info, level=level,
                        backend=backend, cache=cache, compile_mode=compile_mode, blank=blank)

    @classmethod
    def from_encoded(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *, num_levels: int,
                     code_bits: int | None = None, structures=None, sparsities=None, tensor_info=None,
                     **kwargs) -> "ELSALinear":
        """Wrap an already encoded weight `[out_features, in_features]` (no copy) and optional bias
        `[out_features]` (a ``nn.Parameter`` is kept as it is, another tensor is copied).

        Raises:
            ELSAError: weight not 2-D, unsupported dtype or ``code_bits``, bias of another shape.
        """
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ELSAError(f"ELSALinear: the encoded weight must be a 2-D tensor [out_features, in_features], got {getattr(weight, 'shape', type(weight))}")
        out_f, in_f = weight.shape
        if bias is not None and tuple(bias.shape) != (out_f,):
            raise ELSAError(f"ELSALinear: bias has shape {tuple(bias.shape)}, expected ({out_f},)")
        return cls(in_f, out_f, bias is not None, num_levels=num_levels, code_bits=code_bits, structures=structures,
                   dtype=weight.dtype, _weight=weight, _bias=bias, _sparsities=sparsities, _tensor_info=tensor_info, **kwargs)

    @classmethod
    def from_linear(cls, linear: nn.Linear, counters, *, code_bits: int | None = None, num_levels: int | None = None,
                    structures=None, **kwargs) -> "ELSALinear":
        """Encode ``linear.weight`` with ``counters`` (the code rule) into a new module.

        Args:
            linear: a ``nn.Linear``; never modified (weight encoded into a new tensor, bias copied).
            counters: integer tensor `[out_features, in_features]` with values ``1..T+1``, or a
                :class:`~elsa_codec.format.encode.Counters` / mapping holding it (under ``"weight"`` or
                as its only entry; its ``num_levels`` and ``structures`` are used).
            code_bits, num_levels, structures: as :func:`elsa_codec.encode`.
            kwargs: ``level``, ``backend``, ``cache``, ``compile_mode``.

        Raises:
            ELSAError: not a ``nn.Linear``; the errors of :func:`elsa_codec.encode`.
        """
        if not isinstance(linear, nn.Linear):
            raise ELSAError(f"from_linear needs a nn.Linear, got {type(linear).__name__}")
        w, kw = _encode_weight(linear, counters, code_bits, num_levels, structures, "weight")
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls.from_encoded(w, bias, **kw, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            if self.compile_mode == "static" and self._level <= self.num_levels and self._triton and _base._KERNELS:
                # traces to the opaque op torch.ops.elsa_codec.linear
                return _base._KERNELS.elsa_linear(x, self.weight, self._level, self.code_bits, self.bias)
            return F.linear(x, self._compiled_weight(), self.bias)
        t = self._level
        if t > self.num_levels:
            return F.linear(x, self.weight, self.bias)
        if self._triton:
            k = self._kernels_for("elsa_linear")
            packed = gpu_packed_for(self, x, k)
            if packed is not None:  # decode-sized call: read the packed level only (serving/gpu_plan.py)
                return k.packed_linear(x, packed, self.bias)
            return k.elsa_linear(x, self.weight, t, self.code_bits, self.bias, tile_table=self.tile_table())
        if self._sparse_cpu:
            y = self._sparse_cpu_linear(x)
            if y is not None:
                return y
        return F.linear(x, self.decoded_weight(), self.bias)

    def tile_table(self) -> torch.Tensor:
        """The per-64x64-tile minimum-code table of the weight (uint8
        `[cdiv(out_features, 64), cdiv(in_features, 64)]`), computed once with
        :func:`elsa_codec.kernels.triton.tile_table` and kept at runtime only (never in ``state_dict``)."""
        return self._cached_tile_table(self.weight)

    def _refresh_path(self) -> None:
        super()._refresh_path()
        k = _base._kernels() if self._triton else None
        if k is not None and k.kernels_available(self.weight.device):
            refresh_gpu_packed(self, k)
        else:  # not on the triton path, or forced there without a device (forward raises)
            self._gpu_packed = None

    def extra_repr(self) -> str:
        text = f"{nn.Linear.extra_repr(self)}, {self._elsa_repr()}"
        if getattr(self, "_gpu_packed", None) is not None:
            p = self._gpu_packed[1]
            text += f", gpu packed level for M <= 32 ({p.tile_n}x64 tiles, {p.nbytes / 2**20:.2f} MiB resident)"
        return text
