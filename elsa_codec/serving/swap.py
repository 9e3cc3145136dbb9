"""Model-level serving API: swap encoded layers into any model, select levels, rebuild the file.

ELSA (Halvachi et al., arXiv 2312.06872), sections 2.1-2.2; docs/DESIGN.md, "Serving". One generic
walker over ``named_modules`` serves every model (no per-model code):

- :func:`swap_` replaces, in place, exactly the modules whose ``weight`` is encoded in an
  :class:`~elsa_codec.format.encode.ELSAStateDict` (or a file) by their ELSA layer (``nn.Linear`` ->
  :class:`~elsa_codec.serving.linear.ELSALinear`, ``nn.Conv1d`` / ``nn.Conv2d`` -> ``ELSAConv1d`` /
  ``ELSAConv2d``, ``transformers`` ``Conv1D`` -> :class:`~elsa_codec.serving.transformers_conv1d.ELSATransformersConv1D`,
  ``nn.Embedding`` -> :class:`~elsa_codec.serving.embedding.ELSAEmbedding`), keeps tied weights one
  ``Parameter``, loads every other tensor, and gives the batch-norm layers named in the file's
  per-level statistics one set of running statistics per level. Everything is validated first:
  on any error nothing changes. Casts of the swapped model keep every level (or refuse first).
- :func:`set_level` / :func:`set_sparsity` / :func:`levels` select and list the levels.
- :func:`elsa_state_dict` rebuilds the encoded state dict (metadata and per-level batch-norm
  statistics included) from a swapped model, ready for :func:`elsa_codec.save_file`.
- :func:`load` = :func:`elsa_codec.load_file` + :func:`swap_`.
"""
from __future__ import annotations

import logging
import os
import types
import weakref
from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..checks import check_module, check_path
from ..errors import ELSAError, ELSATypeError
from ..format.bits import bits_view, check_code_bits, decode_counters
from ..format.document import LevelInfo, TensorInfo, _make_meta
from ..format.encode import ELSAStateDict, _tensor_info, resolve_level
from ..format.pages import release_pages
from ..format.selection import group_of, model_tie_groups, module_kind, pruned_error, pruned_tensors
from ..wrappers import unwrap_model
from .base import ELSAModule, _dtype_name, refuse_foreign_state
from .batch_norm import LevelBatchNormMixin, level_batch_norm
from .conv import ELSAConv1d, ELSAConv2d
from .embedding import ELSAEmbedding
from .linear import ELSALinear

__all__ = ["swap_", "load", "set_level", "set_sparsity", "levels", "elsa_state_dict", "elsa_modules"]

logger = logging.getLogger("elsa_codec")


def _module_of(name: str) -> tuple[str, str]:
    fqn, _, attr = name.rpartition(".")
    return fqn, attr


def _where(fqn: str) -> str:
    return f"module {fqn!r}" if fqn else "the root module"


def _as_encoded(encoded) -> ELSAStateDict:
    if isinstance(encoded, (str, os.PathLike)):
        from ..format.file import load_file

        return load_file(os.fspath(encoded))
    if isinstance(encoded, nn.Module):
        raise ELSATypeError(f"swap_: encoded is a model ({type(encoded).__name__}); the arguments look swapped: the order is swap_(model, encoded)")
    if not isinstance(encoded, Mapping) or getattr(encoded, "meta", None) is None:
        raise ELSATypeError(
            f"swap_ needs an ELSAStateDict (from encode or load_file) or a path to an ELSA file, got {type(encoded).__name__}"
        )
    return encoded


def _check_owner(enc, model: nn.Module) -> None:
    """One :class:`ELSAStateDict` serves one model: :func:`swap_` shares its tensors (no copy), so
    a second model would serve from the same storage and see every change made through the
    first. A second model is refused (nothing changed); the first may be swapped again."""
    ref = getattr(enc, "_served_by", None)
    owner = ref() if ref is not None else None
    if owner is not None and owner is not model:
        raise ELSAError(
            f"this ELSAStateDict already serves a {type(owner).__name__} (swap_ shares its tensors, it does not copy them): "
            "to serve a second model, give it its own copy: swap_(model2, copy.deepcopy(encoded)), or load the file "
            "again (elsa_codec.load / load_file)"
        )


def _check_meta_left(model: nn.Module, enc, new_modules: dict) -> None:
    """A model built on the ``meta`` device gets every tensor from the file; a tensor the file
    does not hold would stay without data: refused before anything changes."""
    swapped = {f"{fqn}.weight" for fqn in new_modules}
    for kind, items in (("parameter", model.named_parameters(remove_duplicate=False)), ("buffer", model.named_buffers(remove_duplicate=False))):
        for name, t in items:
            if t.is_meta and name not in enc and name not in swapped:
                raise ELSAError(
                    f"{kind} {name!r} of the model is on the meta device and the file holds no value for it: "
                    "materialise it first (model.to_empty(device=...) and initialise it), or build the model on a real device"
                )


