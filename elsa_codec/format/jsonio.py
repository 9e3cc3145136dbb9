"""Bounded JSON reading for the files ELSA reads (safetensors headers, metadata documents,
checksum tables, shard indexes, counters headers).

:func:`loads` refuses a repeated key (``json`` keeps the last one silently) and JSON nested deeper
than :data:`MAX_DEPTH` levels (``json`` would recurse into a ``RecursionError`` traceback). Both
failures are ``ValueError`` subclasses, so every reader's existing ``except ValueError`` turns them
into its one-line :class:`~elsa_codec.errors.ELSAFormatError` naming the file.
"""
from __future__ import annotations

import json
import re

__all__ = ["MAX_DEPTH", "DuplicateKeyError", "TooDeepError", "loads", "unique_keys"]

#: Deepest nesting of arrays and objects accepted (an ELSA document needs 4).
MAX_DEPTH = 64

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_BRACKET = re.compile(r"[\[\]{}]")


class DuplicateKeyError(ValueError):
    """A JSON object repeats a key; ``key`` is it, ``value`` one of its values."""

    def __init__(self, key: str, value):
        super().__init__(f"duplicated key {key!r}")
        self.key, self.value = key, value


class TooDeepError(ValueError):
    """JSON nested deeper than the limit."""


def unique_keys(pairs: list) -> dict:
    """``object_pairs_hook`` for ``json.loads``: a repeated key is a :class:`DuplicateKeyError`."""
    d = {}
    for k, v in pairs:
        if k in d:
            raise DuplicateKeyError(k, v)
        d[k] = v
    return d


def _depth(text: str, limit: int) -> int:
    """Nesting depth of ``text``'s arrays and objects (brackets inside strings ignored); stops
    counting past ``limit``."""
    depth = best = 0
    for m in _BRACKET.finditer(_STRING.sub('""', text)):
        depth += 1 if m.group() in "[{" else -1
        if depth > best:
            best = depth
            if best > limit:
                break
    return best


def loads(text, *, max_depth: int = MAX_DEPTH):
    """``json.loads(text)`` with unique keys and at most ``max_depth`` nested arrays / objects.

    Args:
        text: ``str`` or UTF-8 ``bytes``.
        max_depth: deepest nesting accepted.

    Returns:
        The parsed value.

    Raises:
        TypeError: ``text`` is not a string. ValueError: invalid JSON (``json.JSONDecodeError``,
            ``UnicodeDecodeError``), a repeated key (:class:`DuplicateKeyError`), nesting deeper
            than ``max_depth`` (:class:`TooDeepError`).
    """
    if isinstance(text, (bytes, bytearray, memoryview)):
        text = bytes(text).decode("utf-8")
    if not isinstance(text, str):
        raise TypeError(f"the JSON must be a string, not {type(text).__name__}")
    if _depth(text, max_depth) > max_depth:
        raise TooDeepError(f"nested deeper than {max_depth} levels")
    try:
        return json.loads(text, object_pairs_hook=unique_keys)
    except RecursionError:  # not reachable under the depth limit; kept as a backstop
        raise TooDeepError(f"nested deeper than {max_depth} levels") from None
