"""What an ELSA run returns: counters, per-level batch-norm statistics, measured sparsities."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from ..errors import ELSAError
from ..format.encode import Counters, ELSAStateDict, encode
from .distributed import full_state_dict, save_once

__all__ = ["ELSAResult"]


@dataclass
class ELSAResult:
    """What :meth:`elsa_codec.LevelEmbedder.finalize` and :func:`embed_levels` return.

    Attributes:
        counters: :class:`elsa_codec.Counters` (uint8 tensors of the prunable weights' shapes,
            values ``1..T+1``) with ``num_levels`` and the level structures.
        bn_stats: ``{level (1..T+1): {bn_module_fqn: {"running_mean", "running_var",
            "num_batches_tracked": Tensor}}}``, or None without calibration data.
        code_bits: ``k`` used to encode the frozen weights.
        targets: the levels' target sparsities (fractions), sparsest first.
        sparsities: measured sparsity of each level over the prunable tensors (fraction of zeros).
        structures: the levels' structures.
        history: one dict per phase (``kind``, ``level``, ``steps``, ``steps_done`` (optimizer
            steps seen by the hooks), ``sparsity`` (measured at the phase end), ``seconds``).
        model: the trained model (dense level, weights already encoded, batch-norm buffers at the
            dense level's statistics).
        encode_dtype: the dtype the checkpoint ships in when it differs from the training dtype
            (:func:`embed_levels`), else None.
        config: the run's :meth:`elsa_codec.ELSAConfig.to_dict`, recorded by :meth:`encode` in
            the file's metadata (``meta.training``), or None.
    """

    counters: Counters
    bn_stats: dict | None
    code_bits: int
    targets: list
    sparsities: list
    structures: list
    history: list = field(default_factory=list)
    model: nn.Module | None = field(default=None, repr=False)
    encode_dtype: torch.dtype | None = None
    config: dict | None = None

    @property
    def num_levels(self) -> int:
        return self.counters.num_levels

    def level_masks(self, level: int) -> dict[str, torch.Tensor]:
        """``name -> bool`` mask of the weights in level ``level`` (``counter <= level``)."""
        return {n: c <= level for n, c in self.counters.items()}

    def encode(self, state_dict: Mapping[str, torch.Tensor] | None = None, **kwargs) -> ELSAStateDict:
        """``encode(state_dict or model.state_dict(), counters, code_bits=k, bn_stats=bn_stats)``.

        The prunable weights are already encoded in the model, so this re-encoding leaves them
        bit-identical (the code rule is idempotent) and only builds the metadata. With an
        ``encode_dtype`` the floating-point tensors (and batch-norm statistics) are cast to it
        first; the encoded weights are exactly representable in it. The run's config goes into
        the metadata (``meta.training``). A wrapped model (DDP, ``torch.compile``) is written
        under the bare model's names; sharded (FSDP2 DTensor) tensors are gathered to full tensors
        first, a collective: call it on every rank. Extra keyword arguments go to
        :func:`elsa_codec.encode`.

        Raises:
            ELSAError: no state dict and no model; anything :func:`elsa_codec.encode` raises.
        """
        if state_dict is None:
            if self.model is None:
                raise ELSAError("ELSAResult.encode needs a state dict (the result holds no model)")
            state_dict = full_state_dict(self.model)
        bn = self.bn_stats
        if self.encode_dtype is not None:
            dt = self.encode_dtype
            cast = lambda v: v.to(dt) if v.is_floating_point() else v  # noqa: E731
            state_dict = {k: cast(v) for k, v in state_dict.items()}
            if bn:
                bn = {t: {m: {s: cast(v) for s, v in st.items()} for m, st in per.items()} for t, per in bn.items()}
        kwargs.setdefault("code_bits", self.code_bits)
        kwargs.setdefault("bn_stats", bn)
        out = encode(state_dict, self.counters, **kwargs)
        if self.config is not None:
            out.meta.training = dict(self.config)
        return out

    def save(self, path: str, state_dict: Mapping[str, torch.Tensor] | None = None, *, max_shard_size=None,
             **kwargs) -> ELSAStateDict:
        """:meth:`encode`, then :func:`elsa_codec.save_file` on rank 0 only (the other ranks of a
        ``torch.distributed`` run wait at a barrier, so the file exists on every rank on return).
        Call it on every rank (gathering sharded tensors is a collective). Returns the encoded
        state dict (the same on every rank).

        Raises:
            ELSAError: as :meth:`encode` and :func:`elsa_codec.save_file`.
        """
        out = self.encode(state_dict, **kwargs)
        save_once(out, path, max_shard_size=max_shard_size)
        return out