def _plan(model: nn.Module, enc: ELSAStateDict, filter_fn, strict: bool):
    """Validate everything and build the new modules; modify nothing. Returns the plan."""
    meta = enc.meta
    T, k = meta.num_levels, meta.code_bits
    modules = dict(model.named_modules(remove_duplicate=False))
    _check_pruned(model, enc)
    _check_tensors(model, enc, modules, strict)
    new_modules = _new_modules(model, enc, modules, filter_fn)
    # ELSA modules already in the model and not replaced must agree on T and k, and a weight the
    # checkpoint holds for one must hold its codes (it is copied in as it is).
    for fqn, mod in modules.items():
        if not isinstance(mod, ELSAModule) or fqn in new_modules:
            continue
        if (mod.num_levels, mod.code_bits) != (T, k):
            raise ELSAError(
                f"{_where(fqn)} already serves an ELSA weight with T={mod.num_levels}, k={mod.code_bits}; "
                f"the checkpoint has T={T}, k={k}"
            )
        name = f"{fqn}.weight" if fqn else "weight"
        if name in enc:
            mod.check_state_weight(enc[name], name)
    return new_modules, _level_bn_modules(enc, modules, T), T


def _check_pruned(model: nn.Module, enc) -> None:
    """A module reparametrised by ``torch.nn.utils.prune`` (``weight_orig`` + ``weight_mask``)
    whose tensor the checkpoint encodes cannot be served: ELSAError naming it and the fix."""
    encoded = set(enc.meta.tensors)
    for fqn, tname in pruned_tensors(model):
        hit = [n for n in encoded if n.rpartition(".")[0] == fqn]
        if hit:
            raise pruned_error(fqn, tname, why=f"the checkpoint encodes {hit[0]!r} and an ELSA layer cannot serve a pruned module",
                               then="")


def _check_tensors(model: nn.Module, enc, modules: dict, strict: bool) -> None:
    """Every tensor of the file exists in the model with the same shape and dtype (and, ``strict``, the converse)."""
    model_sd = model.state_dict(keep_vars=True)
    for name, t in enc.items():
        fqn, attr = _module_of(name)
        if name not in model_sd:
            where = f"{_where(fqn)} ({type(modules[fqn]).__name__}) has no tensor {attr!r}" if fqn in modules else f"the model has no {_where(fqn)}"
            raise ELSAError(f"tensor {name!r} of the checkpoint is missing from the model: {where}")
        ref = model_sd[name]
        if tuple(ref.shape) != tuple(t.shape):
            raise ELSAError(
                f"{_where(fqn)}: tensor {name!r} has shape {tuple(t.shape)} in the checkpoint but {tuple(ref.shape)} in the model"
            )
        if ref.dtype != t.dtype:
            raise ELSAError(
                f"{_where(fqn)}: tensor {name!r} has dtype {_dtype_name(t.dtype)} in the checkpoint but "
                f"{_dtype_name(ref.dtype)} in the model (convert the model, or re-encode in its dtype)"
            )
    if strict:
        missing = [n for n in model_sd if n not in enc]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            fqn = _module_of(missing[0])[0]
            raise ELSAError(
                f"{_where(fqn)}: tensor {missing[0]!r}{more} of the model is missing from the checkpoint "
                "(pass strict=False to keep the model's values)"
            )


def _new_modules(model: nn.Module, enc, modules: dict, filter_fn) -> dict:
    """The ELSA module for each encoded weight of a servable module that ``filter_fn`` keeps."""
    meta = enc.meta
    T, k = meta.num_levels, meta.code_bits
    ties = group_of(model_tie_groups(model))
    _check_ties(enc, meta, ties)
    new_modules: dict[str, nn.Module] = {}
    params: dict[str, nn.Parameter] = {}  # first name of a tie group -> the one Parameter it becomes
    taken: dict[str, bool] = {}
    for name in meta.tensors:
        if name not in enc:
            raise ELSAError(f"encoded tensor {name!r} is listed in the metadata but missing from the checkpoint")
        fqn, attr = _module_of(name)
        mod = modules[fqn]
        taken[name] = filter_fn is None or bool(filter_fn(mod, fqn))
        if not taken[name]:
            continue  # loaded as a plain tensor: the dense level only
        kind = _servable_kind(modules, fqn, attr, name)
        w = enc[name]
        check_code_bits(w.dtype, k, T, name=name)
        group = ties.get(name)
        dev = w.device if mod.weight.is_meta else mod.weight.device  # a meta model: the file's tensor
        weight = w.detach().to(device=dev)
        if group is not None:
            weight = params.setdefault(group[0], nn.Parameter(weight, requires_grad=False))
        new_modules[fqn] = _build(mod, kind, weight, meta, name)
    for group in {tuple(g) for n, g in ties.items() if n in taken}:
        kept = [n for n in group if taken.get(n)]
        if kept and len(kept) < len(group):
            other = next(n for n in group if not taken.get(n))
            raise ELSAError(
                f"{kept[0]!r} and {other!r} are one tied parameter: filter_fn keeps the module of {kept[0]!r} and not "
                f"that of {other!r}; a tied weight is swapped in every module that uses it, or in none"
            )
    if not new_modules:
        why = "filter_fn rejected every one" if meta.tensors and filter_fn is not None else "the checkpoint encodes no tensor"
        raise ELSAError(f"no module of the model matches the checkpoint's encoded tensors ({why}); nothing to swap")
    return new_modules


