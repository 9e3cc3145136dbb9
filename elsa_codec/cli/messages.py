"""What the ``elsa`` command prints of a file or an error: terminal-safe text, CLI hints.

A safetensors file may name its tensors with any UTF-8 string, so a name read from a file can
hold a newline, an ANSI escape sequence or a bidirectional override that would forge the table
``elsa inspect`` prints (or a line of ``elsa verify``). :func:`safe_text` escapes such characters
the way ``repr`` does (``\\x1b``, ``\\n``, ``\\u202e``) and keeps every printable name unchanged.

The library's messages speak of the Python API (``pass names=``, ``code_bits=9``);
:func:`cli_message` says the ``elsa`` option instead (``--counters``, ``--code-bits 9``), and
adds ``--dtype float32`` where a float64 checkpoint cannot be encoded as it is.
"""
from __future__ import annotations

import re

__all__ = ["safe_text", "safe_lines", "one_line", "cli_message"]

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    o = ord(ch)
    return f"\\x{o:02x}" if o <= 0xFF else (f"\\u{o:04x}" if o <= 0xFFFF else f"\\U{o:08x}")


def safe_text(text) -> str:
    """``text`` with every non-printable character escaped as ``repr`` writes it: C0 controls
    and DEL (``\\x1b``, ``\\n``), C1 controls (``\\x9b``), line and paragraph separators
    (``\\u2028``), bidirectional overrides and other format characters (``\\u202e``), non-ASCII
    spaces. Printable text (any script, the ASCII space, backslashes) is unchanged."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def safe_lines(text) -> str:
    """Multi-line ``text`` (a table) with each line through :func:`safe_text`: its own line
    breaks stay, any other control character is escaped."""
    return "\n".join(safe_text(line) for line in str(text).split("\n"))


_WHITESPACE = re.compile(r"[ \t\n\r\f\v]+")


def one_line(message) -> str:
    """An error or a problem as one terminal-safe line: runs of ASCII whitespace (newlines
    included) become one space, then :func:`safe_text` escapes what is left."""
    return safe_text(_WHITESPACE.sub(" ", str(message)).strip())


_NAMES_HINT = {
    "encode": "--levels encodes those only: to encode other tensors, give a counters file naming them "
              "with --counters (elsa_codec.save_counters)",
    "convert": "pass --select all to give every weight levels",
}

#: (pattern, replacement): the API's spelling of an argument -> the ``elsa`` option.
_OPTIONS = [
    (re.compile(r"\bsave_file: (?=max_shard_size)"), ""),
    (re.compile(r"\bmax_shard_size="), "--max-shard-size "),
    (re.compile(r"\bmax_shard_size must"), "--max-shard-size must"),
    (re.compile(r"\bcode_bits=(\d+)"), r"--code-bits \1"),
    (re.compile(r"\bcode_bits must"), "--code-bits must"),
    (re.compile(r"^jobs must"), "--jobs must"),
    (re.compile(r"\(levels=\[([^\]]*)\]\), not as structure="), lambda m: f"(--levels {_csv(m.group(1))}), not as --structure"),
]


def _csv(items: str) -> str:
    """A Python list's items (``'1:4', '2:4'``) as an option value (``1:4,2:4``)."""
    return ",".join(p.strip().strip("'\"") for p in items.split(","))

_FLOAT64 = re.compile(r"unsupported dtype torch\.float64\b")


def cli_message(message, command: str | None) -> str:
    """``message`` (an error of the library) as the ``elsa`` command says it: API arguments
    named as the command's options; for ``encode`` / ``convert`` a float64 tensor gets the hint
    ``--dtype float32``. The result is :func:`one_line`."""
    text = one_line(message)
    if command not in ("encode", "convert"):
        return text
    text = re.sub(r"\bpass names=", _NAMES_HINT[command], text)
    for pattern, repl in _OPTIONS:
        text = pattern.sub(repl, text)
    if _FLOAT64.search(text) and "--dtype" not in text:
        text += "; pass --dtype float32 (or float16, bfloat16) to convert the floating tensors first"
    return text
