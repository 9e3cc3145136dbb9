"""Shared pytest set-up.

Without a GPU the Triton kernels run under the Triton interpreter: ``TRITON_INTERPRET=1`` must be
set before ``elsa_codec.kernels`` is imported (that is when its ``@triton.jit`` decorators run), so
it is set here, at conftest import time, before any test module is collected (DESIGN.md,
"Environment facts"). With CUDA present the same tests run the compiled kernels.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

_INT_POISON = {
    torch.uint8: 0xFF,
    torch.int8: -1,
    torch.int16: -1,
    torch.int32: -1,
    torch.int64: -1,
}


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))
    elif t.dtype in _INT_POISON:
        t.fill_(_INT_POISON[t.dtype])
    return t


@pytest.fixture
def poison_empty(monkeypatch):
    """Make ``torch.empty`` / ``torch.empty_like`` return NaN-filled tensors (all-ones bits for
    integer dtypes), so an output element a kernel forgets to write fails the comparison.

    Request it explicitly, e.g. ``pytestmark = pytest.mark.usefixtures("poison_empty")``.
    """
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        return _poison(real_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return _poison(real_empty_like(*args, **kwargs))

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    yield
