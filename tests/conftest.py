"""Shared pytest set-up.

Without a GPU the Triton kernels run under the Triton interpreter: ``TRITON_INTERPRET=1`` must be
set before ``elsa_codec.kernels.triton`` is imported (that is when its ``@triton.jit`` decorators run), so
it is set here, at conftest import time, before any test module is collected (docs/DESIGN.md,
"Environment facts"). With CUDA present the same tests run the compiled kernels.

``ELSA_TEST_DEVICE=cuda`` (set by bench/gpu_check.sh) insists on CUDA: without a visible GPU the
run stops at once instead of silently passing on the interpreter. ``ELSA_TEST_DEVICE=interpreter``
forces the interpreter even with a GPU present.

Machines without ``hypothesis`` (a GPU machine's preinstalled environment, say) still collect
every test module: a stand-in module makes each ``@given`` test skip with the reason.

Tests marked ``@pytest.mark.isolated`` (every test that calls ``torch.compile``) run in a child
process of their own; see "process isolation" at the end of this file.
"""
import os
import sys

import torch

# The sparse-cpu planner measures formats against dense on first use; the suite uses its documented
# cost model instead (deterministic routes, no timing). tests/kernels/test_cpu_planner.py turns
# measuring back on where it tests it.
os.environ.setdefault("ELSA_CPU_CALIBRATE", "0")

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


# ----------------------------------------------------------------------------- process isolation
# Tests marked ``isolated`` run in a fresh Python process of their own: every test that calls
# torch.compile. Dynamo keeps compiled code, guards and caches for the life of the process, and
# ``torch._dynamo.reset()`` frees them while other objects may still refer to them (pytorch#155057,
# "Segfault after clearing Dynamo Cache"; PyTorch's own suite isolates such tests, pytorch#168925).
# In one long pytest process that state crashed the interpreter now and then (CI at 712eb07:
# SIGSEGV in test_kernels_linear's compile test; a clean-clone run at 629ceb4: SIGSEGV in
# test_kernels_decode's, after ~880 passing tests; never in a test run on its own). The child runs
# exactly this node id, with this process's environment, and its outcome is reported here.
_CHILD_ENV = "ELSA_TEST_ISOLATED_CHILD"


def pytest_configure(config):
    config.addinivalue_line("markers", "isolated: run this test in its own Python process (torch.compile)")


def _child_outcome(item) -> tuple[str, object, float]:
    """``(outcome, longrepr, seconds)`` of ``item`` run by a child pytest."""
    import subprocess
    import time

    env = dict(os.environ, **{_CHILD_ENV: "1"})
    cmd = [sys.executable, "-X", "faulthandler", "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", item.nodeid]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=str(item.config.rootpath), env=env, capture_output=True, text=True, timeout=1200)
    dt = time.perf_counter() - t0
    out = res.stdout + res.stderr
    if res.returncode == 0 and " skipped" in out and " passed" not in out:
        reason = next((ln.split(": ", 1)[-1] for ln in out.splitlines() if ln.startswith("SKIPPED")), "skipped")
        return "skipped", (str(item.path), item.location[1] + 1, f"Skipped: {reason}"), dt
    if res.returncode == 0:
        return "passed", None, dt
    how = f"signal {-res.returncode}" if res.returncode < 0 else f"exit status {res.returncode}"
    return "failed", f"isolated child process ({' '.join(cmd)}) ended with {how}:\n{out[-20000:]}", dt


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    """Run an ``isolated`` item in a child process (none of its fixtures run here)."""
    if item.get_closest_marker("isolated") is None or os.environ.get(_CHILD_ENV):
        return None
    from _pytest.reports import TestReport

    ihook = item.ihook
    ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    outcome, longrepr, dt = _child_outcome(item)
    if outcome == "skipped":  # as pytest reports a skip: in the setup phase, then teardown
        phases = [("setup", "skipped", longrepr), ("teardown", "passed", None)]
    else:
        phases = [("setup", "passed", None), ("call", outcome, longrepr), ("teardown", "passed", None)]
    for when, rep_outcome, rep_longrepr in phases:
        rep = TestReport(item.nodeid, item.location, {k: 1 for k in item.keywords}, rep_outcome, rep_longrepr, when,
                         duration=dt if when == "call" else 0.0)
        ihook.pytest_runtest_logreport(report=rep)
    ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


@pytest.fixture
def measuring(monkeypatch, tmp_path):
    """The CPU planner measuring (the suite otherwise uses its cost model), its plans file in
    tmp_path, none in memory: ``tmp_path / "plans.json"``."""
    from elsa_codec.kernels.cpu import planner, plans

    monkeypatch.setenv(planner.ENV, "1")
    path = tmp_path / "plans.json"
    monkeypatch.setattr(plans, "_plans_path", lambda: str(path))
    plans.clear_plans(disk=False)
    yield path
    plans.clear_plans(disk=False)
