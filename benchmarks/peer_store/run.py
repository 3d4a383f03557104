#!/usr/bin/env python
"""Groups launched apart through a peer store: what a killed group costs, and whether a slow group slows the others.

Two groups, each its own torchrun launch of one CPU process, train tiny ViTs on scikit-learn's digits
(`tests/scripts/train_digits.py`, which can slow a group down by a fixed delay per step) and meet through a store in a
temporary folder. Scenarios, all with the same seeds:

- `undisturbed`: both groups run to the end;
- `kill`: group 0 is killed with SIGKILL k steps after each of its checkpoints of steps `--kill_after`, each time
  relaunched at once; the launch resumes from its own last complete checkpoint. Measured per kill: steps lost (at
  least the newest version it had published minus the step resumed from) and the seconds from the kill until the
  restarted group publishes again; at the end, both groups' evaluation against the undisturbed run;
- `alone`, `equal_peer`, `slow_peer`: group 0's steps per second with no peer launched, beside a peer at its own
  speed, and beside a peer slowed about 3x (`--slow_delay` seconds per step), `--repeats` times each.

    python benchmarks/peer_store/run.py                 # ~6 min on 2 cores; writes results/results.json, prints tables
    python benchmarks/peer_store/run.py --smoke --out /tmp/ps    # ~1 min: one kill, one slow peer (the slow tests)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
WORKER = os.path.join(REPO, "tests", "scripts", "train_digits.py")


def launch(group: int, root: str, store: str, results: str, args, *extra: str) -> subprocess.Popen:
    """Group `group` as its own torchrun launch of one process."""
    os.makedirs(results, exist_ok=True)
    port = 29600 + group + 10 * (os.getpid() % 100)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(port),
               WORKER, "--output_dir", os.path.join(root, "out"), "--codistill", "--num_groups", "2",
               "--codistill_peer_store", store, "--codistill_group_index", str(group), "--codistill_sync_every",
               str(args.sync_every), "--codistill_peer_max_age_seconds", str(args.max_age_seconds),
               "--per_device_train_batch_size", "32", "--learning_rate", "3e-3", "--seed", "42", "--report_to",
               "none", "--logging_steps", str(args.sync_every), "--save_steps", str(args.save_every),
               "--max_steps", str(args.max_steps), f"--x-num_train={args.num_train}", "--x-accuracy=1",
               f"--x-results={results}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    log = open(os.path.join(results, "log.txt"), "a")
    return subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def kill(process: subprocess.Popen) -> None:
    """SIGKILL the launcher and its worker (torchrun starts each worker in a session of its own)."""
    workers = psutil.Process(process.pid).children(recursive=True)
    for victim in [*workers, psutil.Process(process.pid)]:
        victim.send_signal(signal.SIGKILL)
    psutil.wait_procs(workers, timeout=30)
    process.wait(timeout=30)


def result(results: str) -> dict:
    with open(os.path.join(results, "rank0.json")) as f:
        rank = json.load(f)
    summary = next(entry for entry in rank["log_history"] if "train_runtime" in entry)
    return {"eval_loss": rank["eval"]["eval_loss"], "eval_accuracy": rank["eval"]["eval_accuracy"],
            "eval_agreement": rank["eval"].get("eval_agreement_0_1"),
            "steps_per_second": summary["train_steps_per_second"], "train_runtime": summary["train_runtime"]}


def wait_all(processes, timeout=900) -> None:
    for process in processes:
        if process.wait(timeout=timeout) != 0:
            raise RuntimeError(f"a launch failed: {process.args}")


def newest_step(store: str, group: int) -> int | None:
    folder = os.path.join(store, f"group_{group}")
    steps = [int(name[5:]) for name in os.listdir(folder) if name.startswith("step-")
             and os.path.isfile(os.path.join(folder, name, "manifest.json"))] if os.path.isdir(folder) else []
    return max(steps) if steps else None


def newest_manifest_time(store: str, group: int) -> float:
    folder = os.path.join(store, f"group_{group}")
    times = [os.path.getmtime(os.path.join(folder, name, "manifest.json")) for name in os.listdir(folder)
             if os.path.isfile(os.path.join(folder, name, "manifest.json"))]
    return max(times, default=0.0)


def complete_steps(root: str, group: int) -> list[int]:
    folder = os.path.join(root, "out", f"group_{group}")
    if not os.path.isdir(folder):
        return []
    return sorted(int(name.split("-")[1]) for name in os.listdir(folder) if name.startswith("checkpoint-")
                  and os.path.isfile(os.path.join(folder, name, "codistill_state.json")))


def undisturbed(args, work: str) -> dict:
    root = os.path.join(work, "undisturbed")
    store = os.path.join(root, "store")
    runs = [launch(g, root, store, os.path.join(root, f"results_{g}"), args, "--x-await_peers=120") for g in (0, 1)]
    wait_all(runs)
    return {f"group_{g}": result(os.path.join(root, f"results_{g}")) for g in (0, 1)}


def with_kills(args, work: str) -> dict:
    root = os.path.join(work, "kill")
    store = os.path.join(root, "store")
    peer = launch(1, root, store, os.path.join(root, "results_1"), args, "--x-await_peers=120",
                  f"--x-step_delay={args.delay}")
    victim = launch(0, root, store, os.path.join(root, "results_0"), args, f"--x-step_delay={args.delay}")
    kills = []
    for after in args.kill_after:
        # Kill mid-way between two checkpoints: once the version k steps past checkpoint `after` is published.
        while (newest_step(store, 0) or -1) < after + args.sync_every:
            if victim.poll() is not None:
                raise RuntimeError("group 0 ended before the kill")
            time.sleep(0.05)
        published = newest_step(store, 0)
        kill(victim)
        killed_at, killed_at_wall = time.monotonic(), time.time()
        resumed_from = complete_steps(root, 0)[-1]
        victim = launch(0, root, store, os.path.join(root, "results_0"), args, "--x-resume=true",
                        f"--x-step_delay={args.delay}")
        while newest_manifest_time(store, 0) < killed_at_wall:
            time.sleep(0.05)  # the restarted group publishes when it resumes (its resumed step), then every k
        kills.append({"published_step_at_kill": published, "resumed_from": resumed_from,
                      "seconds_until_published_again": round(time.monotonic() - killed_at, 2)})
    wait_all([victim, peer])
    return {"kills": kills, **{f"group_{g}": result(os.path.join(root, f"results_{g}")) for g in (0, 1)}}


def speed(args, work: str) -> dict:
    """Group 0's steps per second alone, beside an equal peer and beside a peer slowed about 3x."""
    measured = {name: [] for name in args.speed_runs}
    for repeat in range(args.repeats):
        for name in measured:
            root = os.path.join(work, f"speed_{name}_{repeat}")
            store = os.path.join(root, "store")
            common = [f"--x-step_delay={args.delay}"]
            runs = [launch(0, root, store, os.path.join(root, "results_0"), args, *common)]
            if name != "alone":
                delay = args.slow_delay if name == "slow_peer" else args.delay
                runs.append(launch(1, root, store, os.path.join(root, "results_1"), args, f"--x-step_delay={delay}",
                                   "--max_steps", str(args.max_steps)))
            runs[0].wait(timeout=900)
            measured[name].append(result(os.path.join(root, "results_0"))["steps_per_second"])
            for process in runs[1:]:
                kill(process)  # the slow peer need not finish: only group 0's pace is measured
    return {name: {"runs": values, "mean": statistics.mean(values),
                   "sd": statistics.stdev(values) if len(values) > 1 else 0.0} for name, values in measured.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--max_steps", type=int, default=120)
    parser.add_argument("--sync_every", type=int, default=10)
    parser.add_argument("--save_every", type=int, default=20)
    parser.add_argument("--kill_after", type=int, nargs="+", default=[40, 80])
    parser.add_argument("--num_train", type=int, default=1024)
    parser.add_argument("--delay", type=float, default=0.05, help="seconds added to every step of every group")
    parser.add_argument("--slow_delay", type=float, default=0.3, help="the slow peer's delay per step")
    parser.add_argument("--max_age_seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--speed_runs", nargs="+", default=["alone", "equal_peer", "slow_peer"])
    parser.add_argument("--smoke", action="store_true", help="a few steps: the kill and the slow peer")
    args = parser.parse_args()
    if args.smoke:
        args.max_steps, args.sync_every, args.save_every, args.kill_after = 12, 2, 4, [4]
        args.num_train, args.repeats, args.slow_delay, args.speed_runs = 128, 1, 0.1, ["slow_peer"]
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="peer_store_bench_") as work:
        started = time.monotonic()
        results = {"settings": {k: v for k, v in vars(args).items() if k != "out"}}
        if not args.smoke:
            results["undisturbed"] = undisturbed(args, work)
        results["kill"] = with_kills(args, work)
        results["speed"] = speed(args, work)
        results["wall_seconds"] = round(time.monotonic() - started, 1)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(report(results))