def _servable_kind(modules: dict, fqn: str, attr: str, name: str) -> str:
    """The kind of ELSA module that serves the encoded tensor ``name`` (``fqn.attr``); ELSAError if none can."""
    mod = modules[fqn]
    parent = modules.get(fqn.rpartition(".")[0]) if fqn else None
    kind = module_kind(mod, parent)
    if kind is None:
        why = " (nn.MultiheadAttention reads it directly, never calls it)" if isinstance(parent, nn.MultiheadAttention) else ""
        raise ELSAError(
            f"{_where(fqn)} is a {type(mod).__name__}{why}: its encoded tensor {name!r} can only be served by a plain "
            "nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding or transformers Conv1D (exclude it with filter_fn= to load "
            "it as a dense tensor)"
        )
    if not fqn:
        raise ELSAError(f"the model itself is a {type(mod).__name__}: swap_ replaces submodules; build an ELSA module with from_encoded")
    if attr != "weight":
        raise ELSAError(f"{_where(fqn)}: only the weight of a {type(mod).__name__} can be encoded, the checkpoint encodes {attr!r}")
    if kind == "embedding" and mod.max_norm is not None:
        raise ELSAError(
            f"{_where(fqn)} is an Embedding with max_norm={mod.max_norm}: it renormalises looked-up rows of its table in "
            "place, which would overwrite their level codes (exclude it with filter_fn=)"
        )
    return kind


def _level_bn_modules(enc, modules: dict, T: int) -> dict:
    """Per-level batch-norm statistics: levels 1..T+1, modules that track running statistics."""
    new_bn: dict[str, nn.Module] = {}
    bn = getattr(enc, "bn_stats", None) or {}
    if bn:
        levels_given = sorted(bn)
        per_module: dict[str, dict] = {}
        for t in levels_given:
            for fqn, stats in bn[t].items():
                per_module.setdefault(fqn, {})[t] = stats
        for fqn, by_level in per_module.items():
            mod = _check_bn_module(modules, fqn, by_level, levels_given, T)
            new_bn[fqn] = level_batch_norm(mod, by_level, T)
    return new_bn


def _check_bn_module(modules: dict, fqn: str, by_level: dict, levels_given: list, T: int) -> nn.Module:
    """The batch-norm module ``fqn`` that the per-level statistics ``by_level`` (``{level: {stat: Tensor}}``)
    fit; ELSAError naming the module and the statistic otherwise."""
    want = list(range(1, T + 2))
    if levels_given != want or sorted(by_level) != want:
        got = sorted(by_level)
        raise ELSAError(
            f"batch-norm {_where(fqn)}: the checkpoint has statistics for levels {got[0]}..{got[-1]} "
            f"({len(got)} levels) but T={T} needs levels 1..{T + 1}"
            if got == list(range(got[0], got[-1] + 1)) else
            f"batch-norm {_where(fqn)}: the checkpoint has statistics for levels {got}, T={T} needs 1..{T + 1}"
        )
    mod = modules.get(fqn)
    if mod is None:
        raise ELSAError(f"batch-norm statistics of {_where(fqn)} in the checkpoint: the model has no such module")
    if not isinstance(mod, _BatchNorm) or not mod.track_running_stats:
        raise ELSAError(f"{_where(fqn)} is a {type(mod).__name__}, not a batch-norm layer tracking running statistics, but the checkpoint has per-level batch-norm statistics for it")
    keys = None
    for t, stats in by_level.items():
        if keys is None:
            keys = sorted(stats)
        elif sorted(stats) != keys:
            raise ELSAError(f"batch-norm {_where(fqn)}: level {t} has statistics {sorted(stats)}, level 1 has {keys}")
        for s, v in stats.items():
            buf = getattr(mod, s, None)
            if not isinstance(buf, torch.Tensor) or s not in mod._buffers:
                raise ELSAError(f"batch-norm {_where(fqn)} has no running buffer {s!r} (level {t} statistics)")
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(buf.shape) or v.dtype != buf.dtype:
                got = f"{tuple(v.shape)} {_dtype_name(v.dtype)}" if isinstance(v, torch.Tensor) else type(v).__name__
                raise ELSAError(
                    f"batch-norm {_where(fqn)}: {s} of level {t} is {got} in the checkpoint but "
                    f"{tuple(buf.shape)} {_dtype_name(buf.dtype)} in the model"
                )
    return mod


def _check_ties(enc, meta, ties: dict) -> None:
    """Tied parameters of the model: encoded in all their names or in none, with equal bits."""
    for name in meta.tensors:
        group = ties.get(name)
        if group is None:
            continue
        for other in group:
            if other not in meta.tensors:
                raise ELSAError(
                    f"{name!r} and {other!r} are one tied parameter in the model, but the checkpoint encodes {name!r} and "
                    f"not {other!r}; encode the tied weight once (elsa_codec.encode does, given the model's state_dict)"
                )
            a, b = enc[group[0]], enc[other]
            if a is not b and (a.shape != b.shape or a.dtype != b.dtype or not torch.equal(bits_view(a), bits_view(b))):
                raise ELSAError(
                    f"{group[0]!r} and {other!r} are one tied parameter in the model, but the checkpoint holds different "
                    "tensors for them"
                )


