"""Which weights ELSA prunes, by identity: tied weights once, wrapper prefixes stripped.

One selector convention (torchao's): ``filter_fn(module, fqn) -> bool``, called on every module
with a ``weight`` Parameter. Without it a policy of :data:`elsa_codec.SELECT_POLICIES` (default
``"blocks"``, the SparseGPT / Wanda convention) or a list of names selects. A Parameter shared by
several modules (a tied ``lm_head`` and token embedding) is ONE tensor: it gets one mask, one set
of frozen values and one counter tensor, under its first selected name.
"""
from __future__ import annotations

from torch import nn

from ..errors import ELSAError, ELSATypeError
from ..format.selection import DEFAULT_SELECT, SELECT_POLICIES, select_weights, transposed_weights
from ..wrappers import strip_wrapper_prefix, unwrap_model

__all__ = ["prunable_weights", "shared_parameters", "model_transposed"]


def _weighted(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), nn.Parameter)}


def _by_names(mods: dict, names) -> list[str]:
    sel = []
    for n in names:
        n = str(n)
        mn = n[: -len(".weight")] if n.endswith(".weight") else n
        if mn not in mods:
            raise ELSAError(f"{n}: no module with a weight Parameter of that name in the model")
        sel.append(mn)
    return sel


def _selected_modules(model: nn.Module, select, filter_fn) -> list[str]:
    mods = _weighted(model)
    if filter_fn is not None:
        if not callable(filter_fn):
            raise ELSAError(f"filter_fn must be a callable (module, fqn) -> bool, got {type(filter_fn).__name__}")
        return [n for n, m in mods.items() if filter_fn(m, n)]
    if select is None or isinstance(select, str):
        if isinstance(select, str) and select not in SELECT_POLICIES:
            raise ELSAError(f"unknown selection policy {select!r}: expected one of {SELECT_POLICIES}, names or filter_fn=")
        names = select_weights(model, select or DEFAULT_SELECT)
        return [n[: -len(".weight")] if n.endswith(".weight") else "" for n in names]
    return _by_names(mods, select)


def prunable_weights(model: nn.Module, select=None, *, filter_fn=None) -> dict[str, nn.Parameter]:
    """The weights ELSA prunes: ``name -> Parameter``, one entry per Parameter (by identity).

    Args:
        model: any ``nn.Module``, bare or wrapped (DDP, FSDP, ``torch.compile``: the names are
            those of the bare model).
        select: None or a policy of :data:`elsa_codec.format.selection.SELECT_POLICIES` (default
            ``"blocks"``: Linear / Conv1d / Conv2d / transformers ``Conv1D`` weights without the
            embeddings and the output head), or an iterable of module / parameter names.
        filter_fn: ``(module, fqn) -> bool`` on every module with a ``weight`` Parameter (the
            torchao convention); replaces ``select``.

    Raises:
        ELSAError: no prunable layer; a listed name that is not in the model; unknown policy.
    """
    if callable(select) and not isinstance(select, str):
        raise ELSATypeError("select= takes a policy or a list of names; a (name, module) predicate was removed in 0.2 "
                            "(CHANGELOG.md): pass filter_fn=(module, fqn) -> bool")
    bare = unwrap_model(model)
    sel = _selected_modules(bare, select, filter_fn)
    out, seen = {}, set()
    for n in sel:
        p = bare.get_submodule(n).weight
        if id(p) not in seen:  # a tied weight is one tensor: one mask, one counter tensor
            seen.add(id(p))
            out[strip_wrapper_prefix(f"{n}.weight" if n else "weight")] = p
    if not out:
        raise ELSAError(
            "the model has no prunable layer (no Linear / Conv / Conv1D weight selected); choose tensors with "
            "select= (a policy or names) or filter_fn=(module, fqn) -> bool"
        )
    return out


def shared_parameters(model: nn.Module, params: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
    """Every other Parameter of ``model`` (biases, norm affine, embeddings left dense), once per
    identity, under its first (prefix-stripped) name: those ``freeze_shared`` freezes."""
    ids = {id(p) for p in params.values()}
    out = {}
    for n, p in unwrap_model(model).named_parameters():
        if id(p) not in ids:
            ids.add(id(p))
            out[strip_wrapper_prefix(n)] = p
    return out


def model_transposed(model: nn.Module, params) -> set[str]:
    """The names of ``params`` stored `[in, out]` (transformers ``Conv1D``)."""
    bare = unwrap_model(model)
    return {strip_wrapper_prefix(n) for n in transposed_weights(bare)} & set(params)
