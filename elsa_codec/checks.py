"""Argument checks at the public boundary: a clear error before any work.

Every public function calls these first. A check names the argument, says what was given and
what is expected, and for a likely mistake (arguments swapped, a model where a state dict is
expected, one string where a list is expected) says so. Type errors raise
:class:`~elsa_codec.errors.ELSATypeError` (both an ``ELSAError`` and a ``TypeError``).
"""
from __future__ import annotations

import os
import stat
from collections.abc import Mapping

import torch

from .errors import ELSAError, ELSATypeError

__all__ = ["check_path", "check_state_dict", "check_list", "check_module", "check_encoded", "check_shard_size", "check_out_path", "check_not_input", "check_not_meta",
           "check_target", "file_kind"]


def _kind(x) -> str:
    if isinstance(x, torch.nn.Module):
        return f"a model ({type(x).__name__})"
    if isinstance(x, torch.Tensor):
        return f"a tensor {tuple(x.shape)}"
    if isinstance(x, str):
        return f"the string {x!r}" if len(x) < 80 else f"a string of {len(x)} characters"
    return f"a {type(x).__name__}"


def check_path(arg, name: str, fn: str, *, order: str = "") -> str:
    """``arg`` as a ``str`` path; ELSATypeError if it is not a path (``order``: the call's
    documented argument order, quoted when a model or a state dict sits where the path goes)."""
    if isinstance(arg, (str, os.PathLike)):
        p = os.fspath(arg)
        if isinstance(p, bytes):
            p = os.fsdecode(p)
        if not p:
            raise ELSAError(f"{fn}: {name} is an empty path")
        return p
    hint = ""
    if order and isinstance(arg, (torch.nn.Module, Mapping)):
        hint = f"; the arguments look swapped: the order is {order}"
    raise ELSATypeError(f"{fn}: {name} must be a path (str or os.PathLike), got {_kind(arg)}{hint}")


def check_module(arg, name: str, fn: str, *, order: str = "") -> torch.nn.Module:
    """``arg`` must be an ``nn.Module``; a path there means swapped arguments."""
    if isinstance(arg, torch.nn.Module):
        return arg
    hint = ""
    if order and isinstance(arg, (str, os.PathLike, Mapping)):
        hint = f"; the arguments look swapped: the order is {order}"
    raise ELSATypeError(f"{fn}: {name} must be a torch.nn.Module, got {_kind(arg)}{hint}")


def check_state_dict(arg, name: str, fn: str) -> Mapping:
    """``arg`` must be a mapping of names to tensors holding data (a model is refused with the fix).

    Raises:
        ELSATypeError: not a mapping (a model: pass ``model.state_dict()``), a key not a string,
            a value not a tensor.
        ELSAError: a meta tensor (:func:`check_not_meta`).
    """
    if isinstance(arg, torch.nn.Module):
        raise ELSATypeError(f"{fn}: {name} must be a state dict (name -> tensor), got {_kind(arg)}; pass {name}=model.state_dict()")
    if not isinstance(arg, Mapping):
        raise ELSATypeError(f"{fn}: {name} must be a mapping of tensor names to tensors, got {_kind(arg)}")
    for k, v in arg.items():
        if not isinstance(k, str):
            raise ELSATypeError(f"{fn}: {name} has a key {k!r} of type {type(k).__name__}; tensor names are strings")
        if not isinstance(v, torch.Tensor):
            raise ELSATypeError(f"{fn}: {name}[{k!r}] is {_kind(v)}, expected a torch.Tensor")
    check_not_meta(arg, name, fn)
    return arg


def check_not_meta(tensors: Mapping, name: str, fn: str, *, fix: str = "") -> None:
    """No tensor of ``tensors`` (``name -> value``; non-tensors are skipped) is on the meta device.

    ``fix``: what to do instead (default: materialise the weights).

    Raises:
        ELSAError: names the first meta tensor; meta tensors hold no data.
    """
    for k, v in tensors.items():
        if isinstance(v, torch.Tensor) and v.is_meta:
            how = fix or ("materialise the weights first: model.to_empty(device='cpu') and load the checkpoint "
                          "into it, or load the checkpoint's state dict (safetensors.torch.load_file)")
            raise ELSAError(f"{fn}: {name}[{k!r}] is a meta tensor (device='meta'): meta tensors hold no data; {how}")


def check_encoded(arg, name: str, fn: str):
    """``arg`` must be an :class:`~elsa_codec.format.encode.ELSAStateDict` (a mapping with ``.meta``)."""
    if isinstance(arg, Mapping) and getattr(arg, "meta", None) is not None:
        return arg
    what = "a plain mapping (no ELSA metadata)" if isinstance(arg, Mapping) else _kind(arg)
    if type(arg).__name__ == "Counters":
        what = "Counters: encode them first, encoded = elsa_codec.encode(state_dict, counters)"
    raise ELSATypeError(f"{fn}: {name} must be an ELSAStateDict (from encode or load_file), got {what}")


