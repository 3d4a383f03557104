"""The benchmarks' smoke modes: each runs end to end on the CPU and reports sane numbers (nothing is timed)."""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO, clean_env

BENCHMARKS = REPO / "benchmarks"
pytestmark = pytest.mark.slow


def run(script, *args, timeout=300):
    proc = subprocess.run([sys.executable, str(script), *args], env=clean_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout


def test_step_overhead_smoke(tmp_path):
    out = run(BENCHMARKS / "step_overhead.py", "--smoke", "--json", str(tmp_path / "rows.json"))
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["case"] for r in rows] == ["bert-mlm", "gpt2-clm", "vit"]
    assert all(r["plain_ms"] > 0 and r["codistill_ms"] > 0 and r["plain_peak_bytes"] > 0 for r in rows)
    assert "| case | batch | plain ms | codistill ms | ratio |" in out
    # Where each mode peaks: every phase of a step has a peak, the distillation term only in codistillation.
    assert all(set(r["codistill_peak_bytes_by_phase"]) == {"forward", "distillation", "backward", "optimizer"}
               and set(r["plain_peak_bytes_by_phase"]) == {"forward", "backward", "optimizer"} for r in rows)
    assert "| case | mode | forward | distillation | backward | optimizer |" in out
    # The trainer's sampled-positions path, causal and masked LMs.
    out = run(BENCHMARKS / "step_overhead.py", "--smoke", "--cases", "gpt2-clm,bert-mlm", "--position_fraction",
              "0.25")
    assert "LM position fraction 0.25" in out and "| gpt2-clm |" in out and "| bert-mlm |" in out


def test_peer_store_smoke(tmp_path):
    """Groups launched apart: one kill and relaunch, and group 0's pace beside a slowed peer."""
    out = run(BENCHMARKS / "peer_store" / "run.py", "--smoke", "--out", str(tmp_path), timeout=420)
    results = json.loads((tmp_path / "results.json").read_text())
    (kill,) = results["kill"]["kills"]
    # Killed k = 2 steps past its checkpoint of step 4, group 0 resumed from it and published again.
    assert kill["resumed_from"] == 4 and kill["published_step_at_kill"] >= 6
    assert kill["seconds_until_published_again"] > 0
    for group in (0, 1):
        assert 0 <= results["kill"][f"group_{group}"]["eval_accuracy"] <= 1
    assert results["speed"]["slow_peer"]["mean"] > 0
    assert "| kill | last version published before it |" in out


def test_adapters_smoke(tmp_path):
    """LoRA peers: an adapter's bytes, a small fraction of the model's."""
    out = run(BENCHMARKS / "adapters.py", "--smoke", "--json", str(tmp_path / "rows.json"))
    (row,) = json.loads((tmp_path / "rows.json").read_text())["counts"]
    assert 0 < row["adapter_bytes"] < 0.1 * row["whole_bytes"]
    assert "| model | whole model P | LoRA r=8 adapter |" in out


def test_communication_smoke(tmp_path):
    out = run(BENCHMARKS / "communication.py", "--smoke", "--json", str(tmp_path / "rows.json"))
    ddp, sharded = json.loads((tmp_path / "rows.json").read_text())
    assert ddp["mode"].startswith("DDP") and "sharded" in sharded["mode"]
    # 4 steps, k = 2: two exchanges of the one peer model, sharded over 2 ranks: each rank sends half of it.
    steps, model_bytes = 4, sharded["model_bytes"]
    assert sharded["rank_cross"] == pytest.approx(model_bytes / steps)
    # The group as a whole sends one model per exchange across the boundary.
    assert sharded["group_cross"] == pytest.approx(2 * model_bytes / steps)
    # Ring all-reduce of the gradients over W = 4 ranks: 2 (W - 1) / W x P per rank and step.
    assert ddp["rank_cross"] == pytest.approx(1.5 * model_bytes)
    assert "| method | cross-group bytes / step, per rank |" in out


def _namespaces():
    return set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())


def _can_create_namespaces():
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None:
        return False
    name = f"cdxprobe{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode != 0:
        return False
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return True


@pytest.mark.skipif(not _can_create_namespaces(), reason="needs root with ip/tc and network namespaces")
@pytest.mark.skipif(not os.path.isfile("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"),
                    reason="needs Fashion-MNIST (Debian's dataset-fashion-mnist package)")
def test_slow_network_smoke(tmp_path):
    """Every method on the shaped trunk; DiLoCo (torchft) and the store mode (s3fs) only where their package is."""
    before = _namespaces()
    out = run(BENCHMARKS / "slow_network" / "run.py", "--smoke", "--out", str(tmp_path / "out"), "--work_dir",
              str(tmp_path / "runs"), timeout=420)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    optional = {"diloco": "torchft", "codistill_store": "s3fs"}
    present = {name: importlib.util.find_spec(package) is not None for name, package in optional.items()}
    expected = ["allreduce", "codistill", "localsgd", *(name for name in optional if present[name])]
    assert [(r["rate"], r["run"]) for r in results["rows"]] == [("100mbit", name) for name in expected]
    assert results["skipped"] == {name: package for name, package in optional.items() if not present[name]}
    assert all(r["steps"] == 6 and r["steps_per_second"] > 0 for r in results["rows"])
    # Every method's exchanges crossed the trunk, and all-reduce moved the most (every step).
    crossed = {r["run"]: r["trunk_bytes_per_step_measured"] for r in results["rows"]}
    assert all(value > 0 for value in crossed.values()) and max(crossed, key=crossed.get) == "allreduce"
    assert (tmp_path / "out" / "eval_loss_vs_time.png").stat().st_size > 0
    assert "| link | method | k or H |" in out
    # Everything the harness created is gone.
    assert {name for name in _namespaces() - before if name.startswith("cdx")} == set()


def test_sharded_memory_smoke(tmp_path):
    """DDP and FSDP2 groups, plain and codistilled (G = 2, n = 1 and 2): a peak per rank for each; peers held whole
    under DDP and as 1/n shards under FSDP2, exchanged before and after the step."""
    out = run(BENCHMARKS / "sharded_memory.py", "--smoke", "--json", str(tmp_path / "memory.json"))
    result = json.loads((tmp_path / "memory.json").read_text())
    rows = {(r["n"], r["method"], r["mode"]): r for r in result["rows"]}
    assert len(rows) == 8 and not result["skipped"]
    model_bytes = result["meta"]["param_bytes"]
    for (n, method, mode), row in rows.items():
        assert row["peak"] > 0 and row["peak_by_phase"]["step"] > 0
        for rank in row["ranks"]:
            assert all(math.isfinite(loss) for loss in rank["losses"])
            assert rank["optimizer_bytes"] == 2 * rank["own_bytes"]  # Adam's two moments of this rank's shards
            if mode == "plain":
                assert rank["peer_bytes"] == 0 and rank["exchanges"] == 0
            else:
                assert rank["exchanges"] == 2
                assert rank["peer_bytes"] == (model_bytes // n if method == "FSDP2" else model_bytes)
    assert "| G | n | method | mode | peak per rank (MB) |" in out and "FSDP2, G=2, n=2: codistill/plain peak" in out
