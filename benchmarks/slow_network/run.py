#!/usr/bin/env python
"""Codistillation vs. all-reduce DDP between emulated hosts joined by slow links, on one machine.

Every worker runs in its own network namespace. The default layout is two "nodes" of W/2 hosts: each node's hosts
share a bridge (unshaped, like the links inside a node) and the two bridges are joined by one trunk whose two
directions are shaped with a token bucket (`tbf`) to the link speed under test, like two machines on a slow network.
Codistillation puts one group on each node, so only its peer exchange crosses the trunk; DDP's ring all-reduce over
all W workers crosses it every step. `--layout flat` instead shapes every host's own port (all links slow).

    sudo python benchmarks/slow_network/run.py          # ~10 min on an idle machine: 1gbit and 100mbit, both methods
    sudo python benchmarks/slow_network/run.py --smoke          # seconds: tiny model, one speed, a few steps

For each link speed: the all-reduce run trains for `--max_steps`; its final evaluation loss is the target that the
codistillation run (group 0's model) must reach, which it stops at (capped at `--codistill_max_steps`). Writes
`results.json` and `eval_loss_vs_time.png` into `--out` and prints a Markdown table.

Needs root (network namespaces, veth, tc). Everything created (namespaces `cdx<pid>-*`, a blackhole route for the
test subnet so nothing can leave the machine) is removed on exit, also on errors and Ctrl-C, and every worker runs
under `timeout`. Workers need `GLOO_SOCKET_IFNAME=eth0`, or gloo binds 127.0.0.1 and the hosts cannot connect.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
WORKER = os.path.join(HERE, "worker.py")


def sh(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=check, capture_output=True, text=True)


def tbf_burst(rate: str) -> int:
    """Token bucket size: at least one 64 KiB GSO packet and about 2 ms of traffic at `rate`."""
    units = {"gbit": 10**9, "mbit": 10**6, "kbit": 10**3}
    suffix = next(s for s in units if rate.endswith(s))
    bits_per_second = float(rate[: -len(suffix)]) * units[suffix]
    return max(65536, int(bits_per_second / 8 / 500))


class Hosts:
    """W network namespaces with one eth0 each, bridged in a switch namespace; removed by `down`."""

    def __init__(self, num_hosts: int, layout: str):
        pid = os.getpid()
        self.prefix, self.net = f"cdx{pid}", f"10.79.{pid % 250}"
        self.num_hosts, self.layout = num_hosts, layout
        self.switch = f"{self.prefix}-sw"
        self.hosts = [f"{self.prefix}-h{i}" for i in range(num_hosts)]
        self.shaped: list[tuple[str, str]] = []  # (namespace, device) carrying a tbf

    def address(self, host: int) -> str:
        return f"{self.net}.{host + 1}"

    def up(self) -> None:
        sh("ip", "route", "replace", "blackhole", f"{self.net}.0/24")  # the root namespace never routes it out
        sw = self.switch
        sh("ip", "netns", "add", sw)
        sh("ip", "-n", sw, "link", "set", "lo", "up")
        bridges = ["br0"] if self.layout == "flat" else ["br0", "br1"]
        for bridge in bridges:
            sh("ip", "-n", sw, "link", "add", bridge, "type", "bridge")
            sh("ip", "-n", sw, "link", "set", bridge, "up")
        if self.layout == "nodes":
            # The trunk between the two nodes: the only link their traffic shares.
            sh("ip", "-n", sw, "link", "add", "trunk0", "type", "veth", "peer", "name", "trunk1")
            for i, bridge in enumerate(bridges):
                sh("ip", "-n", sw, "link", "set", f"trunk{i}", "master", bridge, "up")
            self.shaped = [(sw, "trunk0"), (sw, "trunk1")]
        for i, host in enumerate(self.hosts):
            bridge = bridges[0] if self.layout == "flat" else bridges[i * 2 // self.num_hosts]
            sh("ip", "netns", "add", host)
            sh("ip", "-n", sw, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", host)
            sh("ip", "-n", sw, "link", "set", f"p{i}", "master", bridge, "up")
            sh("ip", "-n", host, "link", "set", "lo", "up")
            sh("ip", "-n", host, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            sh("ip", "-n", host, "link", "set", "eth0", "up")
            if self.layout == "flat":
                self.shaped += [(host, "eth0"), (sw, f"p{i}")]
        for _ in range(50):  # bridge ports take a moment to forward
            states = sh("bridge", "-n", sw, "link", "show").stdout
            if states.count("state forwarding") == len(self.hosts) + (2 if self.layout == "nodes" else 0):
                return
            time.sleep(0.1)
        raise RuntimeError(f"the bridge ports in {sw} did not start forwarding:\n{states}")

    def shape(self, rate: str) -> None:
        for namespace, device in self.shaped:
            sh("tc", "-n", namespace, "qdisc", "replace", "dev", device, "root", "tbf", "rate", rate, "burst",
               str(tbf_burst(rate)), "latency", "50ms")

    def popen(self, host: int, command: list[str], env: dict[str, str], log_path: str) -> subprocess.Popen:
        settings = [f"{key}={value}" for key, value in env.items()]
        with open(log_path, "w") as log:
            return subprocess.Popen(["ip", "netns", "exec", self.hosts[host], "env", *settings, *command],
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)

    def down(self) -> None:
        for namespace in [*self.hosts, self.switch]:
            pids = sh("ip", "netns", "pids", namespace, check=False).stdout.split()
            for pid in pids:  # only processes we started can live in our namespaces
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            sh("ip", "netns", "del", namespace, check=False)
        sh("ip", "route", "del", "blackhole", f"{self.net}.0/24", check=False)


def run_method(hosts: Hosts, method: str, rate: str, args, extra: list[str]) -> list[dict]:
    """Start one worker per host, wait (bounded), return each rank's record."""
    out = os.path.join(args.work_dir, f"{method}-{rate}")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    env = {"MASTER_ADDR": hosts.address(0), "MASTER_PORT": "29500", "WORLD_SIZE": str(hosts.num_hosts),
           "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "GLOO_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": REPO,
           "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root")}
    command = ["timeout", "--kill-after=10", str(args.run_timeout), sys.executable, WORKER, "--method", method,
               "--output_dir", out, *extra]
    procs = [hosts.popen(rank, command, {**env, "RANK": str(rank)}, os.path.join(out, f"log{rank}.txt"))
             for rank in range(hosts.num_hosts)]
    deadline = time.monotonic() + args.run_timeout + 30
    for proc in procs:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    failed = [rank for rank, proc in enumerate(procs) if proc.returncode != 0]
    if failed:
        tail = open(os.path.join(out, f"log{failed[0]}.txt")).read()[-3000:]
        raise RuntimeError(f"{method} at {rate}: ranks {failed} failed (exit {procs[failed[0]].returncode}):\n{tail}")
    return [json.load(open(os.path.join(out, f"rank{rank}.json"))) for rank in range(hosts.num_hosts)]


