"""``ELSAEmbedding``: an ``nn.Embedding`` whose table is one encoded weight serving every level.

ELSA (Halvachi et al., arXiv 2312.06872), section 2.2; docs/DESIGN.md, "Serving". A lookup decodes only
the rows it gathers: ``rows = table[ids]``, then ``where(code(rows) < t, rows, 0)``, which is bit
for bit the lookup in ``extract(encoded, t)``'s table (the gather copies bit patterns, the level
mask is elementwise). Nothing of the level is cached: a sparse level costs one elementwise pass
over the looked-up rows, never a decoded copy of the table.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ELSAError
from ..format.bits import extract_level
from .base import ELSAModule, _encode_weight

__all__ = ["ELSAEmbedding"]


class ELSAEmbedding(ELSAModule, nn.Embedding):
    """``nn.Embedding`` serving an encoded table at any of its levels (ELSA, arXiv 2312.06872, sec. 2.2).

    Args:
        num_embeddings, embedding_dim, padding_idx, norm_type, scale_grad_by_freq, sparse: as
            ``nn.Embedding``. ``max_norm`` must be None: it renormalises looked-up rows of the
            table in place, which would overwrite their codes.
        num_levels, code_bits, structures, level, backend, compile_mode, device, dtype: as
            :class:`~elsa_codec.serving.linear.ELSALinear`. ``backend="triton"`` decodes the gathered rows
            with :func:`elsa_codec.kernels.triton.decode_level`; ``"reference"`` with
            :func:`elsa_codec.format.bits.extract_level`.

    The table `[num_embeddings, embedding_dim]` is a frozen ``nn.Parameter`` named ``weight``
    (float32 / float16 / bfloat16). Forward: integer ids `[*]` -> `[*, embedding_dim]` in the
    table's dtype.

    Raises:
        ELSAError: ``max_norm`` set; the errors of :class:`~elsa_codec.serving.linear.ELSALinear`.
    """

    _kernel_fn = "decode_level"
    elsa_kind = "embedding"

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 max_norm: float | None = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                 sparse: bool = False, *, num_levels: int, code_bits: int | None = None, structures=None,
                 level=None, backend: str = "auto", cache: bool = True, compile_mode: str = "tensor",
                 device=None, dtype=None, _weight=None, _sparsities=None, _tensor_info=None):
        if max_norm is not None:
            raise ELSAError(
                f"ELSAEmbedding: max_norm={max_norm} renormalises looked-up rows of the table in place, which would "
                "overwrite their level codes; an embedding with max_norm cannot be served"
            )
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, padding_idx, None, norm_type, scale_grad_by_freq,
                              sparse, device="meta", dtype=dtype)
        dtype = dtype or torch.get_default_dtype()
        blank = _weight is None  # no encoded weight yet: the first one loaded sets the record
        if blank:
            _weight = torch.zeros(num_embeddings, embedding_dim, device=device, dtype=dtype)
        if tuple(_weight.shape) != (num_embeddings, embedding_dim):
            raise ELSAError(f"ELSAEmbedding: weight has shape {tuple(_weight.shape)}, expected ({num_embeddings}, {embedding_dim})")
        self._elsa_init(_weight, None, num_levels=num_levels, code_bits=code_bits, structures=structures,
                        sparsities=_sparsities, tensor_info=_tensor_info, level=level, backend=backend,
                        cache=cache, compile_mode=compile_mode, blank=blank)

    @classmethod
    def from_encoded(cls, weight: torch.Tensor, *, like: nn.Embedding, num_levels: int, code_bits: int | None = None,
                     structures=None, sparsities=None, tensor_info=None, **kwargs) -> "ELSAEmbedding":
        """Wrap an already encoded table `[num_embeddings, embedding_dim]` (no copy; a
        ``nn.Parameter`` is kept as it is) with the options (``padding_idx``...) of ``like``.

        Raises:
            ELSAError: ``like`` not a ``nn.Embedding``, or with ``max_norm``; shape or dtype errors.
        """
        if not isinstance(like, nn.Embedding):
            raise ELSAError(f"ELSAEmbedding.from_encoded: like= must be a nn.Embedding, got {type(like).__name__}")
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ELSAError(f"ELSAEmbedding: the encoded table must be a 2-D tensor [num_embeddings, embedding_dim], got {getattr(weight, 'shape', type(weight))}")
        n, d = weight.shape
        return cls(n, d, like.padding_idx, like.max_norm, like.norm_type, like.scale_grad_by_freq, like.sparse,
                   num_levels=num_levels, code_bits=code_bits, structures=structures, dtype=weight.dtype,
                   _weight=weight, _sparsities=sparsities, _tensor_info=tensor_info, **kwargs)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, counters, *, code_bits: int | None = None,
                       num_levels: int | None = None, structures=None, **kwargs) -> "ELSAEmbedding":
        """Encode ``embedding.weight`` with ``counters`` (integer `[num_embeddings, embedding_dim]`,
        values ``1..T+1``, or a :class:`~elsa_codec.format.encode.Counters`) into a new module; ``embedding``
        is never modified.

        Raises:
            ELSAError: not a ``nn.Embedding``; the errors of :func:`elsa_codec.encode`.
        """
        if not isinstance(embedding, nn.Embedding):
            raise ELSAError(f"from_embedding needs a nn.Embedding, got {type(embedding).__name__}")
        w, kw = _encode_weight(embedding, counters, code_bits, num_levels, structures, "weight")
        return cls.from_encoded(w, like=embedding, **kw, **kwargs)

    def _rows_of_level(self, rows: torch.Tensor, t: int) -> torch.Tensor:
        if self._triton:
            return self._kernels_for("decode_level").decode_level(rows, t, self.code_bits)
        return extract_level(rows, t, self.code_bits)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(input, self.weight, self.padding_idx, None, self.norm_type, self.scale_grad_by_freq, self.sparse)
        if torch.compiler.is_compiling():
            return self._compiled_level(rows)
        t = self._level
        if t > self.num_levels:
            return rows
        return self._rows_of_level(rows, t)

    def extra_repr(self) -> str:
        return f"{nn.Embedding.extra_repr(self)}, {self._elsa_repr()}"

