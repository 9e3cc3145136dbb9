"""Names of a wrapped model: DDP, FSDP and ``torch.compile`` prefixes.

``DistributedDataParallel`` (and ``DataParallel``) name every tensor ``module.<name>``,
``torch.compile`` names them ``_orig_mod.<name>``, FSDP (v1) inserts ``_fsdp_wrapped_module.``
at every wrapped submodule. An ELSA file and an embedder's state always use the names of the bare
model; these helpers map between the two.
"""
from __future__ import annotations

from torch import nn

__all__ = ["WRAPPER_PREFIXES", "strip_wrapper_prefix", "unwrap_model"]

#: Name components that wrappers insert; ``module.`` only counts at the start of a name.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
_ANYWHERE = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def _is_root_wrapper(model: nn.Module) -> str | None:
    """The attribute holding the wrapped module when ``model`` is a DDP / DataParallel /
    ``torch.compile`` / FSDP root wrapper, else None."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    if isinstance(model, (DistributedDataParallel, DataParallel)):
        return "module"
    for attr in ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"):
        if isinstance(getattr(model, attr, None), nn.Module) and attr in model._modules:
            return attr
    return None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside any stack of DDP / DataParallel / ``torch.compile`` / FSDP root
    wrappers (``model`` itself when it is not wrapped). Nested FSDP wrappers inside the bare
    model stay (their names are mapped by :func:`strip_wrapper_prefix`)."""
    while True:
        attr = _is_root_wrapper(model)
        if attr is None:
            return model
        model = getattr(model, attr)


def strip_wrapper_prefix(name: str) -> str:
    """``name`` without wrapper components: ``module.fc.weight`` -> ``fc.weight``,
    ``_orig_mod.h.0._fsdp_wrapped_module.fc.weight`` -> ``h.0.fc.weight``.

    Only a leading ``module.`` is removed (a submodule may really be called ``module``) and only
    when it is followed by more (``"module.weight"`` of a model whose child is ``module`` is
    ambiguous: use :func:`unwrap_model` on the model instead when you can).
    """
    changed = True
    while changed:
        changed = False
        for p in WRAPPER_PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
        for p in _ANYWHERE:
            if "." + p in name:
                name, changed = name.replace("." + p, "."), True
    return name