def training_seconds(evaluation: dict) -> float:
    """Seconds spent training (not evaluating) until this evaluation."""
    return evaluation["train_seconds_at_eval"]


def summarise(results: dict) -> list[dict]:
    rows = []
    for rate, runs in results.items():
        allreduce, codistill = runs["allreduce"], runs["codistill"]
        target = allreduce["evals"][-1]["eval_loss"]
        reached = next((e for e in codistill["groups"][0]["evals"] if e["eval_loss"] <= target), None)
        for method, run, hit in (("all-reduce DDP", allreduce, allreduce["evals"][-1]),
                                 ("codistill 2x2 (group 0)", codistill, reached)):
            evals = run["evals"] if "evals" in run else run["groups"][0]["evals"]
            steps = run["steps"]
            train_only = run["train_seconds"] - run["eval_seconds"]
            rows.append({
                "rate": rate, "method": method, "target_loss": target, "steps": steps,
                "steps_per_second": steps / train_only, "final_eval_loss": evals[-1]["eval_loss"],
                "final_eval_accuracy": evals[-1]["eval_accuracy"],
                "wall_to_target": hit["seconds"] if hit else None,
                "train_to_target": training_seconds(hit) if hit else None,
                "steps_to_target": hit["step"] if hit else None,
            })
        base, ours = rows[-2], rows[-1]
        ours["vs_allreduce"] = ours["wall_to_target"] / base["wall_to_target"] if ours["wall_to_target"] else None
        base["vs_allreduce"] = 1.0
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| link | method | steps/s | steps to target | wall-clock to target (s) | of which training (s) "
             "| vs all-reduce | final eval loss / acc |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        hit = r["wall_to_target"] is not None
        lines.append(
            f"| {r['rate']} | {r['method']} | {r['steps_per_second']:.2f} | {r['steps_to_target'] if hit else '-'} | "
            f"{r['wall_to_target']:.1f} | {r['train_to_target']:.1f} | {r['vs_allreduce']:.2f}x | "
            if hit else f"| {r['rate']} | {r['method']} | {r['steps_per_second']:.2f} | not reached | - | - | - | ")
        lines[-1] += f"{r['final_eval_loss']:.3f} / {r['final_eval_accuracy']:.3f} |"
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (rate, runs) in zip(axes[0], results.items()):
        evals = runs["allreduce"]["evals"]
        ax.plot([e["seconds"] for e in evals], [e["eval_loss"] for e in evals], "o-", color="C0",
                label="all-reduce DDP (4 workers)")
        for group, style in ((0, "s-"), (1, "s--")):
            evals = runs["codistill"]["groups"][group]["evals"]
            ax.plot([e["seconds"] for e in evals], [e["eval_loss"] for e in evals], style, color="C1",
                    alpha=1.0 if group == 0 else 0.5, label=f"codistill 2x2, group {group}")
        ax.axhline(runs["allreduce"]["evals"][-1]["eval_loss"], color="gray", lw=0.8, ls=":",
                   label="all-reduce final eval loss")
        ax.set(title=f"links between nodes: {rate}", xlabel="wall-clock seconds", ylabel="eval loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="Tiny model, one link speed, a few steps.")
    parser.add_argument("--rates", default="1gbit,100mbit", help="Link speeds, as tc spells them.")
    parser.add_argument("--layout", choices=["nodes", "flat"], default="nodes")
    parser.add_argument("--num_hosts", type=int, default=4)
    parser.add_argument("--max_steps", type=int, default=300, help="Steps of the all-reduce run.")
    parser.add_argument("--codistill_max_steps", type=int, default=900)
    parser.add_argument("--eval_steps", type=int, default=25)
    parser.add_argument("--batch_size", type=int, default=8, help="Per worker, both methods.")
    parser.add_argument("--hidden_size", type=int, default=192)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--sync_every", type=int, default=25, help="k of the codistillation run.")
    parser.add_argument("--run_timeout", type=int, default=600, help="Seconds any one run may take.")
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="Where results and the plot go.")
    parser.add_argument("--work_dir", default=os.path.join(tempfile.gettempdir(), "slow_network_runs"),
                        help="Where each run's logs and per-rank records go.")
    args = parser.parse_args()
    common = ["--eval_steps", str(args.eval_steps), "--batch_size", str(args.batch_size), "--hidden_size",
              str(args.hidden_size), "--num_layers", str(args.num_layers), "--sync_every", str(args.sync_every)]
    if args.smoke:
        args.rates, args.max_steps, args.codistill_max_steps, args.run_timeout = "100mbit", 6, 6, 240
        common = ["--eval_steps", "3", "--hidden_size", "32", "--num_layers", "1", "--sync_every", "3",
                  "--num_train", "2000", "--num_eval", "100"]
    if os.geteuid() != 0:
        raise SystemExit("run.py needs root: it creates network namespaces and shapes links with tc.")
    os.makedirs(args.out, exist_ok=True)

    def interrupted(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    hosts = Hosts(args.num_hosts, args.layout)
    results = {}
    try:
        hosts.up()
        for rate in args.rates.split(","):
            hosts.shape(rate)
            allreduce = run_method(hosts, "allreduce", rate, args, [*common, "--max_steps", str(args.max_steps)])
            target = allreduce[0]["evals"][-1]["eval_loss"]
            print(f"{rate}: all-reduce reached eval loss {target:.4f} in {allreduce[0]['train_seconds']:.1f} s",
                  flush=True)
            codistill = run_method(hosts, "codistill", rate, args,
                                   [*common, "--max_steps", str(args.codistill_max_steps), "--target_loss",
                                    str(target)])
            groups = {r["group_index"]: r for r in codistill if r["group_rank"] == 0}
            print(f"{rate}: codistill stopped at step {codistill[0]['steps']} after "
                  f"{codistill[0]['train_seconds']:.1f} s", flush=True)
            results[rate] = {"allreduce": allreduce[0],
                             "codistill": {"steps": codistill[0]["steps"],
                                           "train_seconds": codistill[0]["train_seconds"],
                                           "eval_seconds": codistill[0]["eval_seconds"],
                                           "groups": [groups[g] for g in sorted(groups)]}}
    finally:
        hosts.down()
    rows = summarise(results)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"settings": vars(args), "rows": rows, "runs": results}, f, indent=1)
    plot(results, os.path.join(args.out, "eval_loss_vs_time.png"))
    print(markdown(rows))


if __name__ == "__main__":
    main()
