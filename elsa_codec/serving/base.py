"""Serving modules: :class:`ELSALinear`, :class:`ELSAConv2d` and per-level batch norm.

ELSA (Halvachi et al., arXiv 2312.06872), sections 2.1-2.2; docs/DESIGN.md, "Serving". Each module
holds ONE encoded weight (same name, shape and dtype as the original module's ``weight``, so
``state_dict()`` keys are unchanged) and the current level ``t``:

- dense level ``T+1``: the stock ``F.linear`` / ``F.conv2d`` on the stored tensor (no copy, no
  decoding, no overhead);
- sparse level on the CPU (``backend`` ``"reference"``): ``where(code < t, W, 0)``
  (:func:`elsa_codec.format.bits.extract_level`), the decoded weight of the current level cached (one
  extra weight while a sparse level is active; ``cache=False`` turns it off; dropped on a level
  change);
- sparse level on the CPU (``backend`` ``"sparse-cpu"``, the default there for :class:`ELSALinear`
  and ``ELSATransformersConv1D`` where it pays): the level packed once per level switch
  (:mod:`elsa_codec.kernels.cpu.packed`: csr, bitmask, bsr or nm, only the kept weights) and multiplied by
  the C++ kernels. Which format, and for which batch sizes, is measured once per distinct shape
  (:mod:`elsa_codec.kernels.cpu.planner`; :attr:`~ELSAModule.cpu_plan`): calls in a batch-size bucket where
  dense measured faster multiply the level's weight unpacked from the packed level (cached when
  :attr:`cache` is on; then resident too); recently used packed levels are kept within
  ``packed_cache_bytes`` (default: the current level only);
- sparse level on CUDA (``backend`` ``"triton"``): :class:`ELSALinear` runs the fused Triton GEMM
  :func:`elsa_codec.kernels.triton.elsa_linear` with the per-tile minimum-code table
  (:func:`elsa_codec.kernels.triton.tile_table`, computed once, runtime only); :class:`ELSAConv2d` decodes
  the level once with :func:`elsa_codec.kernels.triton.decode_level` into a cached weight for cuDNN.

``elsa_codec.kernels.triton`` (Triton) is imported lazily, only when a sparse level runs on CUDA or the
``"triton"`` backend is forced: importing this module never imports Triton nor initialises CUDA.

Batch-norm layers that follow encoded layers keep one set of running statistics per level
(section 2.2 of the paper): :class:`LevelBatchNormMixin` (:class:`LevelBatchNorm1d` / ``2d`` /
``3d``) keeps them in plain (non-persistent) attributes and copies the current level's set into the
usual running buffers, so ``state_dict()`` keys stay those of the original model.

Under ``torch.compile`` (docs/SERVING.md) the default ``compile_mode="tensor"`` reads the level
from a 0-d ``int32`` buffer (``_level_t``): one graph serves every level, a level switch never
recompiles. ``compile_mode="static"`` specialises the graph on the Python level instead (the dense
graph is then exactly the stock model's; one compile per distinct level visited).
"""
from __future__ import annotations

import weakref
from collections.abc import Mapping

import torch
from torch import nn

from ..errors import ELSAError
from ..format.bits import (
    MAX_CODE_BITS,
    bits_view,
    check_code_bits,
    decode_codes,
    decode_counters,
    default_code_bits,
    encode_tensor,
    extract_level,
    kept_counts,
)
from ..format.document import _SPARSITY_TOL
from ..format.encode import _tensor_info, encode, resolve_level
from ..kernels.cpu.packed import csr_from_bitmask
from .cpu_plan import RESIDENT_MODES, PackedCache, module_plan, nested_for_module, pack_for_module

__all__ = ["BACKENDS", "COMPILE_MODES", "ELSAModule", "check_state_codes"]

#: Accepted values of the ``backend`` request of :class:`ELSALinear` / :class:`ELSAConv2d`.
BACKENDS = ("auto", "reference", "triton", "triton-packed", "semi-structured", "sparse-cpu")
#: Accepted values of ``compile_mode`` (how the level enters a ``torch.compile`` graph).
COMPILE_MODES = ("tensor", "static")

_KERNELS = None  # the imported elsa_codec.kernels.triton module, False if it failed to import


def _kernels(required: str | None = None):
    """Import ``elsa_codec.kernels.triton`` lazily (imports Triton). Returns the module or None.

    With ``required`` (a function name), raise :class:`ELSAError` if it is not available.
    """
    global _KERNELS
    if _KERNELS is None:
        try:
            from ..kernels import triton as kernels

            _KERNELS = kernels
        except ImportError as e:  # triton missing, or the kernels package broken
            _KERNELS = False
            _kernels.error = f"{type(e).__name__}: {e}"
    if required is not None and (not _KERNELS or not hasattr(_KERNELS, required)):
        why = getattr(_kernels, "error", f"elsa_codec.kernels.triton has no {required!r}")
        raise ELSAError(f"backend 'triton' needs elsa_codec.kernels.triton.{required}, which is not available ({why})")
    return _KERNELS or None