def check_list(arg, name: str, fn: str, example: str) -> list:
    """``arg`` as a list; a single string is refused (it would be read character by character)."""
    if isinstance(arg, (str, bytes)):
        raise ELSATypeError(f"{fn}: {name} must be a list, got {_kind(arg)}; pass a list, e.g. {name}={example}")
    if isinstance(arg, (Mapping, torch.Tensor)) or not hasattr(arg, "__iter__"):
        raise ELSATypeError(f"{fn}: {name} must be a list, got {_kind(arg)}; e.g. {name}={example}")
    return list(arg)


def check_removed(fn: str, given: Mapping, removed: Mapping) -> None:
    """Refuse the keywords of ``given`` (a ``**kwargs``): a removed one names its replacement
    (``removed``: keyword -> replacement), any other is unknown.

    Raises:
        ELSATypeError: the first such keyword.
    """
    for kw in given:
        if kw in removed:
            raise ELSATypeError(f"{fn}: the keyword {kw}= was removed in 0.2 (CHANGELOG.md): use {removed[kw]}")
        raise ELSATypeError(f"{fn}() got an unexpected keyword argument {kw!r}")


def check_shard_size(arg) -> int | None:
    """``max_shard_size``: None, a positive int of bytes, or a string such as ``"2GB"``."""
    import re

    if arg is None:
        return None
    if isinstance(arg, bool) or not isinstance(arg, (int, str)):
        raise ELSATypeError(f"save_file: max_shard_size must be a number of bytes or a string such as '2GB', got {_kind(arg)}")
    if isinstance(arg, int):
        n = arg
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)(i?)B?\s*", arg, re.I)
        if not m:
            raise ELSAError(f"save_file: max_shard_size={arg!r} is not a size: expected bytes or e.g. '2GB', '500MB', '1GiB'")
        base = 1024 if m.group(3) else 1000
        n = int(float(m.group(1)) * base ** " KMG".index(m.group(2).upper() or " "))
    if n < 1:
        raise ELSAError(f"save_file: max_shard_size must be at least 1 byte, got {arg!r}")
    return n




def check_out_path(path: str, *, what: str = "output", inputs=()) -> str:
    """Check an output path before any work: not a directory, its folder exists and is writable,
    its name fits the file system (and the temporary name beside it), not one of ``inputs``.

    Raises:
        ELSAError: naming the path and the problem.
    """
    path = os.fspath(path)
    if not path:
        raise ELSAError(f"{what}: empty path")
    check_target(path, what=what)
    if path.endswith(os.sep) or (os.path.isdir(path) and not os.path.islink(path)):
        raise ELSAError(f"{what} {path!r} is a directory; give a file name, e.g. {os.path.join(path, 'model.safetensors')!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        what_is = "is not a directory" if os.path.exists(folder) else "does not exist"
        raise ELSAError(f"{what} {path!r}: the folder {folder!r} {what_is} (create it first)")
    try:  # the real test (also for root, read-only mounts, /proc): make and remove a file there
        import tempfile

        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ELSAError(f"{what} {path!r}: cannot write in the folder {folder!r} ({e.strerror or e})") from None
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    name = os.path.basename(path)
    if len(name.encode("utf-8", "surrogateescape")) > limit:
        raise ELSAError(f"{what} {path!r}: the file name is {len(name.encode())} bytes long, the file system allows {limit}")
    check_not_input(path, inputs, what=what)
    return path


def check_not_input(path: str, inputs=(), *, what: str = "output") -> None:
    """``path`` must not be (a link to) one of ``inputs``: a write never replaces its own input.

    Raises:
        ELSAError: naming the path.
    """
    for p in inputs:
        if p and os.path.exists(p) and os.path.exists(path) and os.path.samefile(p, path):
            raise ELSAError(f"{what} {path!r} is the input file: refusing to overwrite it")


def file_kind(mode: int) -> str | None:
    """What a non-regular file of this ``st_mode`` is (None for a regular file or a symlink)."""
    if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
        return None
    return ("a directory" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a special file")


def check_target(path: str, *, what: str = "output") -> None:
    """An output target must be absent, a regular file, or a symlink (the link itself is replaced
    by the new file, never followed). Every write calls this before any work.

    Raises:
        ELSAError: ``path`` is a directory, FIFO, device, socket or other special file (named,
            with what it is). An absent or unexaminable path passes (the write reports its own error).
    """
    try:
        st = os.lstat(path)
    except OSError:
        return  # absent, or unreadable (a name too long, a folder without access): the write itself reports it
    kind = file_kind(st.st_mode)
    if kind is not None:
        raise ELSAError(f"{what} {path!r} is {kind}: an output is written as a new regular file that replaces the "
                        f"target, and {kind} is never replaced; give the path of a regular file")
