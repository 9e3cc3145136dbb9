"""``elsa compare --quick``: every method as ELSA levels and separate networks, outputs written."""
import csv

import pytest
import torch

from elsa_codec import cli
from elsa_codec.examples.digits.compare import DEFAULT_METHODS, METHODS, PIPELINE_METHODS, make_sparsifier

pytest.importorskip("sklearn")


def test_compare_quick_every_method(tmp_path):
    out = tmp_path / "cmp"
    assert cli.main(["compare", "--quick", "--models", "mlp", "--levels", "0.9,0.5", "--jobs", "1",
                     "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "results.csv", encoding="utf-8")))
    acc = [r for r in rows if r["metric"] == "accuracy"]
    assert {r["method"] for r in acc} == set(DEFAULT_METHODS) | {"dense"}
    for m in DEFAULT_METHODS:
        for kind in ("ELSA", "separate"):
            got = sorted(round(float(r["sparsity"]), 3) for r in acc if r["method"] == m and r["kind"] == kind)
            assert got == [0.5, 0.9], (m, kind, got)  # exact targets for every method
    table = (out / "table.md").read_text()
    assert "time vs magnitude" in table and "| l0 |" in table and "## mlp" in table and "Early-bird tickets:" in table
    assert {r["metric"] for r in rows} == {"accuracy", "seconds", "drawn_at"}
    assert (out / "accuracy_vs_sparsity.png").stat().st_size > 0
    tiny = torch.tensor([1e-40])  # a denormal float32: the in-process job put flushing back off
    assert float(tiny * 1.0) != 0.0


@pytest.mark.parametrize("argv,match", [(["--methods", "magnitude,foo"], "unknown method"),
                                        (["--models", "resnet"], "unknown model"),
                                        (["--levels", "0.5,0.9"], "sparsest first")],
                         ids=["method", "model", "levels"])
def test_compare_bad_arguments(argv, match, tmp_path, capsys):
    assert cli.main(["compare", "--quick", "--jobs", "1", "--out", str(tmp_path / "o")] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err
    assert not (tmp_path / "o").exists()


def test_every_method_builds_with_a_seed():
    for m in METHODS:
        assert repr(make_sparsifier(m, 3))
    assert repr(make_sparsifier("random-erk", 3)) == "RandomSparsifier('erk', seed=3)"


def test_compare_pipeline_quick(tmp_path):
    """``elsa compare --pipeline --quick``: GMP, the pipeline and its ablation at the extreme levels,
    a ZerO dense network beside the default one, the ablation table."""
    out = tmp_path / "pipe"
    assert cli.main(["compare", "--pipeline", "--quick", "--models", "mlp", "--jobs", "1", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "results.csv", encoding="utf-8")))
    acc = [r for r in rows if r["metric"] == "accuracy"]
    assert {r["method"] for r in acc} == set(PIPELINE_METHODS) | {"dense", "dense-zero"}
    for m in PIPELINE_METHODS:
        for kind in ("ELSA", "separate"):
            got = sorted(round(float(r["sparsity"]), 3) for r in acc if r["method"] == m and r["kind"] == kind)
            assert got == [0.9, 0.97, 0.99, 0.997], (m, kind, got)
    table = (out / "table.md").read_text()
    assert "| 99.7% | 99% | 97% | 90% |" in table and "ZerO-initialised dense network" in table
    assert "Change against the full pipeline" in table and "| soft-skip |" in table and "| every stage (GMP) |" in table
    assert (out / "accuracy_vs_sparsity.png").stat().st_size > 0
