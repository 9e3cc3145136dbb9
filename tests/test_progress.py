"""elsa_codec.progress: a tqdm bar on a terminal; off it, one summary line per bar on stderr and no
carriage returns (CI logs, ``| tee``); nothing when progress is off."""
import io
import sys

import pytest
import torch
from tqdm.std import tqdm as std_tqdm

import elsa_codec as ec
from elsa_codec.progress import LineProgress, progress_bar


class _FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_off_a_terminal_one_line_no_carriage_return(capsys):
    assert not sys.stderr.isatty()
    bar = progress_bar(total=100, desc="encode", unit="tensor")
    assert isinstance(bar, LineProgress)
    for _ in range(100):
        bar.update()
    assert capsys.readouterr().err == ""  # nothing until it closes
    bar.close()
    bar.close()  # closing twice writes once
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.count("\n") == 1 and err.endswith("\n")
    assert err.startswith("encode: 100 tensors in ") and err.rstrip().endswith(" s")


def test_iterable_and_context_manager_forms(capsys):
    assert list(progress_bar(range(42), desc="encode", unit="tensor")) == list(range(42))
    with progress_bar(total=3, desc="train", unit="step") as bar:
        bar.update(2)
        bar.set_postfix(loss=0.5)
    with progress_bar(total=1, desc="one", unit="shard") as bar:
        bar.update()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("encode: 42 tensors in ")
    assert lines[1].startswith("train: 2/3 steps in ") and lines[1].endswith(", loss=0.5")
    assert lines[2].startswith("one: 1 shard in ")


def test_broken_loop_still_writes_its_line(capsys):
    def run():
        for i in progress_bar(range(10), desc="levels", unit="level"):
            if i == 4:
                raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        run()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("levels: 4/10 levels in ")


def test_disabled_writes_nothing(capsys, monkeypatch):
    for _ in range(2):
        bar = progress_bar(total=100, desc="encode", enabled=False)
        for _ in range(100):
            bar.update()
        bar.close()
        assert list(progress_bar(range(5), desc="encode", enabled=False)) == list(range(5))
        assert capsys.readouterr().err == ""
        monkeypatch.setattr(sys, "stderr", _FakeTTY())  # and on a terminal
    assert sys.stderr.getvalue() == ""


def test_fake_tty_gives_the_tqdm_bar(monkeypatch):
    fake = _FakeTTY()
    monkeypatch.setattr(sys, "stderr", fake)
    bar = progress_bar(total=100, desc="encode", unit="tensor", leave=False)
    assert isinstance(bar, std_tqdm)
    assert (bar.total, bar.desc, bar.unit, bar.leave) == (100, "encode", "tensor", False)
    for _ in range(100):
        bar.update()
    bar.close()
    assert "\r" in fake.getvalue() and "encode" in fake.getvalue()
    it = progress_bar(range(3), desc="x")
    assert isinstance(it, std_tqdm) and list(it) == [0, 1, 2]


def test_jupyter_stream_gives_the_tqdm_bar(monkeypatch):
    stream = type("OutStream", (io.StringIO,), {"__module__": "ipykernel.iostream"})()
    monkeypatch.setattr(sys, "stderr", stream)
    bar = progress_bar(total=2, desc="encode")
    assert isinstance(bar, std_tqdm)
    bar.close()


def test_encode_progress_off_a_terminal(capsys):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    sd = model.state_dict()
    ec.encode(sd, ec.magnitude_counters(sd, [0.5]), progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err and err.count("\n") == 1
    assert err.startswith(f"encode: {len(sd)} tensors in ")
    ec.encode(sd, ec.magnitude_counters(sd, [0.5]), progress=False)
    assert capsys.readouterr().err == ""
