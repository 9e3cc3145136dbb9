"""Per-level batch norm: each level's running statistics (stored in the file under
:data:`elsa_codec.BN_PREFIX`), following the model's level (``LevelBatchNorm1d/2d/3d``).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import ELSAError
from ..format.encode import resolve_level

__all__ = ["LevelBatchNormMixin", "LevelBatchNorm1d", "LevelBatchNorm2d", "LevelBatchNorm3d", "level_batch_norm"]


# ------------------------------------------------------------------------------------------------
# Per-level batch norm
# ------------------------------------------------------------------------------------------------
class LevelBatchNormMixin:
    """Per-level running statistics for a batch-norm layer (ELSA, arXiv 2312.06872, section 2.2).

    ``level_stats[t]`` holds ``{"running_mean": Tensor [C], "running_var": Tensor [C],
    "num_batches_tracked": Tensor []}`` (any subset) for every level ``t`` in ``1..T+1``, in plain
    attributes (not in ``state_dict``). :meth:`set_level` stores the running buffers back as the
    old level's statistics (so statistics updated in training mode are kept) and copies the new
    level's set into the running buffers in place (same tensors: ``state_dict()`` keys and
    ``torch.compile`` graphs are unaffected). Mixed into any ``_BatchNorm`` subclass by
    :func:`level_batch_norm`.
    """

    def _init_level_stats(self, stats: Mapping, num_levels: int) -> None:
        self.num_levels = int(num_levels)
        self.level_stats = {
            int(t): {s: v.detach().to(device=getattr(self, s).device).clone() for s, v in per.items()}
            for t, per in stats.items()
        }
        self._level = None  # nothing installed yet

    @property
    def level(self):
        """The current level (``None`` until :meth:`set_level` installs one)."""
        return self._level

    def set_level(self, level) -> int:
        """Install the running statistics of ``level`` (``1..T+1`` or ``"dense"``) in the buffers.

        Raises:
            ELSAError: level out of range.
        """
        t = resolve_level(level, self.num_levels)
        if t == self._level:
            return t
        with torch.no_grad():
            if self._level is not None:
                for s in self.level_stats[self._level]:
                    self.level_stats[self._level][s] = getattr(self, s).detach().clone()
            for s, v in self.level_stats[t].items():
                getattr(self, s).copy_(v)
        self._level = t
        return t

    def stats_of(self, level) -> dict:
        """Copies of the statistics of ``level`` (for the current level: the running buffers)."""
        t = resolve_level(level, self.num_levels)
        if t == self._level:
            return {s: getattr(self, s).detach().clone() for s in self.level_stats[t]}
        return {s: v.clone() for s, v in self.level_stats[t].items()}

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.level_stats = {t: {s: fn(v) for s, v in per.items()} for t, per in self.level_stats.items()}
        return out

    def extra_repr(self) -> str:
        lv = "none" if self._level is None else ("dense" if self._level > self.num_levels else self._level)
        return f"{super().extra_repr()}, levels={self.num_levels + 1}, level={lv}"


class LevelBatchNorm1d(LevelBatchNormMixin, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with per-level running statistics (:class:`LevelBatchNormMixin`)."""


class LevelBatchNorm2d(LevelBatchNormMixin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with per-level running statistics (:class:`LevelBatchNormMixin`)."""


class LevelBatchNorm3d(LevelBatchNormMixin, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` with per-level running statistics (:class:`LevelBatchNormMixin`)."""


_LEVEL_BN = {nn.BatchNorm1d: LevelBatchNorm1d, nn.BatchNorm2d: LevelBatchNorm2d, nn.BatchNorm3d: LevelBatchNorm3d}


def _level_bn_class(cls: type) -> type:
    if issubclass(cls, LevelBatchNormMixin):
        return cls
    if cls not in _LEVEL_BN:
        _LEVEL_BN[cls] = type(f"Level{cls.__name__}", (LevelBatchNormMixin, cls), {"__module__": __name__})
    return _LEVEL_BN[cls]


def level_batch_norm(bn: _BatchNorm, stats: Mapping, num_levels: int) -> nn.Module:
    """A per-level copy of the batch-norm layer ``bn`` (never modified): same class plus
    :class:`LevelBatchNormMixin`, sharing ``bn``'s parameter and buffer tensors, with
    ``stats = {level: {stat: Tensor}}`` for levels ``1..T+1``. Nothing is installed in the
    running buffers until :meth:`~LevelBatchNormMixin.set_level` is called.

    Raises:
        ELSAError: ``bn`` is not a batch-norm layer tracking running statistics.
    """
    if not isinstance(bn, _BatchNorm) or not bn.track_running_stats:
        raise ELSAError(f"{type(bn).__name__} is not a batch-norm layer with running statistics")
    cls = _level_bn_class(type(bn))
    new = cls.__new__(cls)
    d = dict(bn.__dict__)
    for key in ("_parameters", "_buffers", "_modules"):
        d[key] = d[key].copy()
    d["_non_persistent_buffers_set"] = set(d.get("_non_persistent_buffers_set", ()))
    new.__dict__.update(d)
    new._init_level_stats(stats, num_levels)
    return new