def report(results: dict) -> str:
    lines = ["| kill | last version published before it | resumed from | steps lost | s until published again |",
             "|---|---|---|---|---|"]
    for number, k in enumerate(results["kill"]["kills"], 1):
        lost = k["published_step_at_kill"] - k["resumed_from"]
        lines.append(f"| {number} | {k['published_step_at_kill']} | {k['resumed_from']} | ≥ {lost} | "
                     f"{k['seconds_until_published_again']} |")
    lines += ["", "| run | group | eval loss | eval accuracy | agreement |", "|---|---|---|---|---|"]
    for run in ("undisturbed", "kill")[0 if "undisturbed" in results else 1:]:
        for group in (0, 1):
            r = results[run][f"group_{group}"]
            agreement = f"{r['eval_agreement']:.3f}" if r["eval_agreement"] is not None else "-"
            lines.append(f"| {run} | {group} | {r['eval_loss']:.4f} | {r['eval_accuracy']:.4f} | {agreement} |")
    lines += ["", "| group 0 beside | steps/s (mean ± s.d.) | runs |", "|---|---|---|"]
    for name, r in results["speed"].items():
        lines.append(f"| {name} | {r['mean']:.2f} ± {r['sd']:.2f} | {', '.join(f'{v:.2f}' for v in r['runs'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
