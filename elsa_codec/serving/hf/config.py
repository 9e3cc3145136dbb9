"""``ELSAQuantizationConfig``: the ``quantization_config`` of an ELSA checkpoint's ``config.json``.

The stored document is its own schema (as compressed-tensors keeps one): ``config.json`` holds

.. code-block:: json

    "quantization_config": {
      "quant_method": "elsa", "format_version": 1, "num_levels": 3, "code_bits": 2,
      "dtype": "float32", "default_level": 4,
      "levels": [{"level": 1, "structure": "unstructured", "sparsity": 0.9}, ...]
    }

The full per-tensor document (every encoded tensor's record, the CRC-32s) stays in the
safetensors headers and the index (docs/FORMAT.md); this is the summary transformers and a reader
of ``config.json`` see. ``level`` is a loading choice (the level to serve at load), never written.
ELSA: Halvachi et al., arXiv 2312.06872, sec. 2.2 (one file, every level).
"""
from __future__ import annotations

import copy
import json

from transformers.utils.quantization_config import QuantizationConfigMixin

from ...errors import ELSAError
from ...format.bits import MAX_CODE_BITS
from ...format.document import ELSAMeta

__all__ = ["QUANT_METHOD", "ELSAQuantizationConfig"]

#: The ``quant_method`` of an ELSA checkpoint.
QUANT_METHOD = "elsa"

_DTYPES = {str(d).replace("torch.", ""): d for d in MAX_CODE_BITS}
_FIELDS = ("format_version", "num_levels", "code_bits", "dtype", "levels", "default_level")


def _level_number(value, num_levels: int | None, what: str):
    """``value`` (``1..T+1`` or ``"dense"``) as an int, or None when ``value`` is None."""
    if value is None:
        return None
    if value == "dense" and num_levels is not None:
        return num_levels + 1
    if isinstance(value, bool) or not isinstance(value, int) and not (hasattr(value, "__index__") and not isinstance(value, float)):
        raise ELSAError(f"ELSAQuantizationConfig: {what} must be a level 1..T+1 or 'dense', got {value!r}")
    t = int(value.__index__())
    if t < 1 or (num_levels is not None and t > num_levels + 1):
        top = f"1..{num_levels + 1}" if num_levels is not None else ">= 1"
        raise ELSAError(f"ELSAQuantizationConfig: {what}={value!r} is out of range: this checkpoint has levels {top} "
                        f"({num_levels} sparse levels, {num_levels + 1 if num_levels else 'T+1'} = dense)")
    return t


class ELSAQuantizationConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of an ELSA checkpoint (``quant_method: "elsa"``).

    Written by ``elsa convert`` / :func:`elsa_codec.save_pretrained` from the file's document;
    read by transformers when ``from_pretrained`` finds it in ``config.json`` and handed to
    :class:`~elsa_codec.serving.hf.quantizer.ELSAHfQuantizer`.

    Args:
        level: the level to serve once loaded (``1..T`` sparse, ``T+1`` or ``"dense"``); None: the
            checkpoint's ``default_level``. A loading choice, never written to ``config.json``.
        resident: ``"one"`` (default: the CPU layers pack the level in use at each switch) or
            ``"all"`` (every sparse level packed once at load, nested; a switch then costs almost
            nothing; :func:`elsa_codec.set_resident`). A loading choice, never written.
        format_version: the document's format version (docs/FORMAT.md).
        num_levels: ``T``; code_bits: ``k``; dtype: the encoded tensors' dtype (``"float32"``,
            ``"float16"``, ``"bfloat16"``).
        levels: ``[{"level", "structure", "sparsity"}]`` for levels ``1..T``.
        default_level: the level a plain ``from_pretrained`` serves (default: dense).

    Raises:
        ELSAError: a field of the wrong type or out of range (``level`` and ``default_level``
            outside ``1..T+1``; ``code_bits`` the dtype cannot hold).

    Example::

        >>> cfg = ELSAQuantizationConfig(level=2, resident="all")
        >>> cfg.to_dict()["quant_method"]
        'elsa'
    """

    def __init__(self, level=None, *, format_version: int | None = None, num_levels: int | None = None,
                 code_bits: int | None = None, dtype: str | None = None, levels: list | None = None,
                 default_level=None, resident: str | None = None, **kwargs):
        kwargs.pop("quant_method", None)
        if kwargs:
            raise ELSAError(f"ELSAQuantizationConfig: unknown field {sorted(kwargs)[0]!r} (known: level, resident, {', '.join(_FIELDS)})")
        self.resident = resident
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.num_levels = num_levels
        self.code_bits = code_bits
        self.dtype = dtype
        self.levels = copy.deepcopy(levels)
        self.default_level = default_level
        self.level = level
        self.post_init()

    def post_init(self) -> None:
        """Check every field (called by ``__init__``)."""
        for name in ("format_version", "num_levels", "code_bits"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ELSAError(f"ELSAQuantizationConfig: {name} must be a positive int, got {v!r}")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ELSAError(f"ELSAQuantizationConfig: dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.dtype is not None and self.code_bits is not None and self.code_bits > MAX_CODE_BITS[_DTYPES[self.dtype]]:
            raise ELSAError(f"ELSAQuantizationConfig: {self.dtype} holds at most {MAX_CODE_BITS[_DTYPES[self.dtype]]} code bits, "
                            f"code_bits is {self.code_bits}")
        if self.levels is not None:
            if not isinstance(self.levels, list) or not all(isinstance(x, dict) and set(x) == {"level", "structure", "sparsity"} for x in self.levels):
                raise ELSAError("ELSAQuantizationConfig: levels must be a list of {level, structure, sparsity} objects")
            if self.num_levels is not None and len(self.levels) != self.num_levels:
                raise ELSAError(f"ELSAQuantizationConfig: levels lists {len(self.levels)} levels, num_levels is {self.num_levels}")
        self.default_level = _level_number(self.default_level, self.num_levels, "default_level")
        self.level = _level_number(self.level, self.num_levels, "level")
        if self.resident not in (None, "one", "all"):
            raise ELSAError(f"ELSAQuantizationConfig: resident must be 'one' or 'all', got {self.resident!r}")

    @classmethod
    def from_meta(cls, meta: ELSAMeta, *, default_level=None) -> "ELSAQuantizationConfig":
        """The config summarising an ELSA document (:class:`~elsa_codec.format.document.ELSAMeta`)."""
        dtypes = sorted({info.dtype for info in meta.tensors.values()})
        if len(dtypes) != 1:
            raise ELSAError(f"an ELSA checkpoint for transformers encodes tensors of one dtype, this one has {dtypes}")
        return cls(format_version=meta.written_version, num_levels=meta.num_levels, code_bits=meta.code_bits,
                   dtype=dtypes[0], levels=[{"level": lv.level, "structure": lv.structure, "sparsity": lv.sparsity}
                                            for lv in meta.levels],
                   default_level=meta.num_levels + 1 if default_level is None else default_level)

    @property
    def load_level(self) -> int:
        """The level served after loading: ``level``, else ``default_level``, else dense."""
        if self.level is not None:
            return self.level
        if self.default_level is not None:
            return self.default_level
        return (self.num_levels or 0) + 1

    def to_dict(self) -> dict:
        """The ``config.json`` form: ``quant_method`` and the stored fields (never ``level``)."""
        return {"quant_method": QUANT_METHOD, **{f: copy.deepcopy(getattr(self, f)) for f in _FIELDS}}

    def to_diff_dict(self) -> dict:
        return self.to_dict()

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def get_loading_attributes(self) -> dict:
        return {"level": self.level, "resident": self.resident}
