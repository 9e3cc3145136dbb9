""":class:`ELSAConv2d` / :class:`ELSAConv1d`: ``nn.Conv2d`` / ``nn.Conv1d`` serving one encoded
weight ``[out_channels, in_channels/groups, *kernel]`` at any level (the level decoded once per
switch, then the stock convolution).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ELSAError
from .base import ELSAModule, _encode_weight

__all__ = ["ELSAConv2d", "ELSAConv1d"]


class _ELSAConvNd(ELSAModule):
    """Shared code of :class:`ELSAConv1d` / :class:`ELSAConv2d` (``_conv_cls`` is the stock class)."""

    _kernel_fn = "decode_level"
    _conv_cls: type = nn.Conv2d
    elsa_kind = "conv"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *, num_levels: int,
                 code_bits: int | None = None, structures=None, level=None, backend: str = "auto",
                 cache: bool = True, compile_mode: str = "tensor", device=None, dtype=None,
                 _weight=None, _bias=None, _sparsities=None, _tensor_info=None):
        self._conv_cls.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                                padding_mode, device="meta", dtype=dtype)
        dtype = dtype or torch.get_default_dtype()
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        blank = _weight is None  # no encoded weight yet: the first one loaded sets the record
        if blank:
            _weight = torch.zeros(shape, device=device, dtype=dtype)
        if bias and _bias is None:
            _bias = torch.zeros(out_channels, device=_weight.device, dtype=_weight.dtype)
        if tuple(_weight.shape) != shape:
            raise ELSAError(f"{type(self).__name__}: weight has shape {tuple(_weight.shape)}, expected {shape}")
        self._elsa_init(_weight, _bias if bias else None, num_levels=num_levels, code_bits=code_bits,
                        structures=structures, sparsities=_sparsities, tensor_info=_tensor_info, level=level,
                        backend=backend, cache=cache, compile_mode=compile_mode, blank=blank)

    @classmethod
    def from_encoded(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *, like: nn.Module,
                     num_levels: int, code_bits: int | None = None, structures=None, sparsities=None,
                     tensor_info=None, **kwargs):
        """Wrap an already encoded weight `[out_channels, in_channels / groups, *kernel_size]` (no
        copy; a ``nn.Parameter`` is kept as it is) with the configuration (stride, padding, ...) of
        the stock convolution ``like``.

        Raises:
            ELSAError: ``like`` of another class, weight shape differs from ``like``'s, unsupported
                dtype or ``code_bits``.
        """
        if not isinstance(like, cls._conv_cls):
            raise ELSAError(f"{cls.__name__}.from_encoded: like= must be a {cls._conv_cls.__name__}, got {type(like).__name__}")
        if bias is not None and tuple(bias.shape) != (like.out_channels,):
            raise ELSAError(f"{cls.__name__}: bias has shape {tuple(bias.shape)}, expected ({like.out_channels},)")
        return cls(like.in_channels, like.out_channels, like.kernel_size, like.stride, like.padding, like.dilation,
                   like.groups, bias is not None, like.padding_mode, num_levels=num_levels, code_bits=code_bits,
                   structures=structures, dtype=weight.dtype, _weight=weight, _bias=bias, _sparsities=sparsities,
                   _tensor_info=tensor_info, **kwargs)

    @classmethod
    def from_conv(cls, conv: nn.Module, counters, *, code_bits: int | None = None, num_levels: int | None = None,
                  structures=None, **kwargs):
        """Encode ``conv.weight`` with ``counters`` (the code rule) into a new module.

        Args:
            conv: a stock convolution of this class's kind; never modified.
            counters: integer tensor of the weight's shape with values ``1..T+1``, or a
                :class:`~elsa_codec.format.encode.Counters` holding it.
            code_bits, num_levels, structures, kwargs: as :meth:`ELSALinear.from_linear`.

        Raises:
            ELSAError: ``conv`` of another class; the errors of :func:`elsa_codec.encode`.
        """
        if not isinstance(conv, cls._conv_cls):
            raise ELSAError(f"{cls.__name__}.from_conv needs a {cls._conv_cls.__name__}, got {type(conv).__name__}")
        w, kw = _encode_weight(conv, counters, code_bits, num_levels, structures, "weight")
        bias = None if conv.bias is None else conv.bias.detach().clone()
        return cls.from_encoded(w, bias, like=conv, **kw, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._conv_forward(x, self._compiled_weight(), self.bias)
        if self._level > self.num_levels:
            return self._conv_forward(x, self.weight, self.bias)
        return self._conv_forward(x, self.decoded_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{self._conv_cls.extra_repr(self)}, {self._elsa_repr()}"


class ELSAConv2d(_ELSAConvNd, nn.Conv2d):
    """``nn.Conv2d`` serving an encoded weight at any of its levels (ELSA, arXiv 2312.06872, sec. 2.2).

    Supports everything ``nn.Conv2d`` does (stride, padding incl. ``'same'`` / ``'valid'``,
    dilation, groups incl. depthwise, padding modes ``zeros`` / ``reflect`` / ``replicate`` /
    ``circular``): the forward is ``nn.Conv2d``'s on the level's weight. Dense level: the stored
    weight; sparse level: the decoded weight of the level, cached (decoded by the reference on the
    CPU, by :func:`elsa_codec.kernels.triton.decode_level` on CUDA, then cuDNN).

    Args:
        in_channels ... padding_mode: as ``nn.Conv2d``.
        num_levels, code_bits, structures, level, backend, cache, compile_mode, device, dtype: as
            :class:`ELSALinear`.

    The weight `[out_channels, in_channels / groups, kh, kw]` is a frozen ``nn.Parameter`` named
    ``weight``. Forward: `[N, C_in, H, W]` (or `[C_in, H, W]`) -> `[N, C_out, H_out, W_out]`.
    Build one with :meth:`from_conv2d` / :meth:`from_encoded` (``like=`` a ``nn.Conv2d``).

    Raises:
        ELSAError: as :class:`ELSALinear`.
    """

    _conv_cls = nn.Conv2d

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, counters, **kwargs) -> "ELSAConv2d":
        """:meth:`from_conv` for a ``nn.Conv2d`` (kept for its name)."""
        return cls.from_conv(conv, counters, **kwargs)


class ELSAConv1d(_ELSAConvNd, nn.Conv1d):
    """``nn.Conv1d`` serving an encoded weight at any of its levels (as :class:`ELSAConv2d`).

    The weight `[out_channels, in_channels / groups, k]` is a frozen ``nn.Parameter`` named
    ``weight``. Forward: `[N, C_in, L]` (or `[C_in, L]`) -> `[N, C_out, L_out]`. Build one with
    :meth:`from_conv` / :meth:`from_encoded` (``like=`` a ``nn.Conv1d``).

    Raises:
        ELSAError: as :class:`ELSALinear`.
    """

    _conv_cls = nn.Conv1d