def _build(mod: nn.Module, kind: str, weight, meta, name: str) -> nn.Module:
    """The ELSA module serving ``weight`` (encoded) in place of ``mod`` (module kind ``kind``)."""
    info = meta.tensors[name]
    kw = dict(num_levels=meta.num_levels, code_bits=meta.code_bits, structures=[lv.structure for lv in meta.levels],
              sparsities=info.sparsity, tensor_info=info)
    if isinstance(mod, ELSAModule):
        kw.update(backend=mod.backend_request, cache=mod.cache, compile_mode=mod.compile_mode)
    if kind == "linear":
        new = ELSALinear.from_encoded(weight, mod.bias, **kw)
    elif kind == "conv":
        cls = ELSAConv1d if isinstance(mod, nn.Conv1d) else ELSAConv2d
        new = cls.from_encoded(weight, mod.bias, like=mod, **kw)
    elif kind == "embedding":
        new = ELSAEmbedding.from_encoded(weight, like=mod, **kw)
    else:  # "conv1d_t": transformers Conv1D (transformers is loaded: the model holds one)
        from .transformers_conv1d import ELSATransformersConv1D

        new = ELSATransformersConv1D.from_encoded(weight, mod.bias, **kw)
    new.train(mod.training)
    new.quality = meta.quality
    return new


def _replace(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _load_plain(model: nn.Module, enc, encoded_names: set, *, assign: bool) -> None:
    """Put the checkpoint's tensors that are not encoded weights into ``model``: copied into the
    model's own tensors, or with ``assign`` (``load(..., level=)``) the checkpoint's tensors
    themselves (the loaded tensors: owned memory, or with ``load(..., mmap=True)`` views of the
    memory-mapped file, nothing copied, pages read on demand; as
    ``load_state_dict(assign=True)``). Tensors shared by several names in the model and tensors
    off the CPU are always copied (an assign would untie them or leave them on the CPU)."""
    sd = model.state_dict(keep_vars=True)
    counts: dict[int, int] = {}
    for t in sd.values():
        counts[id(t)] = counts.get(id(t), 0) + 1
    assigned = {}
    with torch.no_grad():
        for name, t in enc.items():
            if name in encoded_names:
                continue
            dst = sd[name]
            if dst is t:
                continue
            if dst.is_meta or (assign and dst.device.type == "cpu" and t.device.type == "cpu" and counts[id(dst)] == 1):
                assigned[name] = t
            else:
                dst.copy_(t)
    if assigned:
        model.load_state_dict(assigned, strict=False, assign=True)
        _retie(model, sd, assigned)


def _retie(model: nn.Module, before: dict, assigned: dict) -> None:
    """After an assign, names that were one tensor in the model (tied, e.g. a meta model's
    ``lm_head`` and token embedding) are one tensor again: the first name's new tensor."""
    first: dict[int, str] = {}
    for name, t in before.items():
        key = id(t)
        if key not in first:
            first[key] = name
            continue
        src = first[key]
        if name in assigned or src in assigned:
            fqn, attr = _module_of(name)
            sfqn, sattr = _module_of(src)
            mod = model.get_submodule(fqn) if fqn else model
            smod = model.get_submodule(sfqn) if sfqn else model
            val = getattr(smod, sattr)
            if attr in mod._parameters:
                mod._parameters[attr] = val
            else:
                mod._buffers[attr] = val


def swap_(model: nn.Module, encoded, *, filter_fn: Callable[[nn.Module, str], bool] | None = None,
          strict: bool = True, _assign: bool = False) -> nn.Module:
    """Serve ``encoded`` with ``model``, in place (ELSA, arXiv 2312.06872, sec. 2.2).

    Replaces exactly the modules whose ``weight`` is encoded (``nn.Linear``, ``nn.Conv1d``,
    ``nn.Conv2d``, ``transformers`` ``Conv1D``, ``nn.Embedding``; :func:`elsa_codec.format.selection.module_kind`)
    by their ELSA layer holding the encoded tensor (moved to the old weight's device; same name,
    shape and dtype, so ``state_dict()`` keys are unchanged); a tied weight becomes ONE frozen
    ``Parameter`` shared by every module that uses it. Copies every other tensor of the checkpoint
    into the model, turns the batch-norm layers with per-level statistics into per-level ones
    (:class:`~elsa_codec.serving.batch_norm.LevelBatchNormMixin`), selects the dense level ``T+1``, and installs
    on ``model`` (:func:`install_guards`; both survive ``pickle`` and ``copy.deepcopy``) the check
    that makes a later cast (``.half()``, ``.to(dtype)``) keep every level or raise before any
    tensor changes, and the check that makes a later ``load_state_dict`` of weights without the
    ELSA layers' level codes (plain float weights) raise before any tensor is loaded.

    Args:
        model: any ``nn.Module`` whose ``state_dict()`` the checkpoint was made from; a model
            wrapped in ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile`` is
            served through its inner module (the file holds the bare names, no ``module.`` /
            ``_orig_mod.`` prefix).
        encoded: an :class:`~elsa_codec.format.encode.ELSAStateDict` (from :func:`elsa_codec.encode` or
            :func:`elsa_codec.load_file`) or a path to an ELSA safetensors file.
        filter_fn: ``(module, fqn) -> bool``; encoded modules for which it returns False are not
            swapped (their encoded weight is loaded as a plain tensor: dense level only).
        strict: every tensor of the model's ``state_dict()`` must be in the checkpoint.

    Returns:
        ``model``.

    Raises:
        ELSAError: (nothing changed) a checkpoint tensor missing from the model, or of another
            shape or dtype; a model tensor missing from the checkpoint (``strict``); an encoded
            tensor that is not the weight of a servable module (``MultiheadAttention.out_proj``,
            an ``Embedding`` with ``max_norm``, a bias...); a tied parameter encoded under only
            some of its names, with different tensors, or kept by ``filter_fn`` in only some of
            its modules; no module to swap; ELSA modules already present with another ``T`` / ``k``, or
            whose weight the checkpoint holds without their level codes; an encoded weight of a
            module pruned with ``torch.nn.utils.prune`` (fold it: ``prune.remove``); batch-norm statistics
            for another number of levels, for a missing or non-batch-norm module, or of another
            shape or dtype. Each names the module and the problem.
        ELSAFormatError: ``encoded`` is a path to an invalid file.
    """
    check_module(model, "model", "swap_", order="swap_(model, encoded)")
    if filter_fn is not None and not callable(filter_fn):
        raise ELSATypeError(f"swap_: filter_fn must be a callable (module, fqn) -> bool, got {type(filter_fn).__name__}")
    enc = _as_encoded(encoded)
    outer = model
    model = unwrap_model(model)  # DDP / DataParallel / torch.compile: the file holds the bare names
    _check_owner(enc, model)
    new_modules, new_bn, T = _plan(model, enc, filter_fn, strict)
    _check_meta_left(model, enc, new_modules)
    # Commit: nothing below can fail on validated input.
    for fqn, new in {**new_modules, **new_bn}.items():
        _replace(model, fqn, new)
    _load_plain(model, enc, {f"{fqn}.weight" for fqn in new_modules}, assign=_assign)
    for mod in model.modules():
        if isinstance(mod, (ELSAModule, LevelBatchNormMixin)) and mod.num_levels == T:
            mod.set_level(T + 1)
    install_guards(model)
    try:
        enc._served_by = weakref.ref(model)
    except AttributeError:  # a mapping type that takes no attributes: nothing to remember
        pass
    logger.info("swap_: %d encoded modules, %d per-level batch-norm layers, T=%d", len(new_modules), len(new_bn), T)
    return outer


class CastGuard:
    """The model-level cast check of a served model, installed as its instance attribute
    ``_apply`` (:func:`install_guards`): a plain picklable object (not a bound method, which
    pickle turns back into the class's ``Module._apply``), so ``pickle`` / ``torch.save`` and
    ``copy.deepcopy`` of the model keep it. Calling it runs :func:`_apply` on its model."""

    __slots__ = ("model",)

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, fn, recurse: bool = True):
        return _apply(self.model, fn, recurse)

    def __reduce__(self):
        return (CastGuard, (self.model,))

    def __repr__(self) -> str:
        return f"<elsa_codec cast guard of a {type(self.model).__name__}>"


