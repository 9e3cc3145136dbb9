"""Shared checks for the ELSA kernels (private).

Terms follow docs/DESIGN.md and ELSA (Halvachi et al., arXiv 2312.06872, section 2.2): level ``t`` in
``1..T`` (``1`` the sparsest), ``T+1`` the dense level; code ``c = N - 1`` in the ``k`` low bits of
each weight's IEEE-754 bit pattern; level ``t`` keeps the weights with ``c < t``.

Nothing here initialises CUDA: :func:`kernels_available` only asks ``torch.cuda.is_available()``
(which does not create a context) when it is given a CUDA device.
"""
from __future__ import annotations

import numbers
import os

import torch

from elsa_codec.errors import ELSAError
from elsa_codec.format.bits import MAX_CODE_BITS, check_code_bits

#: True when the Triton interpreter runs the kernels on the CPU (``TRITON_INTERPRET=1``, read once
#: at import time, which is when the ``@triton.jit`` decorators take effect).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

#: Integer dtype of the same width as each supported float dtype (the kernels move bit patterns).
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}

#: Largest offset (in elements) that 32-bit index arithmetic may reach safely.
INT32_LIMIT = 2**31 - 1


def kernels_available(device=None) -> bool:
    """Whether the Triton kernels can run for tensors on ``device``.

    ``True`` for a CUDA device when CUDA is available, and for any device when the Triton
    interpreter is on (``TRITON_INTERPRET=1`` set before ``elsa_codec.kernels.triton`` was imported).
    Otherwise (plain CPU) ``False``: the public ops then run their pure-PyTorch reference.
    ``device`` may be a ``torch.device``, a string, an int (CUDA index) or ``None`` (CUDA, i.e. "is
    there a GPU for the kernels"). Never initialises a CUDA context.
    """
    if INTERPRET:
        return True
    if device is None:
        device = torch.device("cuda")
    elif isinstance(device, int):
        device = torch.device("cuda", device)
    else:
        device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available()


def check_tensor(t, name: str) -> torch.Tensor:
    """``t`` is a float32/float16/bfloat16 tensor (else ELSAError naming ``name``)."""
    if not isinstance(t, torch.Tensor):
        raise ELSAError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in MAX_CODE_BITS:
        raise ELSAError(f"{name}: unsupported dtype {t.dtype}; expected float32, float16 or bfloat16")
    return t


def check_level(level, code_bits: int, num_levels: int | None = None, name: str = "encoded") -> int:
    """Resolve ``level`` to an int ``t`` and check its range; ``code_bits`` must already be valid.

    Without ``num_levels`` the range is ``1..2**k`` (``2**k`` keeps every weight: the dense level of
    the largest ``T`` that ``k`` bits hold). With ``num_levels = T`` it is ``1..T+1`` and the alias
    ``"dense"`` means ``T+1``.

    Raises:
        ELSAError: ``level`` not an int (bool excluded) nor ``"dense"``, or out of range.
    """
    top = (1 << code_bits) if num_levels is None else num_levels + 1
    if isinstance(level, str):
        if level != "dense":
            raise ELSAError(f"{name}: level must be an int in 1..{top} or 'dense', got {level!r}")
        if num_levels is None:
            raise ELSAError(f"{name}: level 'dense' needs num_levels (the number of sparse levels T)")
        return top
    if isinstance(level, bool) or not isinstance(level, numbers.Integral):
        raise ELSAError(f"{name}: level must be an int in 1..{top}, got {level!r} ({type(level).__name__})")
    level = int(level)
    if not 1 <= level <= top:
        raise ELSAError(f"{name}: level {level} is out of range 1..{top} (code_bits={code_bits}"
                        + (f", T={num_levels}" if num_levels is not None else "") + ")")
    return level


def check_codec_args(encoded, level, code_bits, num_levels, name: str = "encoded") -> tuple[int, bool]:
    """Check ``encoded``'s dtype, ``code_bits`` (and ``num_levels``) and ``level``.

    Returns:
        ``(t, dense)``: the level as an int and whether it keeps every weight (``t == T+1``, or
        ``t == 2**k`` without ``num_levels``).
    """
    check_tensor(encoded, name)
    if num_levels is not None and (isinstance(num_levels, bool) or not isinstance(num_levels, numbers.Integral)
                                   or num_levels < 1):
        raise ELSAError(f"{name}: num_levels must be a positive int, got {num_levels!r}")
    check_code_bits(encoded.dtype, code_bits, None if num_levels is None else int(num_levels), name=name)
    t = check_level(level, code_bits, None if num_levels is None else int(num_levels), name=name)
    top = (1 << code_bits) if num_levels is None else int(num_levels) + 1
    return t, t >= top


def needs_autograd(*tensors) -> bool:
    """Whether autograd must record a call on ``tensors`` (grad mode on and one requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def device_guard(t: torch.Tensor):
    """Context manager making ``t``'s CUDA device current (Triton launches on the current device)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    import contextlib

    return contextlib.nullcontext()
