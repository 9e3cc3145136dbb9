"""The ``sparse-cpu`` backend of one ELSA module: its plan per level and its packed levels.

:func:`module_plan` asks :func:`elsa_codec.kernels.cpu.planner.plan_level` how a level of the
module's weight is served (which packed format, and per batch-size bucket packed or dense),
honouring the module's ``cpu_format`` / ``cpu_max_tokens`` overrides. :class:`PackedCache` keeps
the packed levels: the current one, plus recently used ones while their bytes fit
``packed_cache_bytes`` (an LRU; default: the current level only), so switching back to a level
that is still cached costs nothing. With ``resident="all"`` a module instead holds one nested csr
form of every sparse level (:func:`nested_for_module`), and its plans measure csr only.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict

import torch

from ..errors import ELSAError
from ..format.pages import release_pages
from ..format.structure import parse_structure
from ..kernels.cpu.nested import NestedLevels, pack_nested
from ..kernels.cpu.packed import FORMATS, PackedLevel, pack_level
from ..kernels.cpu.planner import Plan, candidates, cost_model
from ..kernels.cpu.plans import plan_level

__all__ = ["RESIDENT_MODES", "PackedCache", "module_plan", "nested_for_module", "pack_for_module", "set_packed_cache_bytes"]

#: What a sparse-cpu module keeps packed: the current level ("one") or every level, nested ("all").
RESIDENT_MODES = ("one", "all")


def _weight_name(module) -> str:
    return f"{type(module).__name__}.weight"


def _forced_candidates(module, level: int) -> list:
    """The candidates of ``level``, or the one ``cpu_format`` forces (checked against the level)."""
    structure = module.structures[level - 1]
    cands = candidates(structure)
    fmt = module.cpu_format
    if module.resident == "all":  # the nested form is csr: level t = its first t segments
        if fmt not in (None, "csr"):
            raise ELSAError(f"{_weight_name(module)}: resident='all' serves the nested csr form; cpu_format {fmt!r} "
                            "needs resident='one'")
        return [("csr", (0, 0), (0, 0))]
    if fmt is None:
        return cands
    if fmt not in FORMATS:
        raise ELSAError(f"{_weight_name(module)}: cpu_format must be None or one of {FORMATS}, got {fmt!r}")
    st = parse_structure(structure)
    if fmt == "bsr":
        if st.kind != "block":
            raise ELSAError(f"{_weight_name(module)}: cpu_format 'bsr' needs a block:RxC level; level {level} is {structure}")
        return [("bsr", (st.r, st.c), (0, 0))]
    if fmt == "nm":
        if st.kind != "nm":
            raise ELSAError(f"{_weight_name(module)}: cpu_format 'nm' needs an N:M level; level {level} is {structure}")
        return [("nm", (0, 0), (st.n, st.m))]
    return [(fmt, (0, 0), (0, 0))]


def module_plan(module, level: int) -> Plan:
    """How the ``sparse-cpu`` backend serves ``level`` of an ELSA module (a linear product,
    weight `[out_features, in_features]` by ``module._linear_weight()``), at this process's thread
    count: measured once per distinct key, or the cost model (see
    :mod:`elsa_codec.kernels.cpu.planner`). With ``cpu_max_tokens`` set, calls with up to that many
    rows run packed and larger ones dense (``source="forced"``).

    Raises:
        ELSAError: ``cpu_format`` unknown or not fitting the level's structure.
    """
    cands = _forced_candidates(module, level)
    w = module._linear_weight().detach()
    density = 1.0 - module.sparsities[level - 1]
    structure = module.structures[level - 1]
    plan = plan_level(w, level, module.code_bits, structure, density, cands=cands, name=_weight_name(module))
    limit = module.cpu_max_tokens
    if limit is None:
        if plan.format is None:  # served dense; a forced backend or decoded_weight still packs in a format
            fmt, block, group = cands[0]
            plan = dataclasses.replace(plan, format=fmt, block=block, group=group)
        return plan
    if plan.format is None:  # measured dense everywhere: the cost model's format for the forced rows
        plan = cost_model(tuple(w.shape), w.dtype, density, structure)
        if len(cands) == 1 or plan.format is None:
            fmt, block, group = cands[0]
            plan = dataclasses.replace(plan, format=fmt, block=block, group=group)
    return dataclasses.replace(plan, max_rows=int(limit), source="forced")


def pack_for_module(module, level: int, choice: tuple) -> PackedLevel:
    """Pack ``level`` of the module's weight in ``choice`` ``(format, block, group)`` (one of its
    plan's); then, if ``module.keep_weight_resident`` is False, :func:`release_pages` of the
    encoded weight.

    Raises:
        ELSAError: the kernels are unavailable; the level does not fit the format.
    """
    with torch.no_grad():
        fmt, block, group = choice
        packed = pack_level(module._linear_weight().detach(), level, module.code_bits, fmt, block,
                            group=group, name=_weight_name(module))
    if not module.keep_weight_resident:
        release_pages(module.weight)
    return packed


def nested_for_module(module) -> NestedLevels:
    """The nested csr form of every sparse level of the module's weight
    (:func:`~elsa_codec.kernels.cpu.nested.pack_nested`, one read of the encoded weight), built
    once per weight version and kept as ``module._nested``; then, if ``module.keep_weight_resident``
    is False, :func:`release_pages` of the encoded weight.

    Raises:
        ELSAError: the kernels are unavailable.
    """
    w = module.weight
    key = (w.data_ptr(), w._version, w.dtype)
    held = module._nested
    if held is not None and held[0] == key:
        return held[1]
    module._nested = None  # the old form goes before the new one is built
    with torch.no_grad():
        nested = pack_nested(module._linear_weight().detach(), module.num_levels, module.code_bits,
                             name=_weight_name(module))
    module._nested = (key, nested)
    if not module.keep_weight_resident:
        release_pages(module.weight)
    return nested


class PackedCache:
    """Packed levels of one module (keyed ``(level, ...)``), most recently used last. Holds every
    packed form of the level in use (a plan may use two formats) plus, within ``budget`` bytes,
    recently used other levels (None: none)."""

    def __init__(self):
        self._levels: OrderedDict = OrderedDict()

    def get(self, key):
        """The packed level under ``key`` (marked most recently used), or None."""
        p = self._levels.get(key)
        if p is not None:
            self._levels.move_to_end(key)
        return p

    def put(self, key, packed: PackedLevel, budget: int | None) -> None:
        """Keep ``packed`` under ``key`` (``key[0]`` its level, the level in use) as the most
        recent; drop the oldest other levels until they fit ``budget`` bytes."""
        self._levels[key] = packed
        self._levels.move_to_end(key)
        self.trim(budget, key[0])

    def trim(self, budget: int | None, level: int | None = None) -> None:
        """Drop the oldest entries of levels other than ``level`` (None: of every level) until
        those fit ``budget`` bytes (None: 0)."""
        keep = 0 if budget is None else int(budget)
        others = [k for k in self._levels if k[0] != level]
        total = sum(self._levels[k].nbytes for k in others)
        for k in others:  # oldest first
            if total <= keep:
                break
            total -= self._levels.pop(k).nbytes

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self._levels.values())

    def level_nbytes(self, level: int) -> int:
        """Bytes of the packed forms held for ``level`` (every format of it; 0: none)."""
        return sum(p.nbytes for k, p in self._levels.items() if k[0] == level)

    def levels(self) -> list:
        """The levels held, oldest first (a level packed in two formats once)."""
        return list(dict.fromkeys(k[0] for k in self._levels))

    def clear(self) -> None:
        self._levels.clear()

    def __len__(self) -> int:
        return len(self._levels)


def set_packed_cache_bytes(model: torch.nn.Module, nbytes: int | None) -> int:
    """Let the ELSA modules of ``model`` keep recently used packed levels (``sparse-cpu``) within
    ``nbytes`` in all (None: only the level in use, the default), shared in proportion to each
    module's weight bytes. A switch back to a level still held costs no packing.

    Returns:
        The number of modules set.

    Raises:
        ELSAError: ``nbytes`` not None or an int >= 0.

    Example::

        >>> ec.set_packed_cache_bytes(model, 512 << 20)   # keep ~512 MiB of packed levels
    """
    if nbytes is not None and (not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0):
        raise ELSAError(f"set_packed_cache_bytes: nbytes must be None or an int >= 0, got {nbytes!r}")
    mods = [m for m in model.modules() if getattr(m, "_sparse_cpu_ok", False) and isinstance(getattr(m, "_packed", None), PackedCache)]
    total = sum(m.weight.numel() * m.weight.element_size() for m in mods) or 1
    for m in mods:
        share = None if nbytes is None else nbytes * m.weight.numel() * m.weight.element_size() // total
        m.packed_cache_bytes = share
        m._packed.trim(share, m.level if m.level <= m.num_levels else None)
    return len(mods)