def _guard_missing(model: nn.Module) -> bool:
    """No cast guard on ``model``: no instance ``_apply``, or one that is the class's own
    ``Module._apply`` or an old bound :func:`_apply` (what pickle made of it)."""
    cur = model.__dict__.get("_apply")
    if cur is None:
        return True
    if isinstance(cur, CastGuard):
        return cur.model is not model  # a shallow copy's guard points at the original
    return isinstance(cur, types.MethodType) and cur.__func__ in (_apply, nn.Module._apply, type(model)._apply)


def install_guards(model: nn.Module) -> None:
    """Install on ``model`` (once) the checks of a served model: the cast guard
    (:class:`CastGuard`: a cast that cannot keep every level raises before any tensor is
    converted) and the ``load_state_dict`` pre-hook
    :func:`~elsa_codec.serving.base.refuse_foreign_state` (weights without the ELSA layers' codes
    raise before any tensor is loaded). Both survive ``pickle`` and ``copy.deepcopy``. Used by
    :func:`swap_`; call it on a model assembled from ELSA modules by hand."""
    if _guard_missing(model):
        object.__setattr__(model, "_apply", CastGuard(model))
    hooks = getattr(model, "_load_state_dict_pre_hooks", {})
    if not any(getattr(h, "hook", None) is refuse_foreign_state for h in hooks.values()):
        model.register_load_state_dict_pre_hook(refuse_foreign_state)


def _apply(self: nn.Module, fn, recurse: bool = True):
    """``Module._apply`` of a model given to :func:`swap_` (its :class:`CastGuard` calls it): before any
    tensor is converted (``.half()``, ``.to(torch.bfloat16)``...), check that every ELSA weight can
    keep its level codes in the new dtype (:meth:`~elsa_codec.serving.base.ELSAModule.cast_plan`); if one
    cannot, raise :class:`ELSAError` with nothing converted. Each ELSA module then re-encodes its
    weight in the new dtype, so every level survives the cast."""
    for _, m in elsa_modules(self):
        m.cast_plan(fn)
    return type(self)._apply(self, fn, recurse)


