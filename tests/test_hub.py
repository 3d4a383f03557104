"""`--push_to_hub` with codistillation: one repository per group, each with its card, against a local recording Hub."""

import subprocess
import sys
from collections import Counter

from safetensors.torch import load
from transformers import AutoModelForImageClassification

from tests.conftest import REPO, clean_env, launch
from tests.hub_server import USER, RecordingHub

TOKEN = "hf_codistillTestToken0123456789"


def test_every_group_pushes_its_model_and_card_once(tmp_path):
    out = tmp_path / "vit"
    with RecordingHub() as hub:
        output = launch(
            REPO / "recipes" / "run_image_classification.py", 4,
            ["--codistill", "--num_groups", "2", "--codistill_sync_every", "2", "--do_train", "--do_eval",
             "--max_steps", "4", "--per_device_train_batch_size", "16", "--max_train_samples", "128",
             "--max_eval_samples", "32", "--report_to", "none", "--output_dir", str(out), "--save_strategy", "no",
             "--push_to_hub", "--hub_model_id", "vit-digits", "--hub_token", TOKEN],
            None, launcher="accelerate",
            env={"HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": None, "HF_HUB_DISABLE_TELEMETRY": "1"},
        )
    assert not hub.unhandled, hub.unhandled
    assert TOKEN not in output
    assert f"Bearer {TOKEN}" in hub.authorizations
    repos = {f"{USER}/vit-digits-group-0", f"{USER}/vit-digits-group-1"}
    assert set(hub.repos) == repos
    # One rank per group uploads: one final commit per repository.
    final = [repo for repo, summary, _ in hub.commits if summary == "End of training"]
    assert sorted(final) == sorted(repos)
    for group in (0, 1):
        files = hub.repos[f"{USER}/vit-digits-group-{group}"]
        assert {"README.md", "config.json", "model.safetensors", "eval_results.json"} <= set(files)
        assert not any(path.startswith("checkpoint-") for path in files)
        card = files["README.md"].decode()
        assert "- codistillation" in card and "| groups (models) G | 2 |" in card
        assert f"| this model's group | {group} |" in card
        assert f"| peers | {USER}/vit-digits-group-{1 - group} |" in card
        assert "| data | digits (built in, offline) |" in card and "eval_ensemble_accuracy" in card
        # The pushed weights are the group's own model, as saved locally.
        local = AutoModelForImageClassification.from_pretrained(out / f"group_{group}").state_dict()
        pushed = load(files["model.safetensors"])
        assert all((pushed[name] == local[name]).all() for name in pushed if name in local)


def test_one_process_pushes_each_model_once_per_save(tmp_path):
    """No launcher: one process trains both models and pushes each to its own repository, each commit once."""
    out = tmp_path / "vit"
    with RecordingHub() as hub:
        env = clean_env(HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_TELEMETRY="1")
        env.pop("HF_HUB_OFFLINE", None)
        proc = subprocess.run(
            [sys.executable, str(REPO / "recipes" / "run_image_classification.py"), "--codistill", "--num_groups", "2",
             "--do_train", "--max_steps", "2", "--per_device_train_batch_size", "16", "--max_train_samples", "64",
             "--report_to", "none", "--output_dir", str(out), "--save_strategy", "no", "--use_cpu",
             "--push_to_hub", "--hub_model_id", "vit-digits", "--hub_token", TOKEN],
            env=env, capture_output=True, text=True, timeout=300, cwd=REPO,
        )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not hub.unhandled, hub.unhandled
    assert set(hub.repos) == {f"{USER}/vit-digits-group-0", f"{USER}/vit-digits-group-1"}
    commits = Counter((repo, summary) for repo, summary, _ in hub.commits)
    assert {repo for repo, summary in commits if summary == "End of training"} == set(hub.repos)
    assert all(count == 1 for count in commits.values()), commits
