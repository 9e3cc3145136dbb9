"""Shared pytest set-up.

Without a GPU the Triton kernels run under the Triton interpreter: ``TRITON_INTERPRET=1`` must be
set before ``elsa_codec.kernels`` is imported (that is when its ``@triton.jit`` decorators run), so
it is set here, at conftest import time, before any test module is collected (DESIGN.md,
"Environment facts"). With CUDA present the same tests run the compiled kernels.

``ELSA_TEST_DEVICE=cuda`` (set by bench/gpu_check.sh) insists on CUDA: without a visible GPU the
run stops at once instead of silently passing on the interpreter. ``ELSA_TEST_DEVICE=interpreter``
forces the interpreter even with a GPU present.

Machines without ``hypothesis`` (a GPU machine's preinstalled environment, say) still collect
every test module: a stand-in module makes each ``@given`` test skip with the reason.
"""
import os
import sys

import torch

_WANT = os.environ.get("ELSA_TEST_DEVICE", "").strip().lower()
if _WANT not in ("", "cuda", "interpreter"):
    raise RuntimeError(f"ELSA_TEST_DEVICE={_WANT!r}: expected 'cuda' or 'interpreter'")
if _WANT == "cuda":
    if not torch.cuda.is_available():
        raise RuntimeError("ELSA_TEST_DEVICE=cuda but torch.cuda.is_available() is False: refusing to run the "
                           "kernel tests on the Triton interpreter instead")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("ELSA_TEST_DEVICE=cuda but TRITON_INTERPRET is set: unset it to test the compiled kernels")
elif _WANT == "interpreter" or not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

HYPOTHESIS_MISSING = "hypothesis is not installed here: property-based test skipped"


class _Anything:
    """Stands for any hypothesis strategy / setting: every attribute and call gives itself."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self

    def __call__(self, *args, **kwargs):
        return self

    def __iter__(self):
        return iter(())


def _hypothesis_stub():
    """A ``hypothesis`` stand-in: ``@given`` marks the test skipped (reason
    :data:`HYPOTHESIS_MISSING`), ``@settings(...)`` / ``@example(...)`` leave it as it is, and
    strategies are inert placeholders."""
    import types

    def given(*args, **kwargs):
        def mark(fn):
            return pytest.mark.skip(reason=HYPOTHESIS_MISSING)(fn)
        return mark

    def passthrough(*args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return lambda fn: fn

    import importlib.machinery

    mod = types.ModuleType("hypothesis")
    mod.__spec__ = importlib.machinery.ModuleSpec("hypothesis", None)
    mod.__dict__.update(given=given, settings=passthrough, example=passthrough, assume=lambda *a, **k: True,
                        note=lambda *a, **k: None, is_hypothesis_test=lambda fn: False, HealthCheck=_Anything(),
                        Verbosity=_Anything(), Phase=_Anything())
    strategies = types.ModuleType("hypothesis.strategies")
    strategies.__spec__ = importlib.machinery.ModuleSpec("hypothesis.strategies", None)
    def any_strategy(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything()

    strategies.__getattr__ = any_strategy
    strategies.composite = lambda fn: (lambda *a, **k: _Anything())
    mod.strategies = strategies
    return mod, strategies


try:
    import hypothesis  # noqa: F401
except ImportError:
    sys.modules["hypothesis"], sys.modules["hypothesis.strategies"] = _hypothesis_stub()

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