def load(path, model: nn.Module, *, level=None, filter_fn=None, strict: bool = True, mmap: bool = False,
         resident: str = "one") -> nn.Module:
    """Read the ELSA file ``path`` (:func:`elsa_codec.load_file`) and :func:`swap_` it into ``model``.

    By default the model serves weights in memory it owns: each file is read once, checked
    (checksums, codes) and served from that copy, so replacing, overwriting or truncating the file
    afterwards changes nothing the model computes. With ``level`` (``1..T+1``, ``"dense"``), the
    model serves that level at once: the tensors that are not encoded are the loaded tensors
    themselves (``load_state_dict(assign=True)``; tied or non-CPU ones are copied) and each sparse
    level is packed for the ``sparse-cpu`` kernels.

    ``mmap=True`` (small devices) serves views of a private memory map of the file instead: the
    encoded weights are never copied and, with ``level``, every tensor of the file hands its pages
    back to the OS after packing (:func:`elsa_codec.format.pages.release_pages`; the bytes are read
    again from the file when a later :func:`set_level` packs another level). Resident memory
    measured in bench/results/cpu-sparse/. The file's identity (``st_dev``, ``st_ino``,
    ``st_size``, ``st_mtime_ns``) is kept and checked again before every :func:`set_level`: a
    replaced, truncated or rewritten file is refused with an ELSAError. Risks that remain only in
    this mode: pages changed in place without changing size or mtime are served as changed, and a
    truncation between that check and the read raises SIGBUS (the process dies).

    Args:
        path: an ELSA ``.safetensors`` file or ``.safetensors.index.json``.
        model: the model to swap the ELSA layers into (in place; returned).
        level: serve this level at once (``1..T+1``, ``"dense"``); None keeps the default level.
        filter_fn, strict: as :func:`swap_`.
        mmap: serve views of the mapped file instead of owned memory (see above).
        resident: ``"one"`` (default: a CPU layer packs the level it serves at each switch, and
            only that one) or ``"all"`` (every sparse level packed at load into one nested form per
            layer, one pass over each encoded weight; :func:`set_level` then costs almost nothing;
            see :func:`set_resident`).

    Returns:
        ``model``.

    Raises:
        ELSAFormatError: invalid file. ELSAError: as :func:`swap_` (model unchanged); a level out
            of range; with ``mmap``, the file changed since the load (at a later level switch).
    """
    from ..format.file import _load

    path = check_path(path, "path", "load", order="load(path, model)")
    check_module(model, "model", "load", order="load(path, model)")
    _check_resident(resident, "load")
    enc, sources = _load(path, mmap=bool(mmap))
    if level is not None:
        resolve_level(level, enc.meta.num_levels)  # before anything changes
    swap_(model, enc, filter_fn=filter_fn, strict=strict, _assign=level is not None)
    if mmap:
        _remember_files(model, enc, sources)
    if resident == "all":
        set_resident(model, "all", release=level is not None or bool(mmap))
    if level is not None:
        set_level_released(model, level)
        for t in list(enc.values()) + [s for lv in enc.bn_stats.values() for mod in lv.values() for s in mod.values()]:
            release_pages(t)
    return model


def _remember_files(model: nn.Module, enc, sources: list) -> None:
    """Mark the ELSA modules serving views of ``enc``'s mapped files with those files' identities
    (``[(path, (st_dev, st_ino, st_size, st_mtime_ns))]``), checked by :func:`_check_files`."""
    ptrs = {t.data_ptr() for t in enc.values() if t.numel()}
    for _, m in elsa_modules(model):
        if m.weight.numel() and m.weight.data_ptr() in ptrs:
            m._elsa_mapped_files = tuple(sources)


def _check_files(mods: list) -> None:
    """Before a level is packed from memory-mapped weights (``load(..., mmap=True)``): each mapped
    file still has the identity it had at the load; else ELSAError naming it (nothing changed)."""
    from ..format.file import stat_identity

    seen = set()
    for _, m in mods:
        for path, ident in getattr(m, "_elsa_mapped_files", ()):
            if path in seen:
                continue
            seen.add(path)
            try:
                now = stat_identity(os.stat(path))
            except OSError as e:
                now = e.strerror or str(e)
            if now != ident:
                raise ELSAError(
                    f"{path}: the memory-mapped file changed since elsa_codec.load(..., mmap=True) "
                    f"({_what_changed(ident, now)}); the model serves its pages: load it again"
                )


def _what_changed(ident: tuple, now) -> str:
    if isinstance(now, str):
        return now
    if now[:2] != ident[:2]:
        return "replaced by another file"
    if now[2] != ident[2]:
        return f"size {ident[2]} -> {now[2]} bytes{': truncated' if now[2] < ident[2] else ''}"
    return "modified in place"


