"""The churn study's smoke mode (benchmarks/science/churn_study.py --smoke): a few steps of every method on digits and
on a few BBC News articles, one retraining pair, a tiny batch sweep and comparison, then the JSON, plots and README
block it writes."""

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import REPO, clean_env

pytestmark = pytest.mark.slow

STUDY = REPO / "benchmarks" / "science" / "churn_study.py"
METHODS = {"single", "codistill", "independent"}


def _fraction(cell):
    return cell["mean"] is not None and 0 <= cell["mean"] <= 1


def test_churn_study_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(STUDY), "--smoke", "--out", str(tmp_path)],
                          env=clean_env(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"), cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]

    churn = json.loads((tmp_path / "results" / "churn" / "summary.json").read_text())
    assert set(churn) == {"vit", "bbc"}
    for rows in churn.values():
        assert set(rows) == METHODS
        for method, row in rows.items():
            assert _fraction(row["churn_model0"]) and _fraction(row["accuracy_model0"])
            assert math.isfinite(row["accuracy_model0"]["mean"])
            pair = method != "single"
            assert row["models"] == (2 if pair else 1) and row["model_steps"] == row["steps"] * row["models"]
            if pair:
                assert _fraction(row["churn_ensemble"]) and _fraction(row["churn_model1"])
                assert _fraction(row["ensemble_accuracy"]) and _fraction(row["within_run_disagreement"])

    batch = json.loads((tmp_path / "results" / "batch_regime" / "summary.json").read_text())
    assert batch["sweep"] and {row["method"] for row in batch["comparison"].values()} == METHODS
    for row in batch["comparison"].values():
        assert _fraction(row["accuracy_models"])
    for plot in ("churn.png", "batch_regime.png"):
        assert (tmp_path / "plots" / plot).stat().st_size > 10_000
    readme = (tmp_path / "README.md").read_text()
    assert "<!-- churn-study:begin -->" in readme and "<!-- batch-regime:end -->" in readme
    assert "| codistillation (2 models) |" in readme

    # --report-only rebuilds the same block from the results alone.
    (tmp_path / "README.md").unlink()
    proc = subprocess.run([sys.executable, str(STUDY), "--smoke", "--out", str(tmp_path), "--report-only"],
                          env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "README.md").read_text() == readme
