"""Real English text that ships with Python itself: the sentences of ``pydoc_data.topics``.

``pydoc_data.topics.topics`` holds the interpreter's reference documentation as plain text (about
465 KB in CPython 3.11). :func:`sentences` splits it into prose sentences; :func:`split` gives a
fixed held-out set chosen by a hash of each sentence, so the split does not depend on the order
of the topics nor on any random state. Nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import re

__all__ = ["sentences", "split"]

_PARAGRAPH = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def _prose(s: str, share: float) -> bool:
    """At least ``share`` of the characters are letters or spaces (drops code and tables)."""
    return sum(c.isalpha() or c == " " for c in s) >= share * len(s)


def sentences(min_chars: int = 30, max_chars: int = 300, *, prose_share: float = 0.8) -> list[str]:
    """The distinct prose sentences of ``pydoc_data.topics``, in a fixed order.

    Each topic is cut into paragraphs (blank lines), whitespace is collapsed, and a paragraph is
    cut after ``.``, ``!`` or ``?`` followed by a capital letter, quote or parenthesis. Kept:
    sentences of ``min_chars..max_chars`` characters of which at least ``prose_share`` are letters
    or spaces; the first occurrence of each.

    Returns:
        About 2,400 sentences with the defaults (CPython 3.11).

    Raises:
        ValueError: ``min_chars > max_chars`` or ``prose_share`` outside [0, 1].
    """
    if min_chars > max_chars:
        raise ValueError(f"min_chars={min_chars} is above max_chars={max_chars}")
    if not 0.0 <= prose_share <= 1.0:
        raise ValueError(f"prose_share must be in [0, 1], got {prose_share}")
    from pydoc_data.topics import topics

    out, seen = [], set()
    for key in sorted(topics):
        for para in _PARAGRAPH.split(topics[key]):
            for s in _SENTENCE_END.split(" ".join(para.split())):
                if min_chars <= len(s) <= max_chars and s not in seen and _prose(s, prose_share):
                    seen.add(s)
                    out.append(s)
    return out


def split(items: list[str], heldout: float = 0.1) -> tuple[list[str], list[str]]:
    """``(train, held_out)``: a sentence is held out when the first 8 bytes of its SHA-256, as an
    integer, fall in the lowest ``heldout`` share; the order of ``items`` is kept in both.

    Raises:
        ValueError: ``heldout`` outside (0, 1).
    """
    if not 0.0 < heldout < 1.0:
        raise ValueError(f"heldout must be in (0, 1), got {heldout}")
    cut = int(heldout * 2**64)
    train, test = [], []
    for s in items:
        h = int.from_bytes(hashlib.sha256(s.encode("utf-8")).digest()[:8], "big")
        (test if h < cut else train).append(s)
    return train, test