def set_level_released(model: nn.Module, level) -> int:
    """:func:`set_level` for a model whose encoded weights are views of a memory-mapped file: module
    by module, the level is packed and the module's encoded weight hands its file pages back right
    after (:func:`elsa_codec.format.pages.release_pages`), so the file's bytes are never all
    resident beside the packed levels; ``keep_weight_resident`` is turned off (a later
    :func:`set_level` reads the pages again). Used by :func:`load` with ``level=`` and by
    ``from_pretrained`` of an ELSA directory.

    Returns:
        The level as an int. Raises: as :func:`set_level`.
    """
    mods, T, _ = _levelled(model)
    t = resolve_level(level, T)
    _check_files(mods)
    for _, m in mods:
        m.keep_weight_resident = False
        m.set_level(t)
        release_pages(m.weight.detach())
    return set_level(model, t)


def _check_resident(resident, fn: str) -> None:
    from .cpu_plan import RESIDENT_MODES

    if resident not in RESIDENT_MODES:
        raise ELSAError(f"{fn}: resident must be one of {RESIDENT_MODES}, got {resident!r}")


def set_resident(model: nn.Module, resident: str, *, release: bool = False) -> int:
    """What the CPU layers of ``model`` keep packed: ``"one"`` (the level in use, packed at each
    :func:`set_level`; the default) or ``"all"``: every sparse level ``1..T`` of each layer packed
    now into one nested csr form (each row's kept weights in one segment per level, so level ``t``
    is the first ``t`` segments; :mod:`elsa_codec.kernels.cpu.nested`), one read of each encoded
    weight; a later :func:`set_level` only changes how many segments the kernels read. Levels are then served
    by csr or, per batch-size bucket, dense (a dense route decodes the level on its first call).
    Layers the sparse-cpu kernels cannot serve (convolutions, embeddings, GPU weights) are left as
    they are.

    Args:
        release: after packing, hand each encoded weight's pages back to the OS
            (:func:`elsa_codec.format.pages.release_pages`; useful with ``load(..., mmap=True)``:
            the file's bytes are then read again only for the dense level).

    Returns:
        The number of layers set.

    Raises:
        ELSAError: ``resident`` not ``"one"`` / ``"all"``; the model has no ELSA layer; the
            kernels are unavailable (``"all"``); a file served with ``mmap=True`` changed.

    Example::

        >>> ec.load("model.elsa.safetensors", model, resident="all")   # or ec.set_resident(model, "all")
        >>> ec.set_level(model, 1); ec.set_level(model, 3)              # microseconds per layer
    """
    _check_resident(resident, "set_resident")
    mods, _, _ = _levelled(model)
    _check_files(mods)
    todo = [m for _, m in mods if m._sparse_cpu_ok and m.weight.device.type == "cpu"]
    if resident == "all":
        from ..native import cpu_kernels, cpu_kernels_error

        if todo and cpu_kernels() is None:
            raise ELSAError(f"set_resident: resident='all' needs the CPU sparse kernels ({cpu_kernels_error()})")
    from .cpu_plan import nested_for_module

    for m in todo:
        if release:
            m.keep_weight_resident = False
        m.resident = resident
        if resident == "all":
            nested_for_module(m)
    return len(todo)


