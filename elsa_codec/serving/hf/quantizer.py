"""``ELSAHfQuantizer``: ``from_pretrained`` of an ELSA checkpoint returns a model of ELSA layers.

Registered with transformers' public API (``register_quantization_config`` /
``register_quantizer``, :func:`elsa_codec.serving.hf.register`) as ``quant_method: "elsa"``.
transformers calls it with ``pre_quantized=True`` when ``config.json`` carries the method:

1. :meth:`~ELSAHfQuantizer.update_dtype`: a ``dtype`` that cannot hold the code bits is refused
   before the model is built.
2. :meth:`~ELSAHfQuantizer._process_model_before_weight_loading` (the model is on the ``meta``
   device): the file's document is read (headers only), checked against ``config.json`` and
   the model, and every encoded module is replaced by its ELSA layer (``ELSALinear``,
   ``ELSATransformersConv1D``, ``ELSAEmbedding``, ...), its ``weight`` a meta ``Parameter`` of the
   file's shape and dtype, so transformers loads each encoded tensor straight into it: no dense
   float copy is ever made beside the encoded one.
3. :meth:`~ELSAHfQuantizer._process_model_after_weight_loading`: each ELSA layer is rebuilt
   around its loaded weight (no copy), every tensor's CRC-32 and every encoded tensor's codes are
   checked against the file, the cast guard and ``save_pretrained`` (which writes the ELSA
   checkpoint back) are installed, and the chosen level is selected; on the CPU a sparse level is
   packed and the file's pages handed back, as :func:`elsa_codec.load` with ``level=`` does.

ELSA: Halvachi et al., arXiv 2312.06872, sec. 2.2.
"""
from __future__ import annotations

import logging
import math
import os
import types

import torch
from transformers.quantizers.base import HfQuantizer

from ...errors import ELSAError
from ...format.bits import MAX_CODE_BITS
from ...format.file import _check_codes, _check_crcs, _crc_table, _open_safetensors, _shards, st_dtype
from ...format.selection import group_of, model_tie_groups
from ..swap import (
    _build,
    _replace,
    _servable_kind,
    elsa_modules,
    install_guards,
    set_level,
    set_level_released,
    set_resident,
)
from .checkpoint import elsa_weights
from .config import _DTYPES, ELSAQuantizationConfig, _level_number

__all__ = ["ELSAHfQuantizer"]

logger = logging.getLogger("elsa_codec")


