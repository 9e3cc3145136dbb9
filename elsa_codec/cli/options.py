"""Option values shared by the ``elsa`` commands: ``--levels`` and ``--dtype``."""
from __future__ import annotations

import torch

from ..errors import ELSAError

__all__ = ["DTYPES", "levels_arg"]

#: ``--dtype`` choices.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def levels_arg(text: str) -> list:
    """``--levels`` (``"0.9,0.75,0.5"`` or ``"1:4,2:4"``) as a list, sparsest first.

    Raises:
        ELSAError: a part that is neither a number nor N:M; no level.
    """
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(part if ":" in part else float(part))
        except ValueError:
            raise ELSAError(f"--levels: {part!r} is neither a sparsity in (0, 1) nor an N:M pattern such as '2:4'") from None
    if not out:
        raise ELSAError(f"--levels {text!r} lists no level; e.g. --levels 0.9,0.75,0.5")
    return out