def _triton_usable(device: torch.device, fn: str) -> bool:
    """Whether the Triton kernels can run ``fn`` for tensors on ``device`` (auto backend)."""
    if device.type != "cuda":
        return False
    k = _kernels()
    return k is not None and hasattr(k, fn) and k.kernels_available(device)


def _sparse_cpu_usable(w: torch.Tensor) -> bool:
    """Whether the sparse-cpu kernels can serve ``w`` (auto backend): a CPU tensor of an ELSA dtype
    and kernels that built (the first call builds them; a failure warns once)."""
    if w.device.type != "cpu" or w.dtype not in MAX_CODE_BITS:
        return False
    from ..native import cpu_kernels

    return cpu_kernels() is not None


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ELSAModule(nn.Module):
    """Common state and level logic of :class:`ELSALinear` and :class:`ELSAConv2d` (not used alone).

    Attributes:
        num_levels: ``T`` (sparse levels ``1..T``; ``T+1`` is dense).
        code_bits: ``k``, the number of low mantissa bits holding the code.
        structures: the mask structure of levels ``1..T`` (``"unstructured"``, ``"2:4"``,
            ``"block:64x64"``).
        sparsities: this weight's recorded sparsity at levels ``1..T`` (fraction of zeros).
        tensor_info: the :class:`~elsa_codec.format.encode.TensorInfo` recorded for this weight (encoding
            error etc.), or None.
        cache: keep the decoded weight of the current sparse level (reference path and
            :class:`ELSAConv2d` on CUDA).
        compile_mode: ``"tensor"`` or ``"static"`` (see the module docstring).
        cpu_format: ``None`` (the planner measures the candidates) or the packed format the
            ``sparse-cpu`` backend must use (``"csr"``, ``"bitmask"``, ``"bsr"``, ``"nm"``).
        cpu_max_tokens: ``None`` (the planner's routes per batch-size bucket) or the largest
            number of input rows the ``sparse-cpu`` backend serves from the packed level; larger
            calls use the decoded weight (cached) and the stock op.
        packed_cache_bytes: ``None`` (keep only the current packed level) or the bytes of
            recently used packed levels kept besides it (:func:`elsa_codec.set_packed_cache_bytes`
            sets a whole model).
        resident: ``"one"`` (default: the ``sparse-cpu`` backend packs the current level at each
            switch and keeps only it) or ``"all"`` (every sparse level ``1..T`` packed once into
            one nested csr form, each row's kept weights in one segment per level, so a switch
            only changes how many segments the kernels read; :mod:`elsa_codec.kernels.cpu.nested`). Set
            a whole model with :func:`elsa_codec.set_resident` or ``load(..., resident=)``.
        keep_weight_resident: False after :func:`elsa_codec.load` with ``level=``: once a sparse
            level is packed, the encoded weight's pages (with ``mmap=True``: mapped from the file) are handed
            back to the OS (:func:`elsa_codec.format.pages.release_pages`); they are read again from
            the file at the next level switch.

    Loading state: ``load_state_dict`` (``strict=True`` or ``False``, ``assign`` or not) accepts
    for this layer's ``weight`` only a tensor holding the same level codes: of the weight's shape
    and dtype, every code ``<= T``, and at each level ``1..T`` the kept fraction decoded from it
    equal to the one this module serves (:attr:`sparsities`, within the tolerance the file check
    uses) -- e.g. ``model.state_dict()`` or :func:`elsa_codec.elsa_state_dict` of a served model.
    Anything else (plain float weights: their low mantissa bits are no codes; another encoding;
    another dtype) raises :class:`~elsa_codec.errors.ELSAError` naming the layer's state-dict key
    and the fix (``elsa_codec.load`` a re-encoded file, or re-encode with ``elsa_codec.encode``),
    before this module changes; ``strict=False`` raises the same error (it only tolerates missing
    or unexpected keys, never foreign codes). A model given to :func:`elsa_codec.swap_` /
    :func:`elsa_codec.load` checks every ELSA layer before any tensor of the model is loaded
    (:func:`check_state_codes`), so a refused load changes no tensor. A module built by the bare
    constructor (zero weight, no record) takes the first encoded weight loaded into it (codes
    ``<= T``) and re-measures its sparsities from it. One integer pass (the codes, one
    ``bincount``) per loaded weight.

    Pickling and ``copy.deepcopy`` keep the module's state and level; the model-level checks
    installed by :func:`elsa_codec.swap_` (casts, loads) are picklable and survive both.
    """

    _kernel_fn = "decode_level"  # the kernel the triton backend needs
    _sparse_cpu_ok = False  # a linear product the sparse-cpu kernels serve (ELSALinear, ELSATransformersConv1D)
    _cpu_format = None
    _cpu_max_tokens = None
    keep_weight_resident = True
    packed_cache_bytes = None
    _plan = None
    _resident = "one"
    _nested = None  # (key, NestedLevels): every sparse level, resident="all"
    _elsa_blank = False  # built by the bare constructor: no record yet (the first weight loaded sets it)

    @property
    def cpu_format(self):
        """Packed format the ``sparse-cpu`` backend must use (None: the rule); assigning re-plans."""
        return self._cpu_format

    @cpu_format.setter
    def cpu_format(self, value) -> None:
        old, self._cpu_format = self._cpu_format, value
        if "_packed" in self.__dict__:
            self._packed.clear()
        if "_level" in self.__dict__:
            try:
                self._refresh_path()
            except ELSAError:  # a format that does not fit the current level: keep the old one
                self._cpu_format = old
                self._refresh_path()
                raise

    @property
    def cpu_max_tokens(self):
        """Largest input row count the ``sparse-cpu`` backend serves from the packed level (None:
        the rule); assigning re-plans (and may turn the auto backend on or off for this level)."""
        return self._cpu_max_tokens

    @cpu_max_tokens.setter
    def cpu_max_tokens(self, value) -> None:
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ELSAError(f"{type(self).__name__}: cpu_max_tokens must be None or an int >= 0, got {value!r}")
        self._cpu_max_tokens = value
        if "_level" in self.__dict__:
            self._refresh_path()

    @property
    def resident(self) -> str:
        """``"one"`` or ``"all"`` (see the class docstring); assigning re-plans the current level."""
        return self._resident

    @resident.setter
    def resident(self, value) -> None:
        if value not in RESIDENT_MODES:
            raise ELSAError(f"{type(self).__name__}: resident must be one of {RESIDENT_MODES}, got {value!r}")
        if value == "all" and not self._sparse_cpu_ok:
            raise ELSAError(f"{type(self).__name__}: resident='all' is for the sparse-cpu layers (ELSALinear, ELSATransformersConv1D)")
        if value == self._resident:
            return
        old, self._resident = self._resident, value
        self._nested, self._cached, self._plan = None, None, None
        if "_packed" in self.__dict__:
            self._packed.clear()
        if "_level" in self.__dict__:
            try:
                self._refresh_path()
            except ELSAError:  # e.g. a cpu_format the nested csr form cannot serve: keep the old mode
                self._resident = old
                self._refresh_path()
                raise

    def _linear_weight(self) -> torch.Tensor:
        """The weight as `[out_features, in_features]` (a view of :attr:`weight`)."""
        return self.weight

    def _elsa_init(self, weight, bias, *, num_levels, code_bits, structures, sparsities, tensor_info,
                   level, backend, cache, compile_mode, blank=False) -> None:
        if not isinstance(num_levels, int) or isinstance(num_levels, bool) or num_levels < 1:
            raise ELSAError(f"num_levels (T) must be a positive int, got {num_levels!r}")
        T = num_levels
        k = default_code_bits(T) if code_bits is None else code_bits
        check_code_bits(weight.dtype, k, T, name=f"{type(self).__name__}.weight")
        structs = ["unstructured"] * T if structures is None else [str(s) for s in structures]
        self.quality = None  # the checkpoint's quality report (docs/FORMAT.md), set by the swap
        if len(structs) != T:
            raise ELSAError(f"{type(self).__name__}: structures lists {len(structs)} entries for T={T} levels")
        if isinstance(weight, nn.Parameter):  # a tied weight: every module that uses it gets the same Parameter
            weight.requires_grad_(False)
            self.weight = weight
        else:
            self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        if bias is None:
            self.bias = None
        else:
            self.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach().clone())
        self.num_levels = T
        self.code_bits = k
        self.structures = structs
        self.tensor_info = tensor_info
        if sparsities is None:
            sparsities = tensor_info.sparsity if tensor_info is not None else self._measure_sparsities()
        self.sparsities = [float(s) for s in sparsities]
        if len(self.sparsities) != T:
            raise ELSAError(f"{type(self).__name__}: {len(self.sparsities)} sparsities given for T={T} levels")
        self._elsa_blank = bool(blank)
        self.cache = bool(cache)
        self.backend = backend  # validated by the setter
        if compile_mode not in COMPILE_MODES:
            raise ELSAError(f"compile_mode must be one of {COMPILE_MODES}, got {compile_mode!r}")
        self.compile_mode = compile_mode
        self._level = T + 1
        self._triton = False
        self._sparse_cpu = False
        self._plan = None  # (key, Plan of the current level), sparse-cpu backend
        self._packed = PackedCache()  # packed levels, sparse-cpu backend
        self._cached = None  # (key, decoded weight of the current sparse level)
        self._tiles = None  # (key, tile table)
        self.register_buffer("_level_t", torch.tensor(T + 1, dtype=torch.int32, device=weight.device), persistent=False)
        if level is not None:
            self.set_level(level)

    # -- level --------------------------------------------------------------------------------
    @property
    def level(self) -> int:
        """The current level ``t`` (``1..T``, ``T+1`` = dense). Assigning calls :meth:`set_level`."""
        return self._level

    @level.setter
    def level(self, value) -> None:
        self.set_level(value)

    def set_level(self, level) -> int:
        """Select level ``1..T``, ``T+1`` or ``"dense"``; drop the decoded weight of the old level.

        Returns:
            The level as an int.

        Raises:
            ELSAError: level out of range (the module is left unchanged).
        """
        t = resolve_level(level, self.num_levels)
        if t != self._level:
            self._cached = None
            self._level = t
        self._refresh_path()
        lt = self._level_t
        if lt.is_inference() and not torch.is_inference_mode_enabled():
            self._level_t = torch.tensor(t, dtype=torch.int32, device=lt.device)
        else:
            with torch.no_grad():
                lt.fill_(t)
        return t

    def _measure_sparsities(self) -> list:
        w = self.weight.detach()
        return _tensor_info(w, None, decode_counters(w, self.code_bits), self.num_levels).sparsity

    # -- loading state ------------------------------------------------------------------------
    def check_state_weight(self, weight, key: str = "weight") -> list | None:
        """Check that ``weight`` (a state dict's tensor for this layer's ``weight``, state-dict key
        ``key``) holds this layer's level codes; see "Loading state" in the class docstring.

        Returns:
            The sparsities of levels ``1..T`` decoded from ``weight``; None for what
            ``load_state_dict`` reports itself (not a tensor, another shape, a meta tensor).

        Raises:
            ELSAError: another dtype, a code above ``T``, or a level whose kept fraction differs
                from the one this module serves (names ``key`` and the fix; nothing changed).
        """
        mine = self.weight
        if not isinstance(weight, torch.Tensor) or weight.is_meta or tuple(weight.shape) != tuple(mine.shape):
            return None
        if weight.dtype != mine.dtype:
            raise ELSAError(
                f"{type(self).__name__} {key!r}: the state dict's weight is {_dtype_name(weight.dtype)}, this ELSA layer "
                f"serves {_dtype_name(mine.dtype)} codes (copying would round them away). {_FOREIGN_FIX}"
            )
        T = self.num_levels
        codes = decode_codes(weight.detach(), self.code_bits)
        kept = kept_counts(codes, T, self.code_bits)
        if kept[T] != codes.numel():
            raise ELSAError(
                f"{type(self).__name__} {key!r}: the state dict's weight holds codes above T={T} in its "
                f"k={self.code_bits} low mantissa bits: a plain float weight or another encoding, not this layer's "
                f"level codes. {_FOREIGN_FIX}"
            )
        n = max(codes.numel(), 1)
        got = [1.0 - float(kv) / n for kv in kept[:T]]  # as encode measures it
        self._check_sparsities(got, key)
        return got

    def _check_sparsities(self, got: list, key: str) -> None:
        """ELSAError unless the sparsities ``got`` (decoded from an incoming weight) are this
        module's within the file check's tolerance (a bare module takes any)."""
        if self._elsa_blank:
            return
        for t, (rec, g) in enumerate(zip(self.sparsities, got), start=1):
            if abs(rec - g) > _SPARSITY_TOL:
                raise ELSAError(
                    f"{type(self).__name__} {key!r}: the state dict's weight does not hold this layer's level codes: "
                    f"level {t} would keep {100 * (1 - g):.2f}% of the weights, the layer serves {100 * (1 - rec):.2f}% "
                    f"(sparsity {rec:.4f}, as elsa_codec.levels reports); its low mantissa bits are a plain float "
                    f"weight's or another encoding's. {_FOREIGN_FIX}"
                )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        """``Module._load_from_state_dict`` after :meth:`check_state_weight` of the incoming weight
        (ELSAError before anything of this module changes, with ``strict`` True or False)."""
        key = prefix + "weight"
        w = state_dict.get(key)
        got = _prechecked(self, w)
        if got is not None:
            self._check_sparsities(got, key)  # T floats: the codes were decoded by check_state_codes
        elif w is not None:
            got = self.check_state_weight(w, key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if got is None:
            return
        if self._elsa_blank:  # the first encoded weight of a bare module: its record
            self.sparsities, self.tensor_info, self._elsa_blank = got, None, False
            self._plan = None  # planned for the zero weight
        self.clear_cache()
        self._refresh_path()

    # -- backend ------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """The path the current level runs on the weight's device: ``"dense"`` (stock op on the
        stored tensor), ``"reference"`` (PyTorch decode, cached), ``"triton"`` (Triton kernels),
        ``"triton-packed"`` (:class:`ELSALinear` only: the packed GPU level for calls of at most 32
        rows, the fused kernel above) or ``"sparse-cpu"`` (packed level, C++ kernels).

        Assign ``"auto"`` (Triton on CUDA when available; on the CPU ``"sparse-cpu"`` for
        :class:`ELSALinear` / ``ELSATransformersConv1D`` when its kernels build; else reference),
        ``"reference"``, ``"sparse-cpu"`` or ``"triton"`` (on the CPU it needs
        ``TRITON_INTERPRET=1`` set before ``elsa_codec.kernels.triton`` is imported) to override the
        choice; :attr:`backend_request` keeps the request.
        """
        if self._level > self.num_levels:
            return "dense"
        req = self.backend_request
        if req == "auto":
            if _triton_usable(self.weight.device, self._kernel_fn):
                return "triton"
            return "sparse-cpu" if self._sparse_cpu_pays() else "reference"
        return req

    def _auto_cpu(self) -> bool:
        """The auto backend on a CPU weight of a module the sparse-cpu kernels can serve: its route
        is looked up per call (the plan depends on the thread count, which may change)."""
        return (self.backend_request == "auto" and self._sparse_cpu_ok and self._level <= self.num_levels
                and _sparse_cpu_usable(self.weight))

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ELSAError(f"{type(self).__name__}: backend must be one of {BACKENDS}, got {value!r}")
        if value == "semi-structured" and not isinstance(self, nn.Linear):
            raise ELSAError(f"{type(self).__name__}: backend 'semi-structured' (2:4 sparse tensor cores) is for ELSALinear only")
        if value == "triton-packed" and getattr(type(self), "elsa_kind", None) != "linear":
            raise ELSAError(f"{type(self).__name__}: backend 'triton-packed' (the packed GPU level) is for ELSALinear only")
        if value == "sparse-cpu" and not self._sparse_cpu_ok:
            raise ELSAError(f"{type(self).__name__}: backend 'sparse-cpu' serves linear layers only (ELSALinear, ELSATransformersConv1D)")
        self.backend_request = value
        self._cached = None
        if "_packed" in self.__dict__:
            self._packed.clear()
        if "_level" in self.__dict__:
            self._refresh_path()

    def _refresh_path(self) -> None:
        """Resolve the path of the current level once (eagerly, outside any compiled region):
        ``_triton`` is read by :meth:`forward` instead of re-resolving the backend per call."""
        be = self.backend
        self._triton = be in ("triton", "triton-packed")
        self._sparse_cpu = be == "sparse-cpu" or self._auto_cpu()
        if self._triton:
            _kernels()  # import outside torch.compile tracing
        if self._sparse_cpu and self.cpu_plan.any_packed:
            # pack at the level switch, not in the first forward; bitmask first (a csr form is derived from it)
            for choice in sorted(self.cpu_plan.choices, key=lambda c: c[0] != "bitmask"):
                self.packed_level(choice)
        else:  # no packed level in use: keep only what the budget holds
            self._packed.trim(self.packed_cache_bytes)

    def _kernels_for(self, fn: str):
        """The kernels module for a forced or automatic Triton run on this weight's device."""
        k = _kernels(fn)
        if not k.kernels_available(self.weight.device):
            raise ELSAError(
                f"{type(self).__name__}: backend 'triton' cannot run on {self.weight.device}: the Triton "
                "kernels need a CUDA device, or TRITON_INTERPRET=1 set before elsa_codec.kernels.triton is imported"
            )
        return k

    # -- decoded weight -----------------------------------------------------------------------
    def _key(self, t: int, backend: str) -> tuple:
        w = self.weight
        return (t, backend, w.device, w.dtype, w.data_ptr(), w._version)

    def _decode(self, t: int, backend: str) -> torch.Tensor:
        with torch.no_grad():
            if backend == "semi-structured":  # a 2:4 level on sparse tensor cores (docs/DESIGN.md, "Serving")
                fn = "decode_level"
                base = self._decode(t, "triton" if _triton_usable(self.weight.device, fn) else "reference")
                from ..kernels.triton.semi_structured import to_semi_structured

                return to_semi_structured(base)
            if backend == "triton":
                return self._kernels_for("decode_level").decode_level(self.weight, t, self.code_bits)
            if backend == "sparse-cpu":  # from the packed level: a memory-mapped weight stays out of memory
                from ..kernels.cpu.packed import unpack

                w = unpack(self.packed_level())
                return w if self._linear_weight() is self.weight else w.t()
            return extract_level(self.weight, t, self.code_bits)

    def decoded_weight(self, level=None) -> torch.Tensor:
        """The weight of ``level`` (default: the current level): `weight.shape`, `weight.dtype`.

        The dense level returns the stored tensor itself. The current sparse level's weight is
        cached when :attr:`cache` is on.
        """
        t = self._level if level is None else resolve_level(level, self.num_levels)
        if t > self.num_levels:
            return self.weight
        if t == self._level and self.backend_request == "semi-structured":
            backend = "semi-structured"
        elif self._sparse_cpu and t == self._level and (self.backend_request == "sparse-cpu" or self.cpu_plan.any_packed):
            backend = "sparse-cpu"  # unpacked from the packed level: the file's pages stay out of memory
        else:
            backend = "triton" if self._triton and t == self._level else "reference"
        if t != self._level:
            return self._decode(t, backend)
        key = self._key(t, backend)
        if self._cached is not None and self._cached[0] == key:
            w = self._cached[1]
            # an inference tensor (cached under inference_mode) cannot enter a recorded graph
            if not (w.is_inference() and torch.is_grad_enabled() and not torch.is_inference_mode_enabled()):
                return w
        w = self._decode(t, backend)
        self._cached = (key, w) if self.cache else None
        return w

    def _compiled_weight(self) -> torch.Tensor:
        """The weight inside a ``torch.compile`` graph (no cache: the graph recomputes it)."""
        return self._compiled_level(self.weight)

    def _compiled_level(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` (the weight, or values gathered from it) at the current level, inside a
        ``torch.compile`` graph: a Python constant level in ``"static"`` mode, the ``_level_t``
        buffer in ``"tensor"`` mode."""
        if self.compile_mode == "static":
            t = self._level
            return w if t > self.num_levels else extract_level(w, t, self.code_bits)
        codes = bits_view(w) & ((1 << self.code_bits) - 1)
        return torch.where(codes < self._level_t, w, torch.zeros((), dtype=w.dtype, device=w.device))

    def _cached_tile_table(self, w2d: torch.Tensor) -> torch.Tensor:
        """:func:`elsa_codec.kernels.triton.tile_table` of ``w2d`` (the weight as `[out, in]`, a view of
        :attr:`weight`), computed once per weight version, runtime only."""
        w = self.weight
        key = (w.device, w.data_ptr(), w._version, self.code_bits)
        if self._tiles is None or self._tiles[0] != key:
            with torch.no_grad():
                self._tiles = (key, _kernels("tile_table").tile_table(w2d, self.code_bits))
        return self._tiles[1]

    @property
    def cpu_plan(self):
        """How the ``sparse-cpu`` backend serves the current sparse level at this process's thread
        count (:class:`~elsa_codec.kernels.cpu.planner.Plan`: format, and per batch-size bucket packed or
        dense), measured on first use (:func:`elsa_codec.serving.cpu_plan.module_plan`).

        Raises:
            ELSAError: the dense level is current; ``cpu_format`` does not fit the level.
        """
        t = self._level
        if t > self.num_levels:
            raise ELSAError(f"{type(self).__name__}: the dense level is current; there is no sparse level to plan")
        key = (t, self.cpu_format, self.cpu_max_tokens, torch.get_num_threads())
        if self._plan is None or self._plan[0] != key:
            self._plan = (key, module_plan(self, t))
        return self._plan[1]

    def packed_level(self, choice: tuple | None = None):
        """The current sparse level packed for the ``sparse-cpu`` kernels
        (:class:`~elsa_codec.kernels.cpu.packed.PackedLevel`) in ``choice`` ``(format, block, group)``
        (default: :attr:`cpu_plan`'s primary format), built once per level and weight version from
        the encoded weight (one read), runtime only (never in ``state_dict``); recently used
        ones are kept within ``packed_cache_bytes``.

        Raises:
            ELSAError: the dense level is current, ``cpu_format`` does not fit the level, the
                kernels are unavailable.
        """
        choice = choice or self.cpu_plan.primary
        w, t = self.weight, self._level
        if self._resident == "all" and choice[0] == "csr":
            return nested_for_module(self).level(t)  # a view: the first t segments
        key = (t, w.data_ptr(), w._version, w.dtype, *choice)
        p = self._packed.get(key)
        if p is None:
            self._packed.trim(self.packed_cache_bytes, t)  # never more than the budget besides this level
            src = self._packed.get(key[:4] + ("bitmask", (0, 0), (0, 0))) if choice[0] == "csr" else None
            p = csr_from_bitmask(src) if src is not None else pack_for_module(self, t, choice)
            self._packed.put(key, p, self.packed_cache_bytes)
        return p

    def _sparse_cpu_pays(self) -> bool:
        """Auto backend on the CPU: the sparse-cpu kernels serve this module's current level (they
        build, and its :attr:`cpu_plan` serves some batch sizes packed)."""
        if not self._sparse_cpu_ok or not _sparse_cpu_usable(self.weight):
            return False
        return self.cpu_plan.any_packed

    def _sparse_cpu_linear(self, x: torch.Tensor):
        """``F.linear(x, W_t, bias)`` from the packed level, or None where the dense path must run
        instead (the plan routes this many rows to dense, or an input of another dtype)."""
        from ..kernels.cpu.packed import sparse_linear

        if x.dtype != self.weight.dtype:
            return None
        choice = self.cpu_plan.choice_for(x.numel() // max(1, x.shape[-1]))
        if choice is None or (self.backend_request == "auto" and not _sparse_cpu_usable(self.weight)):
            return None
        return sparse_linear(x, self.packed_level(choice), self.bias)

    @property
    def cached_bytes(self) -> int:
        """Bytes held by the runtime caches (decoded weight, packed levels, tile table); 0 at the
        dense level unless ``packed_cache_bytes`` keeps packed levels."""
        n = self._packed.nbytes + (0 if self._nested is None else self._nested[1].nbytes)
        if self._cached is not None:
            n += _nbytes(self._cached[1])
        if self._tiles is not None:
            n += _nbytes(self._tiles[1])
        return n

    def clear_cache(self) -> None:
        """Drop the decoded weight, the packed levels and the tile table (recomputed when needed)."""
        self._cached = None
        self._packed.clear()
        self._nested = None
        self._tiles = None

    def cast_plan(self, fn) -> tuple | None:
        """What the tensor conversion ``fn`` (of ``Module._apply``: ``.half()``, ``.to(dtype)``...)
        does to the codes: None when it keeps the weight's dtype, else ``(new dtype, new k)``.

        Raises:
            ELSAError: the new dtype cannot hold this weight's ``T+1`` codes (float64, an integer
                type, more levels than bfloat16's 3 / float16's 4 code bits allow). Nothing changed.
        """
        w = self.weight
        probe = fn(torch.empty((0, *w.shape[1:]), dtype=w.dtype, device=w.device))
        dt = getattr(probe, "dtype", w.dtype)
        if dt == w.dtype:
            return None
        T, name = self.num_levels, f"{type(self).__name__}.weight"
        if dt not in MAX_CODE_BITS:
            raise ELSAError(
                f"{name}: casting an encoded weight ({_dtype_name(w.dtype)}, T={T}) to {_dtype_name(dt)} would drop its "
                f"level codes: ELSA codes live in float32 / float16 / bfloat16 weights only. Nothing was converted"
            )
        k = self.code_bits if self.code_bits <= MAX_CODE_BITS[dt] else default_code_bits(T)
        if T + 1 > (1 << MAX_CODE_BITS[dt]):
            raise ELSAError(
                f"{name}: casting to {_dtype_name(dt)} would drop level codes: {T + 1} levels need "
                f"{default_code_bits(T)} code bits, {_dtype_name(dt)} holds at most {MAX_CODE_BITS[dt]}. Nothing was converted"
            )
        return dt, k

    def _apply(self, fn, recurse=True):
        plan = self.cast_plan(fn)
        codes = decode_codes(self.weight.detach(), self.code_bits) if plan is not None else None
        self.clear_cache()
        out = super()._apply(fn, recurse)
        w = self.weight
        if plan is not None and w.dtype == plan[0]:
            # Keep every level: the cast rounded the values; put each weight's code back (the code
            # rule in the new dtype: nearest value with those low bits, at most 2**(k-1) ulp).
            with torch.no_grad():
                w.data = encode_tensor(w.data, codes.to(w.device), plan[1], name=f"{type(self).__name__}.weight")
            self.code_bits = plan[1]
        elif w.dtype in MAX_CODE_BITS and self.code_bits > MAX_CODE_BITS[w.dtype]:
            self.code_bits = default_code_bits(self.num_levels)  # a tied weight another module re-encoded
        self._refresh_path()
        return out

    # -- repr ---------------------------------------------------------------------------------
    def _elsa_repr(self) -> str:
        T, t = self.num_levels, self._level
        if t > T:
            lv = f"level={t} (dense)"
        else:
            lv = f"level={t} ({self.structures[t - 1]}, sparsity={self.sparsities[t - 1]:.3f})"
        be = self.backend
        if be == "sparse-cpu" and self._plan is not None:
            held = self.cached_bytes - (0 if self._tiles is None else _nbytes(self._tiles[1]))
            be += f" ({self._plan[1].describe()}; resident {held / 2**20:.2f} MiB"
            be += f", {len(self._packed)} packed levels)" if len(self._packed) > 1 else ")"
        if self.backend_request != "auto":
            be += f" (forced {self.backend_request})"
        if self._resident == "all":
            be += ", resident=all"
        st = sorted(set(self.structures))
        return f"T={T}, k={self.code_bits}, structure={st[0] if len(st) == 1 else st}, {lv}, backend={be}"


_FOREIGN_FIX = (
    "Load a re-encoded file with elsa_codec.load(path, model), or re-encode the weights "
    "(elsa_codec.encode(state_dict, counters)) and serve them with elsa_codec.swap_(model, encoded). Nothing was loaded"
)

#: module -> (weakref to the weight tensor, (its version, k, dtype), decoded sparsities) checked by
#: :func:`check_state_codes` for the load in progress: the module's own load does not decode it again.
_PRECHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _prechecked(module: ELSAModule, w) -> list | None:
    """The sparsities :func:`check_state_codes` decoded from ``w`` for ``module`` (consumed), or None."""
    rec = _PRECHECKED.pop(module, None)
    if rec is None or not isinstance(w, torch.Tensor) or rec[0]() is not w:
        return None
    return rec[2] if rec[1] == (w._version, module.code_bits, module.weight.dtype) else None


def check_state_codes(model: nn.Module, state_dict: Mapping, prefix: str = "") -> None:
    """:meth:`ELSAModule.check_state_weight` of every ELSA layer of ``model`` whose weight
    ``state_dict`` holds (keys under ``prefix``), before anything is loaded.

    Raises:
        ELSAError: the first layer whose incoming weight does not hold its level codes (nothing changed).
    """
    done = []
    try:
        for fqn, m in model.named_modules(prefix=prefix.rstrip(".")):
            key = f"{fqn}.weight" if fqn else "weight"
            w = state_dict.get(key) if isinstance(m, ELSAModule) else None
            got = None if w is None else m.check_state_weight(w, key)
            if got is not None:
                _PRECHECKED[m] = (weakref.ref(w), (w._version, m.code_bits, m.weight.dtype), got)
                done.append(m)
    except ELSAError:
        for m in done:  # the load stops here: no module loads what was checked for it
            _PRECHECKED.pop(m, None)
        raise


def refuse_foreign_state(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
    """``load_state_dict`` pre-hook (``register_load_state_dict_pre_hook``) that
    :func:`elsa_codec.swap_` registers on the model: :func:`check_state_codes` of the whole model
    before its first tensor is loaded. A module-level function: the hook pickles with the model.

    Raises:
        ELSAError: as :func:`check_state_codes`.
    """
    check_state_codes(module, state_dict, prefix)


def _pick_counters(counters, name: str):
    """A tensor of counters from a Tensor or a mapping (a :class:`Counters`) with one entry."""
    if isinstance(counters, torch.Tensor):
        return counters, None, None
    if isinstance(counters, Mapping):
        if "weight" in counters:
            c = counters["weight"]
        elif len(counters) == 1:
            c = next(iter(counters.values()))
        else:
            raise ELSAError(f"{name}: counters name {len(counters)} tensors; pass the weight's counters tensor")
        return c, getattr(counters, "num_levels", None), getattr(counters, "structures", None)
    raise ELSAError(f"{name}: counters must be an integer Tensor or a Counters mapping, got {type(counters).__name__}")


def _encode_weight(module: nn.Module, counters, code_bits, num_levels, structures, name: str):
    c, T, structs = _pick_counters(counters, name)
    if num_levels is None:
        num_levels = T
    if structures is None:
        structures = structs
    enc = encode({name: module.weight.detach()}, {name: c}, code_bits=code_bits, num_levels=num_levels, structures=structures)
    meta = enc.meta
    return enc[name], dict(
        num_levels=meta.num_levels,
        code_bits=meta.code_bits,
        structures=[lv.structure for lv in meta.levels],
        tensor_info=meta.tensors[name],
    )


