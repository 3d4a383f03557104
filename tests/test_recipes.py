"""The recipes end to end on their built-in offline data, codistilled under a launcher and plain."""

import json
import subprocess
import sys

import pytest
from transformers import AutoModelForImageClassification

from tests.conftest import REPO, launch

RECIPE = REPO / "recipes" / "run_image_classification.py"
SHORT = ["--do_train", "--do_eval", "--max_steps", "6", "--per_device_train_batch_size", "16", "--learning_rate",
         "1e-3", "--max_train_samples", "256", "--max_eval_samples", "64", "--logging_steps", "3", "--report_to",
         "none"]


def test_image_classification_codistilled_under_accelerate(tmp_path):
    out = tmp_path / "out"
    launch(RECIPE, 4, [*SHORT, "--codistill", "--num_groups", "2", "--codistill_sync_every", "2",
                       "--output_dir", str(out), "--save_steps", "3", "--save_total_limit", "1"], None, launcher="accelerate")
    for group in (0, 1):
        folder = out / f"group_{group}"
        model = AutoModelForImageClassification.from_pretrained(folder)
        assert model.config.num_labels == 10 and model.config.id2label[3] == "3"
        results = json.loads((folder / "eval_results.json").read_text())
        assert 0 <= results["eval_accuracy"] <= 1 and "group_1/eval_loss" not in results
        assert "codistillation" in (folder / "README.md").read_text()
        assert (folder / "checkpoint-6" / "codistill_state.json").is_file()
        # save_total_limit=1: step 3 is dropped once every group has completed step 6.
        assert not (folder / "checkpoint-3").exists()
    assert AutoModelForImageClassification.from_pretrained(out).config.num_labels == 10
    history = json.loads((out / "group_0" / "trainer_state.json").read_text())["log_history"]
    assert any("group_1/distill_loss" in entry for entry in history)


def test_image_classification_plain_trainer(tmp_path):
    out = tmp_path / "plain"
    proc = subprocess.run([sys.executable, str(RECIPE), *SHORT, "--use_cpu", "--output_dir", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "digits (built in, offline)" in proc.stdout + proc.stderr
    assert json.loads((out / "eval_results.json").read_text())["eval_accuracy"] >= 0
    assert not (out / "group_0").exists()


def test_unknown_label_column_is_named(tmp_path, monkeypatch):
    sys.path.insert(0, str(RECIPE.parent))
    import run_image_classification

    monkeypatch.setattr(sys, "argv", ["run_image_classification.py", *SHORT, "--use_cpu", "--output_dir",
                                      str(tmp_path), "--label_column_name", "digit"])
    with pytest.raises(ValueError, match="Column 'digit' is not in the data set.*--label_column_name"):
        run_image_classification.main()
