"""``ELSAConfig``: every choice of an ELSA training run, validated, serialisable to JSON.

ELSA (Halvachi, Peste, Alistarh, Lampert, arXiv 2312.06872), sections 2.1-2.2. One config drives
:class:`elsa_codec.LevelEmbedder` (own loop, Hugging Face ``Trainer``, Lightning) and
:func:`elsa_codec.embed_levels`; it is recorded in the embedder's checkpoint state and in the
encoded file's metadata (``ELSAResult.encode()``), so a run says how it was made.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import ELSAError, ELSATypeError
from ..format.selection import SELECT_POLICIES
from .distill import DistillConfig
from .schedule import GMPSchedule
from .sparsifiers.base import DISTRIBUTIONS, Sparsifier

__all__ = ["ELSAConfig", "VERIFY_MODES", "DENSIFY_INITS"]

#: When the frozen bits are compared with their frozen values: at every optimizer step
#: (``"step"``, a full compare per step), at every phase end, freeze and ``finalize`` (``"phase_end"``,
#: the default: the per-step restore keeps them bit-exact anyway), or never (``"off"``).
VERIFY_MODES = ("step", "phase_end", "off")
#: What the pruned weights restart from when a level's densify phase begins.
DENSIFY_INITS = ("zero", "restore")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SHORT = ("warn", "raise")


def _dtype_name(dt) -> str | None:
    return None if dt is None else str(dt).replace("torch.", "")


def _check_int(name: str, v, *, allow_none: bool = False, minimum: int = 0) -> None:
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ELSAError(f"ELSAConfig.{name} must be an int >= {minimum}{' or None' if allow_none else ''}, got {v!r}")


@dataclass
class ELSAConfig:
    """Every choice of an ELSA run (arXiv 2312.06872, sec. 2.1-2.2), checked on construction.

    Attributes:
        levels: sparsest first: sparsities in (0, 1), strictly decreasing (``[0.9, 0.75, 0.5]``),
            or N:M patterns with one M (``["1:4", "2:4"]``).
        steps: optimizer steps of each sparsify phase (GMP ramp + fine-tuning at the target).
        densify_steps: steps of each densify phase but the last (default ``steps``).
        final_steps: steps of the last densify phase, the dense network's training (default
            ``densify_steps``).
        structure: ``"unstructured"`` or ``"block:RxC"`` for fractional levels.
        sparsifier: how a level's target spreads over the tensors: ``"uniform"``, ``"global"``,
            ``"erk"`` (:class:`elsa_codec.MagnitudeSparsifier`), a :class:`elsa_codec.Sparsifier`,
            or a mask function ``(name, weight, frozen_mask, target) -> mask``.
        schedule: where the cubic GMP ramp sits in a sparsify phase
            (:class:`elsa_codec.GMPSchedule`; default ramp over the first 70%, 10 pruning steps).
        densify_init: ``"zero"`` (default: the pruned weights restart from zero) or ``"restore"``
            (from their values before the level's sparsify phase). Measured
            (``bench/densify_init.py``, digits / breast cancer / wine, 3 seeds): ``"zero"`` gives the
            better dense level on all three (+0.25 to +0.6 points) but leaves 5-13% of its
            weights at zero; ``"restore"`` leaves none.
        freeze_shared: freeze the non-prunable parameters (biases, norm affine) with level 1, so
            every level is bit for bit the network that was frozen.
        encode_dtype: the dtype the file ships in when narrower than float32 master weights
            (``torch.bfloat16`` or ``"bfloat16"``); None: the weights' dtype.
        code_bits: ``k`` (default ``max(1, ceil(log2(T+1)))``).
        seed: seeds the embedder's own generator (batch-norm calibration) and ``phase.seed`` (for
            the user's data order); the global torch RNG is never re-seeded. None: not reproducible.
        select: which weights carry levels: a policy of :data:`elsa_codec.SELECT_POLICIES`
            (default ``"blocks"``) or a list of module / parameter names.
        filter_fn: ``(module, fqn) -> bool`` (the torchao convention), called on every module with
            a ``weight`` Parameter; replaces ``select`` when given.
        verify: one of :data:`VERIFY_MODES` (default ``"phase_end"``).
        on_short: ``"warn"`` (default) or ``"raise"`` when a phase ran fewer optimizer steps than
            planned (the GMP ramp was cut short) or the run was finalized with steps missing.
        bn_batches: at most this many calibration batches per level (per-level batch norm).
        distill: a :class:`elsa_codec.DistillConfig` (or its dict): a distillation term toward the
            original network (the model as it was when the embedder was built) in the densify
            phases and the final dense phase, so the dense level stays the model ELSA started
            from; None: no term (the training loop's own loss only).

    Raises:
        ELSAError: any field out of range, naming it (levels are parsed here too).
    """

    levels: list
    steps: int
    densify_steps: int | None = None
    final_steps: int | None = None
    structure: str = "unstructured"
    sparsifier: Any = "uniform"
    schedule: GMPSchedule | None = None
    densify_init: str = "zero"
    freeze_shared: bool = True
    encode_dtype: Any = None
    code_bits: int | None = None
    seed: int | None = None
    select: Any = "blocks"
    filter_fn: Callable | None = field(default=None, compare=False)
    verify: str = "phase_end"
    on_short: str = "warn"
    bn_batches: int | None = None
    distill: DistillConfig | None = None

    def __post_init__(self):
        from ..format.structure import parse_levels

        if isinstance(self.levels, str) and "," in self.levels:
            raise ELSATypeError(f"ELSAConfig.levels must be a list, got the string {self.levels!r}; "
                                f"pass a list, e.g. levels={[p.strip() for p in self.levels.split(',')]!r}")
        if isinstance(self.levels, (str, float, int)):
            self.levels = [self.levels]
        self.levels = list(self.levels)
        try:
            parse_levels(self.levels, self.structure)
        except ELSAError as e:
            raise ELSAError(f"ELSAConfig.levels / structure: {e}") from None
        _check_int("steps", self.steps)
        _check_int("densify_steps", self.densify_steps, allow_none=True)
        _check_int("final_steps", self.final_steps, allow_none=True)
        _check_int("code_bits", self.code_bits, allow_none=True, minimum=1)
        _check_int("seed", self.seed, allow_none=True)
        _check_int("bn_batches", self.bn_batches, allow_none=True, minimum=1)
        self._check_choices()
        self._check_kinds()

    def _check_choices(self) -> None:
        for name, allowed in (("densify_init", DENSIFY_INITS), ("verify", VERIFY_MODES), ("on_short", _SHORT)):
            if getattr(self, name) not in allowed:
                raise ELSAError(f"ELSAConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.freeze_shared, bool):
            raise ELSAError(f"ELSAConfig.freeze_shared must be a bool, got {self.freeze_shared!r}")
        if isinstance(self.encode_dtype, str):
            if self.encode_dtype not in _DTYPES:
                raise ELSAError(f"ELSAConfig.encode_dtype must be one of {tuple(_DTYPES)} or None, got {self.encode_dtype!r}")
            self.encode_dtype = _DTYPES[self.encode_dtype]
        if self.encode_dtype is not None and self.encode_dtype not in _DTYPES.values():
            raise ELSAError(
                f"ELSAConfig.encode_dtype must be torch.float32, torch.float16 or torch.bfloat16, got {self.encode_dtype!r}"
            )

    def _check_kinds(self) -> None:
        sp = self.sparsifier
        if not (isinstance(sp, Sparsifier) or callable(sp) or sp in DISTRIBUTIONS or sp == "magnitude"):
            raise ELSAError(
                f"ELSAConfig.sparsifier must be one of {DISTRIBUTIONS}, a Sparsifier or a mask function, got {sp!r}"
            )
        if isinstance(self.schedule, dict):
            self.schedule = GMPSchedule(**self.schedule)
        if self.schedule is not None and not isinstance(self.schedule, GMPSchedule):
            raise ELSAError(f"ELSAConfig.schedule must be a GMPSchedule or None, got {type(self.schedule).__name__}")
        if isinstance(self.distill, dict):
            try:
                self.distill = DistillConfig(**self.distill)
            except TypeError as e:
                raise ELSAError(f"ELSAConfig.distill: {e}") from None
        if self.distill is not None and not isinstance(self.distill, DistillConfig):
            raise ELSAError(f"ELSAConfig.distill must be a DistillConfig, its dict or None, got {type(self.distill).__name__}")
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise ELSAError(f"ELSAConfig.filter_fn must be a callable (module, fqn) -> bool, got {type(self.filter_fn).__name__}")
        if self.select is None:
            self.select = "blocks"
        sel = self.select
        if isinstance(sel, str):
            if sel not in SELECT_POLICIES:
                raise ELSAError(f"ELSAConfig.select must be one of {SELECT_POLICIES} or a list of names, got {sel!r}")
        elif callable(sel):
            raise ELSAError("ELSAConfig.select takes a policy or names; pass a predicate as filter_fn=(module, fqn) -> bool")
        else:
            try:
                self.select = [str(n) for n in sel]
            except TypeError:
                raise ELSAError(f"ELSAConfig.select must be a policy or a list of names, got {sel!r}") from None
            if not self.select:
                raise ELSAError("ELSAConfig.select is an empty list of names")

    # ---- derived values ----
    @property
    def num_levels(self) -> int:
        """``T``, the number of embedded sparse levels."""
        return len(self.levels)

    @property
    def densify(self) -> int:
        """Steps of each densify phase but the last."""
        return self.steps if self.densify_steps is None else self.densify_steps

    @property
    def final(self) -> int:
        """Steps of the last densify phase (the dense network's training)."""
        return self.densify if self.final_steps is None else self.final_steps

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run: ``T * steps + (T-1) * densify_steps + final_steps``."""
        T = self.num_levels
        return T * self.steps + (T - 1) * self.densify + self.final

    # ---- serialisation ----
    def to_dict(self) -> dict:
        """A JSON-able dict. A custom sparsifier or ``filter_fn`` is recorded by its ``repr``
        under ``"custom"`` (:meth:`from_dict` then asks for it again)."""
        d = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("schedule", "distill") and v is not None:
                v = dataclasses.asdict(v)
            elif f.name == "encode_dtype":
                v = _dtype_name(v)
            elif f.name in ("sparsifier", "filter_fn") and v is not None and not isinstance(v, str):
                v = {"custom": repr(v)}
            d[f.name] = v
        return d

    def to_json(self) -> str:
        """:meth:`to_dict` as compact JSON (sorted keys)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "ELSAConfig":
        """The config of :meth:`to_dict`; ``overrides`` replace fields (give a custom sparsifier
        or ``filter_fn`` again here).

        Raises:
            ELSAError: an unknown field, or a custom object recorded by repr and not given again.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ELSAError(f"ELSAConfig has no field {unknown[0]!r}")
        d = {**d, **overrides}
        for name in ("sparsifier", "filter_fn"):
            if isinstance(d.get(name), dict):
                raise ELSAError(
                    f"ELSAConfig.{name} was the custom object {d[name].get('custom')}: pass it again ({name}=...)"
                )
        return cls(**d)

    @classmethod
    def from_json(cls, text: str, **overrides) -> "ELSAConfig":
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text), **overrides)

    def diff(self, other: "ELSAConfig") -> list[str]:
        """Names of the serialised fields in which ``other`` differs (for resume checks)."""
        a, b = self.to_dict(), other.to_dict()
        return [k for k in a if a[k] != b.get(k)]
