"""tests/conftest.py's process isolation: a test marked ``isolated`` runs in a child process of its
own, its outcome (pass, fail, skip) is reported by the parent, and a crash in it fails that test
only instead of ending the whole run (the reason for it: the conftest's "process isolation")."""
import os
import shutil
import subprocess
import sys

CONFTEST = os.path.join(os.path.dirname(__file__), "conftest.py")

TESTS = '''
import os
import signal

import pytest

PARENT = os.environ.get("PARENT_PID")


@pytest.mark.isolated
def test_runs_in_a_child():
    assert str(os.getppid()) == PARENT and str(os.getpid()) != PARENT
    assert os.environ["ELSA_TEST_ISOLATED_CHILD"] == "1"


@pytest.mark.isolated
def test_fails_in_a_child():
    assert 1 + 1 == 3, "wrong sum"


@pytest.mark.isolated
def test_skips_in_a_child():
    pytest.skip("no reason to run")


@pytest.mark.isolated
def test_crashes_in_a_child():
    os.kill(os.getpid(), signal.SIGSEGV)


def test_in_the_parent():
    assert str(os.getpid()) == PARENT
'''


def test_isolated_outcomes_reported_and_a_crash_fails_one_test(tmp_path):
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_iso.py").write_text(TESTS)
    env = {k: v for k, v in os.environ.items() if k != "ELSA_TEST_ISOLATED_CHILD"}
    code = ("import os, sys, pytest; os.environ['PARENT_PID'] = str(os.getpid()); "
            "sys.exit(pytest.main(['-q', '-rs', '-p', 'no:cacheprovider', 'test_iso.py']))")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out  # tests failed; the run itself finished
    assert "2 failed, 2 passed, 1 skipped" in out, out
    assert "wrong sum" in out and "ended with exit status 1" in out
    assert "ended with signal 11" in out  # the crash fails its own test, with its trace
    assert "Fatal Python error: Segmentation fault" in out
    assert "no reason to run" in out
