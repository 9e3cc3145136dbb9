"""The streaming encode with one-shot magnitude levels: :func:`encode_file`.

The reading, encoding and writing are the format layer's (:func:`elsa_codec.format.stream.encode_stream`);
this module adds the level source that makes magnitude counters chunk by chunk
(:class:`MagnitudeLevels`): unstructured levels from histograms of ``|w|``'s bit patterns
(:mod:`elsa_codec.oneshot.stream_counters`, with global thresholds streamed first by
:func:`elsa_codec.oneshot.thresholds.global_thresholds_stream`), N:M levels per block of whole
rows, block levels in memory (about 3x the tensor while they are computed). The output is
byte-identical to ``save_file(encode(sd, magnitude_counters(sd, levels, ...)))``
(tests/format/test_stream.py).
"""
from __future__ import annotations

import dataclasses

import torch

from ..errors import ELSAError
from ..format.document import ELSAMeta
from ..format.encode import Counters, counter_dtype
from ..format.stream import _FLOAT_CODES, _convert, _numel, encode_stream, limit_heap_retention
from ..format.structure import parse_levels
from .magnitude import _tensor_counters, select_tensors, tensor_magnitude_counters
from .scores import _check_method, tensor_activation_counters
from .stream_counters import RowBlockCounters, UnstructuredCounters
from .thresholds import global_thresholds_stream

__all__ = ["encode_file", "limit_heap_retention", "MagnitudeLevels", "ActivationLevels"]


@dataclasses.dataclass
class MagnitudeLevels:
    """Nested magnitude levels as a level source of the streaming encode (picklable: the shard
    workers get a copy).

    ``levels``, ``structure``, ``distribution`` and ``names`` as :func:`elsa_codec.magnitude_counters`;
    :meth:`select` (the first call the streaming encode makes, once the input is open) parses them
    into ``specs`` (``[(sparsity, Structure)]``) and, for ``"global"``, fills ``thresholds`` (one per
    level, streamed over the selected tensors).
    """

    levels: list
    structure: str = "unstructured"
    distribution: str = "uniform"
    names: object = None
    transposed: frozenset = frozenset()  # weights stored [in, out] (transformers Conv1D), unstructured levels only
    specs: list | None = None
    thresholds: list | None = None

    @property
    def num_levels(self) -> int:
        """T."""
        return len(self.specs)

    @property
    def structures(self) -> list:
        """The structure of each level 1..T, as strings."""
        return [str(st) for _, st in self.specs]

    def select(self, files, where, dtype, in_path) -> list:
        """The selected tensor names (shape-and-dtype stand-ins: no tensor data read); global
        thresholds streamed over them.

        Raises:
            ELSAError: bad levels (as :func:`elsa_codec.magnitude_counters`), nothing selected.
        """
        self.specs = parse_levels(self.levels, self.structure, self.distribution)
        stand_ins = {}
        for n, shard in where.items():
            kind = torch.float32 if files[shard].code(n) in _FLOAT_CODES else torch.int8
            stand_ins[n] = torch.empty([0] * len(files[shard].shape(n)), dtype=kind)

        def get(n):
            f = files[where[n]]
            t = f.flat(n).reshape(f.shape(n))
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t

        sel = select_tensors(self.names, stand_ins, get, in_path)
        if self.distribution == "global" and self.specs[0][1].kind != "nm":
            def chunks():
                for n in sel:
                    f = files[where[n]]
                    yield from f.chunks(n, _convert(dtype, f.code(n)))

            self.thresholds = global_thresholds_stream(chunks, [s for s, _ in self.specs])
        return sel

    def counter_fn(self, src, name: str, conv, chunk: int):
        """``fn(start, stop, chunk) -> counters`` (flat, ``1..T+1``) of one selected tensor of ``src``."""
        shape = src.shape(name)
        kind = self.specs[0][1].kind
        if kind == "unstructured":
            uc = UnstructuredCounters(lambda: src.chunks(name, conv), _numel(shape), [s for s, _ in self.specs],
                                      self.thresholds)
            return lambda s, e, ch: uc(ch)

        def rows(r0, r1):
            x = src.flat(name).reshape(shape)
            x = x[r0:r1] if x.dim() >= 2 else x
            return x.to(conv) if conv is not None else x

        if kind == "nm":
            rb = RowBlockCounters(rows, shape, self.specs, name, chunk)
            return lambda s, e, ch: rb(s, e)
        full = tensor_magnitude_counters(rows(0, shape[0] if shape else 1), self.specs, self.thresholds, name=name)
        full = full.reshape(-1).to(counter_dtype(self.num_levels))
        return lambda s, e, ch: full[s:e]


