"""`elsa demo --quick` runs end to end (accuracies are not meaningful in quick mode)."""
import json

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from elsa_codec.examples.digits.demo import main  # noqa: E402


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["--quick", "--out", str(out), "--no-progress", "--threads", "1"])
    assert rc == 0
    text = capsys.readouterr().out
    for needle in ("ELSA acc %", "separate GMP network", "dense network before ELSA", "file sizes", "goals", "level 1 (90%)"):
        assert needle in text
    assert (out / "accuracy_vs_sparsity.png").stat().st_size > 1000
    res = json.loads((out / "results.json").read_text())
    run = res["runs"][0]
    assert len(run["acc_elsa"]) == 3 and len(run["acc_gmp"]) == 3
    assert run["sparsity"] == pytest.approx([0.9, 0.75, 0.5], abs=0.01)
    assert run["size_elsa"] < run["size_gmp_files"]
    assert (out / "elsa-seed0.safetensors").exists()


def test_demo_help_and_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "--seeds" in capsys.readouterr().out
    rc = main(["--quick", "--out", str(tmp_path), "--levels", "0.5,0.9", "--no-progress"])
    assert rc == 2
    assert "sparsest first" in capsys.readouterr().err


def test_demo_distillation_options(tmp_path, capsys):
    rc = main(["--quick", "--out", str(tmp_path), "--distill-weight", "-1", "--no-progress"])
    assert rc == 2 and "DistillConfig.weight" in capsys.readouterr().err
    rc = main(["--quick", "--out", str(tmp_path), "--distill-weight", "0", "--final-steps", "3", "--no-progress"])
    assert rc == 0
    run = json.loads((tmp_path / "results.json").read_text())["runs"][0]
    assert run["history"][-1]["steps"] == 3
    assert "goal >= -0.1" in capsys.readouterr().out
