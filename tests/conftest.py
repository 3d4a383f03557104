import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "tests" / "scripts"


def clean_env(**extra) -> dict:
    """This process's environment without a launcher's rank variables (so a child starts its own world), offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           **extra}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "CODISTILL_WORLD_SIZE", "CODISTILL_WORLD_RANK"):
        env.pop(key, None)
    return env


def launch(script, nproc, args, results_dir, launcher="torchrun", timeout=420, expect_failure=False, env=None):
    """Run `script` on `nproc` CPU processes under a real launcher; return each rank's result file.

    With `results_dir=None` (scripts that write no per-rank results, like the recipes) return the output. `env`
    adds to (or, with `None` values, removes from) the environment.
    """
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_port", str(_free_port())]
    else:
        command = [shutil.which("accelerate") or "accelerate", "launch", "--multi_gpu", "--num_processes", str(nproc),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(_free_port())]
    command += [str(script), *args]
    if results_dir is not None:
        results_dir = Path(results_dir)
        results_dir.mkdir(parents=True, exist_ok=True)
        command.append(f"--x-results={results_dir}")
    process_env = clean_env(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for key, value in (env or {}).items():
        if value is None:
            process_env.pop(key, None)
        else:
            process_env[key] = value
    proc = subprocess.run(command, env=process_env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if expect_failure:
        assert proc.returncode != 0, "the launch was expected to fail"
        return proc.stdout + proc.stderr
    assert proc.returncode == 0, f"launch failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    if results_dir is None:
        return proc.stdout + proc.stderr
    return [json.loads(path.read_text()) for path in sorted(results_dir.glob("rank*.json"), key=_rank_of)]


def _rank_of(path):
    return int(path.stem[4:])


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def launcher():
    return launch