def elsa_modules(model: nn.Module) -> list:
    """``[(fqn, module)]`` of the ELSA layers (:class:`~elsa_codec.serving.base.ELSAModule`) in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ELSAModule)]


def _levelled(model: nn.Module) -> tuple[list, int, int]:
    check_module(model, "model", "levels / set_level / elsa_state_dict")
    mods = elsa_modules(model)
    if not mods:
        raise ELSAError(f"the model ({type(model).__name__}) has no ELSA module: call elsa_codec.swap_ first")
    Tk = {(m.num_levels, m.code_bits) for _, m in mods}
    if len(Tk) > 1:
        raise ELSAError(f"the model's ELSA modules disagree on (T, k): {sorted(Tk)}")
    T, k = Tk.pop()
    return mods, T, k


def set_level(model: nn.Module, level, *, semi_structured: bool = False) -> int:
    """Select level ``1..T``, ``T+1`` or ``"dense"`` in every ELSA module and per-level
    batch-norm layer of ``model``.

    Args:
        semi_structured: materialise a 2:4 (or 1:4) level of every ``ELSALinear`` as a
            ``torch.sparse`` semi-structured tensor (sparse tensor cores; CUDA, compute capability
            >= 8.0) instead of the fused kernel. ``False`` returns such modules to ``"auto"``.

    Returns:
        The level as an int.

    Raises:
        ELSAError: no ELSA module; modules with different ``T``; level out of range;
            ``semi_structured`` for a level that is not N:4 with N <= 2, or on a device without
            semi-structured sparsity; a model loaded with ``load(..., mmap=True)`` whose file
            was replaced, truncated or modified since (names the file; nothing changed in every
            case).
    """
    check_module(model, "model", "set_level", order="set_level(model, level)")
    mods, T, _ = _levelled(model)
    t = resolve_level(level, T)
    _check_files(mods)
    linears = [(n, m) for n, m in mods if isinstance(m, ELSALinear)]
    if semi_structured:
        if t > T:
            raise ELSAError("semi_structured: the dense level has no 2:4 structure")
        from ..format.structure import parse_structure

        for n, m in linears:
            st = parse_structure(m.structures[t - 1])
            if not (st.kind == "nm" and st.m == 4 and st.n <= 2):
                raise ELSAError(f"module {n!r}: level {t} has structure {st}, semi_structured needs 2:4 (or 1:4)")
            from ..kernels.triton import semi_structured as sem
            if not sem.semi_structured_supported(m.weight.device):
                raise ELSAError(
                    f"module {n!r}: semi-structured (2:4) sparsity needs a CUDA GPU of compute capability >= 8.0; weight is on {m.weight.device}"
                )
    for n, m in linears:
        if semi_structured:
            m.backend = "semi-structured"
        elif m.backend_request == "semi-structured":
            m.backend = "auto"
    for m in model.modules():
        if isinstance(m, (ELSAModule, LevelBatchNormMixin)):
            m.set_level(t)
    return t


def levels(model: nn.Module) -> list:
    """The levels of a swapped model: ``[LevelInfo(level, structure, sparsity)]`` for ``1..T``,
    then ``LevelInfo(T+1, "dense", 0.0)``. Sparsity is the recorded fraction of zeros over the
    model's encoded weights (weighted by their sizes).

    Raises:
        ELSAError: no ELSA module.
    """
    mods, T, _ = _levelled(model)
    uniq = list({id(m.weight): m for _, m in mods}.values())  # a tied weight counts once
    total = sum(m.weight.numel() for m in uniq) or 1
    out = []
    for t in range(1, T + 1):
        zeros = sum(m.sparsities[t - 1] * m.weight.numel() for m in uniq)
        out.append(LevelInfo(t, mods[0][1].structures[t - 1], zeros / total))
    out.append(LevelInfo(T + 1, "dense", 0.0))
    return out


def set_sparsity(model: nn.Module, sparsity: float) -> int:
    """Select the level whose recorded sparsity (:func:`levels`) is closest to ``sparsity``
    (ties: the denser level); ``0`` gives the dense level. Logs and returns the level.

    Raises:
        ELSAError: ``sparsity`` outside ``[0, 1]``; no ELSA module.
    """
    check_module(model, "model", "set_sparsity", order="set_sparsity(model, sparsity)")
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise ELSAError(f"sparsity must be a number in [0, 1], got {sparsity!r}") from None
    if not 0.0 <= s <= 1.0:
        raise ELSAError(f"sparsity must be in [0, 1], got {s}")
    lv = min(levels(model), key=lambda x: (abs(x.sparsity - s), x.sparsity))
    t = set_level(model, lv.level)
    logger.info("set_sparsity(%.4f): level %d (%s, sparsity %.4f)", s, t, lv.structure, lv.sparsity)
    return t


def elsa_state_dict(model: nn.Module) -> ELSAStateDict:
    """Rebuild the encoded state dict of a swapped model, ready for :func:`elsa_codec.save_file`.

    The tensors are ``model.state_dict()`` (ELSA weights as stored: encoded); the metadata's
    ``T``, ``k``, structures and per-tensor records come from the ELSA modules (sparsities
    re-measured from the codes; the recorded encoding error is kept while they match); the
    per-level batch-norm statistics of every level come from the per-level batch-norm layers, and
    their plain running buffers hold the dense level's statistics (as :func:`elsa_codec.encode`
    writes them), whatever level is active. Saving this and :func:`swap_`-ing it into a fresh copy
    of the original model gives the same model at every level.

    Returns:
        :class:`~elsa_codec.format.encode.ELSAStateDict`.

    Raises:
        ELSAError: no ELSA module; modules with different ``T`` / ``k``; per-level batch-norm
            layers for another ``T``.
    """
    mods, T, k = _levelled(model)
    by_name = {f"{fqn}.weight": m for fqn, m in mods}
    sd = dict(model.state_dict())
    infos = {}
    for name in sd:
        m = by_name.get(name)
        if m is None:
            continue
        w = m.weight.detach()
        info = _tensor_info(w, None, decode_counters(w, k), T)
        old = m.tensor_info
        if isinstance(old, TensorInfo) and old.sparsity == info.sparsity and old.shape == info.shape and old.dtype == info.dtype:
            info = TensorInfo(info.shape, info.dtype, info.sparsity, old.max_ulp, old.sqnr_db)
        info.transposed = m.elsa_kind == "conv1d_t"
        infos[name] = info
    bn: dict[int, dict] = {}
    for fqn, m in model.named_modules():
        if isinstance(m, LevelBatchNormMixin):
            if m.num_levels != T:
                raise ELSAError(f"per-level batch-norm {_where(fqn)} has T={m.num_levels}, the ELSA modules T={T}")
            for t in range(1, T + 2):
                bn.setdefault(t, {})[fqn] = m.stats_of(t)
            for s, v in bn[T + 1][fqn].items():
                sd[f"{fqn}.{s}"] = v
    structs = list(mods[0][1].structures)
    tied = {n: g[0] for g in model_tie_groups(model) for n in g[1:] if n in infos and g[0] in infos}
    meta = _make_meta(T, k, structs, infos, bn, tied)
    return ELSAStateDict(sd, meta, bn)