@dataclasses.dataclass
class ActivationLevels(MagnitudeLevels):
    """Nested activation-aware levels (Wanda, RIA: :mod:`elsa_codec.oneshot.scores`) as a level
    source of the streaming encode: ``statistics`` maps a tensor name to the sum of squares of its
    module's input features (``[groups, in_features]`` float32, from
    :func:`elsa_codec.oneshot.activation.input_norms`); a selected tensor without an entry gets
    magnitude levels. One tensor's counters are made at a time (about 3x the tensor, plus int64
    sort buffers of 256 rows)."""

    statistics: dict = dataclasses.field(default_factory=dict)
    method: str = "wanda"

    def select(self, files, where, dtype, in_path) -> list:
        _check_method(self.method)
        if self.distribution != "uniform":
            raise ELSAError("activation-aware levels take distribution='uniform' (each row keeps the level's share)")
        return super().select(files, where, dtype, in_path)

    def counter_fn(self, src, name: str, conv, chunk: int):
        stats = self.statistics.get(name)
        if stats is None and (name not in self.transposed or self.specs[0][1].kind == "unstructured"):
            return super().counter_fn(src, name, conv, chunk)
        return self._full(src, name, conv, stats)

    def _full(self, src, name: str, conv, stats):
        x = src.flat(name).reshape(src.shape(name))
        x = x.to(conv) if conv is not None else x
        tr = name in self.transposed
        if stats is None:  # an [in, out] weight without statistics: magnitude groups along its dim 0
            c = _tensor_counters(x, self.specs, None, name, tr)
        else:
            c = tensor_activation_counters(x, self.specs, stats, self.method, transposed=tr, name=name)
        full = c.reshape(-1).to(counter_dtype(self.num_levels)).contiguous()
        return lambda s, e, ch: full[s:e]


def encode_file(
    in_path: str,
    out_path: str,
    *,
    levels=None,
    counters: str | Counters | None = None,
    structure: str = "unstructured",
    distribution: str = "uniform",
    dtype: torch.dtype | None = None,
    code_bits: int | None = None,
    names=None,
    progress: bool = True,
    jobs: int = 1,
    max_shard_size=None,
    transposed=(),
    statistics=None,
    method: str = "wanda",
) -> ELSAMeta:
    """Encode a safetensors checkpoint from disk, chunk by chunk, into an ELSA file.

    The output is byte-identical to ``save_file(encode(sd, counters), out_path)`` of the same
    state dict (``sd`` in the input's order, floats converted to ``dtype``) with
    ``counters = magnitude_counters(sd, levels, structure=..., distribution=..., names=...)`` or
    the given counters. Anonymous memory stays at a few 4M-element chunks whatever the tensor and
    checkpoint sizes (block levels: about 3x the largest selected tensor while its counters are
    made), given :func:`limit_heap_retention` (``elsa encode`` calls it); the input is read from a
    memory map. Global thresholds take two passes over the selected tensors here, before the
    shards are encoded. The output is written atomically and never over the input; the encoded
    tensors go through temporary part files beside it (removed on success and on error), so the
    output's folder needs room for twice the output.

    Args:
        in_path: ``*.safetensors`` or ``*.safetensors.index.json``.
        out_path: the ELSA file ``*.safetensors``; or ``*.safetensors.index.json`` (or
            ``max_shard_size`` given) for shards ``{stem}-00001-of-0000N.safetensors`` plus an
            index, grouped as :func:`elsa_codec.save_file` groups them (default 5 GB a shard).
        levels: magnitude levels, sparsest first (``[0.9, 0.75, 0.5]`` or ``["1:4", "2:4"]``);
            exclusive with ``counters``.
        counters: a counters file (:func:`save_counters`) or :class:`Counters`, e.g. from training.
        structure, distribution, names: as :func:`elsa_codec.magnitude_counters`
            (``distribution``: ``"uniform"`` or ``"global"``).
        dtype: convert floating tensors to this dtype first (e.g. ``torch.bfloat16``).
        code_bits: k (default from T).
        progress: a tqdm bar (tensors; shards with ``jobs > 1``; one line when stderr is not a terminal).
        jobs: worker processes, one input shard each (a single-file input runs here); the
            output does not depend on it. Each worker has ``torch.get_num_threads() // jobs``
            threads.
        max_shard_size: bytes per output shard (int or ``"2GB"``); implies a sharded output.
        transposed: names of weights stored `[in, out]` (transformers ``Conv1D``), recorded as such
            in the document (:func:`elsa_codec.select_weights`'s model knows them); magnitude
            levels only, unstructured (N:M groups and blocks along dim 0 need the model: use
            :func:`elsa_codec.magnitude_counters` with ``model=``); any structure with ``statistics``.
        statistics: activation-aware levels instead of magnitude ones: ``{tensor name: float32
            [groups, in_features]}``, the sum over calibration tokens of the squares of the
            tensor's module's input features (:func:`elsa_codec.oneshot.activation.input_norms`);
            a selected tensor without an entry gets magnitude levels. Needs ``levels``.
        method: with ``statistics``, ``"wanda"`` or ``"ria"`` (:mod:`elsa_codec.oneshot.scores`).

    Returns:
        The written :class:`ELSAMeta`.

    Raises:
        ELSAError / ELSAFormatError: as :func:`elsa_codec.encode` and :func:`load_file`; ``jobs``
            not a positive int; the output is an input file.
    """
    if statistics is not None and levels is None:
        raise ELSAError("encode_file: statistics= makes activation-aware levels and needs levels=")
    if statistics is None and transposed and (levels is None or structure != "unstructured"
                                               or any(isinstance(x, str) for x in levels)):
        raise ELSAError("encode_file: transposed= takes unstructured magnitude levels only (N:M groups and blocks of an "
                        "[in, out] weight need the model: elsa_codec.magnitude_counters(..., model=model))")
    if levels is None:
        source = None
    elif statistics is None:
        source = MagnitudeLevels(levels, structure, distribution, names, frozenset(transposed))
    else:
        source = ActivationLevels(levels, structure, distribution, names, frozenset(transposed),
                                  statistics=dict(statistics), method=method)
    return encode_stream(in_path, out_path, counters=counters, source=source, dtype=dtype, code_bits=code_bits,
                         progress=progress, jobs=jobs, max_shard_size=max_shard_size)
