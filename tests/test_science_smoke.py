"""The science study's smoke mode (benchmarks/science/run_study.py --smoke): a few steps of an all-reduce and a
codistillation run under a real 4-process launcher, then the results, summary, plot and README it generates."""

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import REPO, clean_env

pytestmark = pytest.mark.slow

STUDY = REPO / "benchmarks" / "science" / "run_study.py"


def _finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_science_study_smoke(tmp_path):
    env = clean_env()
    proc = subprocess.run([sys.executable, str(STUDY), "--smoke", "--out", str(tmp_path)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]

    results = tmp_path / "results"
    allreduce = json.loads((results / "vit_allreduce_s0.json").read_text())
    codistill = json.loads((results / "vit_codistill_wd_k2_s0.json").read_text())
    assert allreduce["ok"] and codistill["ok"]
    assert len(allreduce["models"]) == 1 and len(codistill["models"]) == 2
    for model in allreduce["models"] + codistill["models"]:
        assert _finite(model["train_loss"]) and _finite(model["eval_loss"]) and model["eval_loss"] > 0
        assert 0 <= model["eval_accuracy"] <= 1
        # Distance from init is logged for both kinds of run, and grows from 0.
        assert _finite(model["param_distance"]) and model["param_distance"] > 0
        assert model["curves"]["step"][-1] == 4 and model["curves"]["eval_step"]
    assert 0 <= codistill["agreement"] <= 1 and 0 <= codistill["ensemble_accuracy"] <= 1
    assert _finite(codistill["ensemble_loss"])
    # The weight-decay schedule reached the codistilled run: 0.1 -> 0.01 -> 0 at 50% / 75% of 4 steps.
    decays = [wd for wd in codistill["models"][0]["curves"]["weight_decay"] if wd is not None]
    assert decays[0] > 0 and decays[-1] == 0

    summary = json.loads((results / "summary.json").read_text())
    rows = summary["tables"]["vit_main"]
    assert set(rows) == {"allreduce", "codistill_wd"} and summary["failed"] == []
    assert _finite(rows["allreduce"]["eval_accuracy"]["mean"])
    assert (tmp_path / "plots" / "vit_main.png").stat().st_size > 10_000
    readme = (tmp_path / "README.md").read_text()
    assert "<!-- study:begin -->" in readme and "| all-reduce (1 model, DDP x4, batch B) |" in readme

    # --report-only rebuilds the same tables from the results alone.
    (tmp_path / "README.md").unlink()
    proc = subprocess.run([sys.executable, str(STUDY), "--smoke", "--out", str(tmp_path), "--report-only"], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "README.md").read_text() == readme


def test_science_study_single_process_smoke(tmp_path):
    """`--single_process` (what `--gpu` does on one GPU): every run is one process, all-reduce on batch B and the
    codistilled pair in the recipe's one-process mode on B/2 each."""
    env = clean_env()
    proc = subprocess.run([sys.executable, str(STUDY), "--smoke", "--single_process", "--out", str(tmp_path)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    allreduce = json.loads((tmp_path / "results" / "vit_allreduce_s0.json").read_text())
    codistill = json.loads((tmp_path / "results" / "vit_codistill_wd_k2_s0.json").read_text())
    assert allreduce["command"].startswith("python recipes/") and "--per_device_train_batch_size 32" in allreduce[
        "command"]
    assert "--codistill " in codistill["command"] and "--per_device_train_batch_size 16" in codistill["command"]
    assert len(allreduce["models"]) == 1 and len(codistill["models"]) == 2
    assert 0 <= codistill["agreement"] <= 1
    assert all(_finite(m["eval_loss"]) and m["curves"]["step"][-1] == 4 for m in codistill["models"])