class ELSAHfQuantizer(HfQuantizer):
    """The transformers quantizer of ``quant_method: "elsa"`` (see the module docstring).

    Trainable (``is_trainable``, ``is_qat_trainable``): the Trainer accepts a loaded model; the
    ELSA weights stay frozen (every level bit for bit), the other parameters train.
    :meth:`~transformers.PreTrainedModel.dequantize` turns the ELSA layers back into the stock
    ones holding the encoded tensors (the dense level, trainable), e.g. to run ELSA training again.

    Raises (from ``from_pretrained``, before any weight loads):
        ELSAError: a ``dtype`` that cannot hold the code bits; an ELSA config on a checkpoint that
            is not ELSA-encoded; a level outside ``1..T+1``; an encoded tensor the model cannot
            serve or of another shape. ELSAFormatError: no ELSA document, a missing shard, a
            corrupted header or document (and after loading: a tensor failing its CRC-32).
    """

    requires_calibration = False

    def __init__(self, quantization_config: ELSAQuantizationConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self._path = self._meta = None
        self._names: dict[str, str] = {}  # fqn -> encoded tensor name
        self._cast_to: torch.dtype | None = None

    @property
    def meta(self):
        """The loaded checkpoint's :class:`~elsa_codec.format.document.ELSAMeta` (None before loading)."""
        return self._meta

    def stored_order(self) -> list:
        """The loaded checkpoint's tensor names, shard by shard (in shard order), each shard's
        largest tensor first: written in this order with the same ``max_shard_size``, the shards
        hold the same tensors again (the greedy grouping of :func:`elsa_codec.save_file` closes a
        shard exactly where the next shard's largest tensor does not fit)."""
        shards, _ = _shards(self._path)
        out = []
        for shard, names in sorted(shards):
            f = _open_safetensors(shard, check_header=False)
            names = list(f.keys()) if names is None else names
            size = {n: f.get_slice(n).get_shape() for n in names}
            numel = {n: math.prod(s) for n, s in size.items()}
            out += sorted(names, key=lambda n: -numel[n])
        return out

    # -- transformers' hooks ----------------------------------------------------------------
    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    def validate_environment(self, *args, **kwargs) -> None:
        if not self.pre_quantized:
            raise ELSAError(
                "ELSAQuantizationConfig loads ELSA checkpoints; this checkpoint's config.json has no quantization_config of "
                "quant_method 'elsa' (a plain model): encode it first with `elsa convert DIR -o OUT --levels 0.9,0.75,0.5`")

    def update_dtype(self, dtype):
        """Refuse a ``dtype`` that cannot hold the checkpoint's code bits; one that can is applied
        after loading by re-encoding every ELSA weight (every level kept)."""
        cfg = self.quantization_config
        stored = _DTYPES.get(cfg.dtype)
        if dtype is None or stored is None or dtype == stored:
            return dtype
        if dtype not in MAX_CODE_BITS:
            raise ELSAError(f"from_pretrained: dtype={dtype} cannot hold ELSA codes; this checkpoint is {cfg.dtype} "
                            f"(load with dtype='auto' or one of {sorted(_DTYPES)})")
        if cfg.code_bits is not None and cfg.code_bits > MAX_CODE_BITS[dtype]:
            raise ELSAError(
                f"from_pretrained: dtype={str(dtype).replace('torch.', '')} holds at most {MAX_CODE_BITS[dtype]} code bits, "
                f"this checkpoint's {cfg.num_levels} levels use {cfg.code_bits} (load with dtype='auto', its {cfg.dtype})")
        self._cast_to = dtype
        return dtype

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not checkpoint_files:
            raise ELSAError("from_pretrained: an ELSA checkpoint loads from safetensors files; none were found")
        folder = os.path.dirname(os.path.abspath(checkpoint_files[0]))
        self._path, self._meta = elsa_weights(folder)
        self._check_config()
        plan = self._meta_modules(model)
        for fqn, new in plan.items():
            _replace(model, fqn, new)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        self._rebuild(model)
        self._verify(model)
        if self._cast_to is not None:
            for _, m in elsa_modules(model):
                m.to(self._cast_to)  # re-encodes the codes in the new dtype (ELSAModule._apply)
        install_guards(model)  # the cast guard and the load check, both kept by pickle
        from .pretrained import save_pretrained

        object.__setattr__(model, "save_pretrained", types.MethodType(save_pretrained, model))
        self._select_level(model)
        return model

    def _dequantize(self, model, dtype=None):
        from .pretrained import dequantize_

        return dequantize_(model)

    # -- the work -----------------------------------------------------------------------------
    def _check_config(self) -> None:
        cfg, meta = self.quantization_config, self._meta
        for field, want in (("num_levels", meta.num_levels), ("code_bits", meta.code_bits)):
            got = getattr(cfg, field)
            if got is not None and got != want:
                raise ELSAError(f"from_pretrained: config.json's quantization_config has {field}={got}, the weights' "
                                f"document {self._path} has {want} (the directory mixes two checkpoints)")
        T = meta.num_levels
        for what in ("level", "default_level"):
            _level_number(getattr(cfg, what), T, what)  # ELSAError: out of range
        if cfg.num_levels is None:
            cfg.num_levels, cfg.code_bits = T, meta.code_bits

    def _meta_modules(self, model) -> dict:
        """The ELSA layer, on ``meta``, for each encoded weight; nothing of ``model`` changed."""
        meta = self._meta
        modules = dict(model.named_modules(remove_duplicate=False))
        params = dict(model.named_parameters(remove_duplicate=False))
        groups = model_tie_groups(model)
        for alias, target in dict(getattr(model, "all_tied_weights_keys", None) or {}).items():
            groups.append([target, alias])  # transformers ties these after loading (lm_head to the embedding)
        ties = group_of(groups)
        shared: dict[str, torch.nn.Parameter] = {}
        new = {}
        for name, info in meta.tensors.items():
            fqn, _, attr = name.rpartition(".")
            if fqn not in modules:
                raise ELSAError(f"from_pretrained: encoded tensor {name!r} of {self._path} names no module of "
                                f"{type(model).__name__} (the checkpoint was made for another architecture)")
            _servable_kind(modules, fqn, attr, name)  # ELSAError unless an ELSA layer can serve it
            ref = params.get(name)
            if ref is not None and tuple(ref.shape) != tuple(info.shape):
                raise ELSAError(f"from_pretrained: tensor {name!r} has shape {tuple(info.shape)} in {self._path} but "
                                f"{tuple(ref.shape)} in {type(model).__name__} (config.json does not match the weights)")
            group = ties.get(name)
            key = group[0] if group else name
            if key not in shared:
                empty = torch.empty(info.shape, dtype=_DTYPES[info.dtype], device="meta")
                shared[key] = torch.nn.Parameter(empty, requires_grad=False)
            for other in [name] + [n for n in (group or []) if n != name and n not in meta.tensors]:
                ofqn = other.rpartition(".")[0]  # a tied alias transformers ties at load (lm_head): the same level
                new[ofqn] = _build(modules[ofqn], _servable_kind(modules, ofqn, "weight", other), shared[key], meta, name)
                self._names[ofqn] = name
        return new

    def _rebuild(self, model) -> None:
        """Each ELSA layer made around its loaded weight and bias (no copy): its buffers and
        caches are built from real tensors."""
        modules = dict(model.named_modules(remove_duplicate=False))
        for fqn, name in self._names.items():
            mod = modules[fqn]
            if mod.weight.is_meta:
                raise ELSAError(f"from_pretrained: encoded tensor {name!r} was not loaded from {self._path}")
            kind = _servable_kind(modules, fqn, "weight", name)
            _replace(model, fqn, _build(mod, kind, mod.weight, self._meta, name))

    def _verify(self, model) -> None:
        """Every loaded tensor of the file against its CRC-32, every encoded tensor's codes
        against the document (the checks :func:`elsa_codec.load_file` makes). A tensor transformers
        converted to another ``dtype`` while loading (a plain one: the ELSA weights keep theirs
        until :meth:`update_dtype`'s re-encode) has no stored bytes left to check."""
        shards, imeta = _shards(self._path)
        stored = {}
        for shard, _ in shards:
            f = _open_safetensors(shard, check_header=False)
            stored.update({n: f.get_slice(n).get_dtype() for n in f.keys()})
            if imeta is None:
                crcs = _crc_table(self._path, f.metadata() or {})
        if imeta is not None:
            crcs = _crc_table(self._path, imeta)
        sd = model.state_dict()
        same = {n: sd[n].detach().cpu() for n, code in stored.items()
                if n in sd and not sd[n].is_meta and st_dtype(sd[n], n) == code}
        if crcs is not None:
            _check_crcs(self._path, {n: t for n, t in same.items() if n in crcs}, crcs)
        _check_codes(self._path, {n: sd[n].detach().cpu() for n in self._meta.tensors}, self._meta)

    def _select_level(self, model) -> None:
        """The chosen level; on the CPU a sparse level is packed module by module, each module's
        encoded weight handing its file pages back right after (the peak stays near the file's bytes)."""
        t = self.quantization_config.load_level
        T = self._meta.num_levels
        mods = elsa_modules(model)
        if self.quantization_config.resident == "all":  # every sparse level packed now, nested
            set_resident(model, "all", release=True)
        if t <= T and all(m.weight.device.type == "cpu" for _, m in mods):
            set_level_released(model, t)
        else:
            set_level(model, t)
        logger.info("from_pretrained: %d ELSA modules from %s, level %d of %d", len(mods), self._path, t, T + 1)
