#!/usr/bin/env python
"""All-reduce DDP, local SGD, DiLoCo and codistillation between emulated hosts joined by slow links, on one machine.

Every worker runs in its own network namespace. The default layout is two "nodes" of W/2 hosts: each node's hosts
share a bridge (unshaped, like the links inside a node) and the two bridges are joined by one trunk whose two
directions are shaped with a token bucket (`tbf`) to the link speed under test, like two machines on a slow network.
Codistillation puts one group on each node, local SGD and DiLoCo one replica (DDP inside it) on each node, so only
their exchanges cross the trunk; DDP's ring all-reduce over all W workers crosses it every step. The store mode of
codistillation launches each group on its own and serves the store (S3, moto's server) from an extra host on node
0's bridge, so group 1's reads and writes cross the trunk. `--layout flat` instead shapes every host's own port.

    sudo python benchmarks/slow_network/run.py          # ~70 min on an idle machine: 3 speeds, 7 runs each
    sudo python benchmarks/slow_network/run.py --smoke          # ~2 min: tiny model, one speed, a few steps

The runs (`--runs`): `allreduce`; `codistill` (k = `--sync_every`); `localsgd` and `diloco` at the H that moves as
many bytes across the trunk per step as codistillation at k; `localsgd_own` and `diloco_own` at their own recommended
H scaled to the run's length; `codistill_store`. DiLoCo needs torchft (`pip install torchft`), the store mode s3fs
(`pip install s3fs`): a run whose package is missing is skipped and named. For each link speed the all-reduce run
trains for `--max_steps`; its final evaluation loss is the target that every other run (replica or group 0's model)
must reach, which it stops at (capped at `--other_max_steps`). At the `--short_rates` the all-reduce run is too slow
to run whole: it runs `--short_steps` steps and its time to the target is projected (its trajectory does not depend
on the link: same seeds, same arithmetic). The bytes across the trunk are read from the trunk's counters. Writes
`results.json` and `eval_loss_vs_time.png` into `--out` and prints a Markdown table.

Needs root (network namespaces, veth, tc). Everything created (namespaces `cdx<pid>-*`, a blackhole route for the
test subnet so nothing can leave the machine) is removed on exit, also on errors and Ctrl-C, and every worker runs
under `timeout`. Workers need `GLOO_SOCKET_IFNAME=eth0`, or gloo binds 127.0.0.1 and the hosts cannot connect.
"""

from __future__ import annotations

import argparse
import importlib.util
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
STORE_SERVER = os.path.join(HERE, "store_server.py")
STORE_PORT, STORE_BUCKET = 5000, "slow-network"
ALL_RUNS = ("allreduce", "codistill", "localsgd", "diloco", "localsgd_own", "diloco_own", "codistill_store")
LABELS = {"allreduce": "all-reduce DDP", "codistill": "codistill 2x2", "codistill_store": "codistill 2x2, store",
          "localsgd": "local SGD 2x2", "localsgd_own": "local SGD 2x2", "diloco": "DiLoCo 2x2 (torchft)",
          "diloco_own": "DiLoCo 2x2 (torchft)"}
NEEDS = {"diloco": "torchft", "diloco_own": "torchft", "codistill_store": "s3fs"}


def sh(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=check, capture_output=True, text=True)


def tbf_burst(rate: str) -> int:
    """Token bucket size: at least one 64 KiB GSO packet and about 2 ms of traffic at `rate`."""
    units = {"gbit": 10**9, "mbit": 10**6, "kbit": 10**3}
    suffix = next(s for s in units if rate.endswith(s))
    bits_per_second = float(rate[: -len(suffix)]) * units[suffix]
    return max(65536, int(bits_per_second / 8 / 500))


class Hosts:
    """W network namespaces with one eth0 each, bridged in a switch namespace, and optionally one more host on node
    0's bridge (`server`, for the peer store); removed by `down`."""

    def __init__(self, num_hosts: int, layout: str, server: bool = False):
        pid = os.getpid()
        self.prefix, self.net = f"cdx{pid}", f"10.79.{pid % 250}"
        self.num_hosts, self.layout = num_hosts, layout
        self.switch = f"{self.prefix}-sw"
        self.hosts = [f"{self.prefix}-h{i}" for i in range(num_hosts)] + ([f"{self.prefix}-srv"] if server else [])
        self.shaped: list[tuple[str, str]] = []  # (namespace, device) carrying a tbf

    @property
    def server(self) -> int:
        """Index of the server host (after the W workers)."""
        return self.num_hosts

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
            node = 0 if i >= self.num_hosts else i * 2 // self.num_hosts  # the server sits on node 0
            bridge = bridges[0] if self.layout == "flat" else bridges[node]
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

    def trunk_bytes(self) -> tuple[int, int]:
        """Bytes that left node 0 and node 1 through the trunk so far (everything: payload, headers, handshakes)."""
        if self.layout != "nodes":
            return 0, 0
        sent = []
        for device in ("trunk0", "trunk1"):
            (link,) = json.loads(sh("ip", "-n", self.switch, "-s", "-j", "link", "show", "dev", device).stdout)
            sent.append(link["stats64"]["tx"]["bytes"])  # trunk<i> is node i's bridge port: it sends node i's out
        return sent[0], sent[1]

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


def start_store(hosts: Hosts, work_dir: str) -> subprocess.Popen:
    """moto's S3 server on the server host; returns once its bucket exists."""
    log_path = os.path.join(work_dir, "store_server.txt")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root"),
           "PYTHONPATH": REPO}
    proc = hosts.popen(hosts.server, [sys.executable, STORE_SERVER, "--address", hosts.address(hosts.server),
                                      "--port", str(STORE_PORT), "--bucket", STORE_BUCKET], env, log_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if "ready" in open(log_path).read():
            return proc
        time.sleep(0.2)
    raise RuntimeError(f"the store server did not start:\n{open(log_path).read()[-3000:]}")


def run_method(hosts: Hosts, name: str, method: str, rate: str, args, extra: list[str]) -> dict:
    """Start one worker per host, wait (bounded), return each rank's record and the bytes across the trunk.

    `codistill_store` is two launches (one per group, each its own world); the run ends when group 0 ends, and group
    1 is stopped then (it would train on alone)."""
    out = os.path.join(args.work_dir, f"{name}-{rate}")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    base = {"MASTER_PORT": "29500", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "GLOO_SOCKET_IFNAME": "eth0",
            "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": REPO,
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root"),
            "HOST_ADDRS": ",".join(hosts.address(i) for i in range(hosts.num_hosts))}
    command = ["timeout", "--kill-after=10", str(args.run_timeout), sys.executable, WORKER, "--method", method,
               "--output_dir", out, *extra]
    launches = []  # (ranks, environment per rank, extra arguments)
    if method == "codistill_store":
        half = hosts.num_hosts // 2
        store = {"AWS_ENDPOINT_URL": f"http://{hosts.address(hosts.server)}:{STORE_PORT}",
                 "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        for group in (0, 1):
            ranks = range(group * half, (group + 1) * half)
            launches.append((ranks, [{**base, **store, "MASTER_ADDR": hosts.address(ranks[0]), "WORLD_SIZE": str(half),
                                      "RANK": str(rank - ranks[0])} for rank in ranks],
                             ["--group_index", str(group), "--peer_store", f"s3://{STORE_BUCKET}/{name}-{rate}"]))
    else:
        ranks = range(hosts.num_hosts)
        launches.append((ranks, [{**base, "MASTER_ADDR": hosts.address(0), "WORLD_SIZE": str(hosts.num_hosts),
                                  "RANK": str(rank)} for rank in ranks], []))
    before = hosts.trunk_bytes()
    procs = {rank: hosts.popen(rank, [*command, *more], env, os.path.join(out, f"log{rank}.txt"))
             for ranks, envs, more in launches for rank, env in zip(ranks, envs)}
    deadline = time.monotonic() + args.run_timeout + 30
    for rank in launches[0][0]:
        procs[rank].wait(timeout=max(1.0, deadline - time.monotonic()))
    after = hosts.trunk_bytes()
    for ranks, _, _ in launches[1:]:
        for rank in ranks:
            if procs[rank].poll() is None:
                os.killpg(procs[rank].pid, signal.SIGTERM)
            procs[rank].wait(timeout=60)
    failed = [rank for rank in launches[0][0] if procs[rank].returncode != 0]
    if failed:
        tail = open(os.path.join(out, f"log{failed[0]}.txt")).read()[-3000:]
        raise RuntimeError(f"{name} at {rate}: ranks {failed} failed (exit {procs[failed[0]].returncode}):\n{tail}")
    records = [json.load(open(os.path.join(out, f"rank{rank}.json"))) for rank in launches[0][0]]
    return {**records[0], "trunk_bytes": [a - b for a, b in zip(after, before)], "load_average": os.getloadavg(),
            "records": records}


def trunk_formula(name: str, every: int, model_bytes: int, num_hosts: int) -> float:
    """Bytes per training step that each direction of the trunk carries, by the algorithm (payload only).

    DDP: a ring all-reduce over W workers in two blocks crosses the boundary once each way and moves 2(W-1)/W P
    over each ring edge. Codistillation (sharded exchange, and the store mode: group 1 writes its model and reads
    group 0's) and local SGD (sharded average): one model P per node and direction per sync. torchft's DiLoCo: each
    of the n = W/2 columns all-reduces a whole model over 2 replicas (P per rank and direction): n P per sync."""
    if name == "allreduce":
        return 2 * (num_hosts - 1) / num_hosts * model_bytes
    per_sync = model_bytes * (num_hosts // 2 if name.startswith("diloco") else 1)
    return per_sync / every


def summarise(results: dict, settings: dict) -> list[dict]:
    rows = []
    full_target = None
    for rate, runs in results.items():
        allreduce = runs["allreduce"]
        projected = allreduce["projected"]
        if not projected:
            full_target = full_target or allreduce
        reference = full_target  # a projected all-reduce run follows the full one's trajectory
        target = (allreduce if not projected else reference)["evals"][-1]["eval_loss"]
        model_bytes = 4 * allreduce["parameters"]
        for name, run in runs.items():
            train_only = run["train_seconds"] - run["eval_seconds"]
            steps_per_second = run["steps"] / train_only
            if name == "allreduce" and projected:
                # The steps after its first evaluation at the pace between its two (start-up and the initial
                # broadcast of the model excluded), plus the full run's evaluation time.
                first, last = run["evals"][-2:]
                seconds_per_step = ((last["train_seconds_at_eval"] - first["train_seconds_at_eval"])
                                    / (last["step"] - first["step"]))
                steps_per_second = 1 / seconds_per_step
                evals = reference["evals"]
                train = last["train_seconds_at_eval"] + (evals[-1]["step"] - last["step"]) * seconds_per_step
                hit = {**evals[-1], "seconds": train + reference["eval_seconds"], "train_seconds_at_eval": train}
            else:
                evals = run["evals"]
                hit = evals[-1] if name == "allreduce" else next((e for e in evals if e["eval_loss"] <= target), None)
            sent = run["trunk_bytes"]
            rows.append({
                "rate": rate, "run": name, "method": LABELS[name], "every": run["every"], "target_loss": target,
                "steps": run["steps"], "steps_per_second": steps_per_second,
                "projected": name == "allreduce" and projected, "final_eval_loss": evals[-1]["eval_loss"],
                "final_eval_accuracy": evals[-1]["eval_accuracy"],
                "wall_to_target": hit["seconds"] if hit else None,
                "train_to_target": hit["train_seconds_at_eval"] if hit else None,
                "steps_to_target": hit["step"] if hit else None,
                "trunk_bytes_per_step_formula": trunk_formula(name, run["every"], model_bytes, settings["num_hosts"]),
                "trunk_bytes_per_step_measured": (sent[0] + sent[1]) / 2 / run["steps"], "trunk_bytes": sent,
                "load_average": run["load_average"],
            })
        ours = [r for r in rows if r["rate"] == rate]
        base = ours[0]["wall_to_target"]
        diloco = next((r["wall_to_target"] for r in ours if r["run"] == "diloco"), None)
        for r in ours:
            r["vs_allreduce"] = r["wall_to_target"] / base if r["wall_to_target"] else None
            r["vs_diloco"] = r["wall_to_target"] / diloco if r["wall_to_target"] and diloco else None
    return rows


def markdown(rows: list[dict]) -> str:
    def number(value, spec, missing="-"):
        return missing if value is None else format(value, spec)

    lines = ["| link | method | k or H | trunk MB/step, each way: by formula / measured | steps/s | steps to target "
             "| wall-clock to target (s) | of which training (s) | wall-clock vs all-reduce | vs DiLoCo "
             "| final eval loss / acc | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        reached = r["wall_to_target"] is not None
        star = " (projected)" if r["projected"] else ""
        lines.append(
            f"| {r['rate']} | {r['method']} | {r['every'] or '-'} | "
            f"{r['trunk_bytes_per_step_formula'] / 1e6:.3f} / {r['trunk_bytes_per_step_measured'] / 1e6:.3f} | "
            f"{r['steps_per_second']:.2f} | {r['steps_to_target'] if reached else 'not reached'} | "
            f"{number(r['wall_to_target'], '.1f')}{star} | {number(r['train_to_target'], '.1f')} | "
            f"{number(r['vs_allreduce'], '.2f')} | {number(r['vs_diloco'], '.2f')} | "
            f"{r['final_eval_loss']:.3f} / {r['final_eval_accuracy']:.3f} | {r['load_average'][0]:.1f} |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"allreduce": ("C0", "o-"), "codistill": ("C1", "s-"), "codistill_store": ("C1", "x:"),
              "localsgd": ("C2", "^-"), "localsgd_own": ("C2", "^--"), "diloco": ("C3", "v-"),
              "diloco_own": ("C3", "v--")}
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    target = None
    for ax, (rate, runs) in zip(axes[0], results.items()):
        for name, run in runs.items():
            evals = run["evals"]
            if run["projected"]:
                continue
            color, style = styles[name]
            every = f", {'k' if name.startswith('codistill') else 'H'}={run['every']}" if run["every"] else ""
            ax.plot([e["seconds"] for e in evals], [e["eval_loss"] for e in evals], style, color=color, ms=4,
                    label=f"{LABELS[name]}{every}")
        if not runs["allreduce"]["projected"]:
            target = runs["allreduce"]["evals"][-1]["eval_loss"]
        else:
            ax.set_title("(all-reduce projected, not plotted)", fontsize=8, loc="right")
        if target is not None:
            ax.axhline(target, color="gray", lw=0.8, ls=":", label="all-reduce final eval loss")
        ax.set(title=f"trunk between nodes: {rate}", xlabel="wall-clock seconds", ylabel="eval loss (group/replica 0)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="Tiny model, one link speed, a few steps.")
    parser.add_argument("--rates", default="1gbit,100mbit,10mbit", help="Link speeds, as tc spells them.")
    parser.add_argument("--runs", default=",".join(ALL_RUNS), help=f"Which runs, of {', '.join(ALL_RUNS)}.")
    parser.add_argument("--layout", choices=["nodes", "flat"], default="nodes")
    parser.add_argument("--num_hosts", type=int, default=4)
    parser.add_argument("--max_steps", type=int, default=200, help="Steps of the all-reduce run.")
    parser.add_argument("--other_max_steps", type=int, default=400,
                        help="Cap on the steps of the other runs, which stop at the target.")
    parser.add_argument("--short_rates", default="10mbit",
                        help="Speeds at which the all-reduce run is projected from --short_steps steps.")
    parser.add_argument("--short_steps", type=int, default=10, help="Steps of a projected all-reduce run.")
    parser.add_argument("--short_rate_runs", default="allreduce,codistill,localsgd,diloco,codistill_store",
                        help="The runs at the --short_rates, instead of --runs (the own-setting runs would take far "
                        "too long there); allreduce first.")
    parser.add_argument("--eval_steps", type=int, default=25)
    parser.add_argument("--batch_size", type=int, default=32, help="Per worker, every method.")
    parser.add_argument("--hidden_size", type=int, default=192)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--sync_every", type=int, default=25,
                        help="k of codistillation; local SGD and DiLoCo get the H that moves as many bytes.")
    parser.add_argument("--localsgd_own_every", type=int, default=8,
                        help="H of `localsgd_own` (accelerate's local SGD example: 8).")
    parser.add_argument("--diloco_own_outer_steps", type=int, default=128,
                        help="`diloco_own` syncs this many times in --max_steps steps (DiLoCo: H=500 over 64k).")
    parser.add_argument("--run_timeout", type=int, default=900, help="Seconds any one run may take.")
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="Where results and the plot go.")
    parser.add_argument("--work_dir", default=os.path.join(tempfile.gettempdir(), "slow_network_runs"),
                        help="Where each run's logs and per-rank records go.")
    args = parser.parse_args()
    common = ["--eval_steps", str(args.eval_steps), "--batch_size", str(args.batch_size), "--hidden_size",
              str(args.hidden_size), "--num_layers", str(args.num_layers)]
    runs = args.runs.split(",")
    if args.smoke:
        args.rates, args.short_rates, args.max_steps, args.other_max_steps = "100mbit", "", 6, 6
        args.sync_every, args.run_timeout = 3, 240
        runs = [name for name in runs if not name.endswith("_own")]
        common = ["--eval_steps", "3", "--batch_size", "8", "--hidden_size", "32", "--num_layers", "1",
                  "--num_train", "2000", "--num_eval", "100"]
    missing = {name: NEEDS[name] for name in runs if name in NEEDS and importlib.util.find_spec(NEEDS[name]) is None}
    for name, package in missing.items():
        print(f"skipping {name}: it needs `{package}` (pip install {package})", flush=True)
    runs = [name for name in runs if name not in missing]
    if runs[0] != "allreduce":
        raise SystemExit("--runs must start with allreduce: its final eval loss is everyone's target.")
    k, half = args.sync_every, args.num_hosts // 2
    every = {"allreduce": 0, "codistill": k, "codistill_store": k, "localsgd": k, "diloco": half * k,
             "localsgd_own": args.localsgd_own_every,
             "diloco_own": max(1, round(args.max_steps / args.diloco_own_outer_steps))}
    if os.geteuid() != 0:
        raise SystemExit("run.py needs root: it creates network namespaces and shapes links with tc.")
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work_dir, exist_ok=True)

    def interrupted(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    hosts = Hosts(args.num_hosts, args.layout, server="codistill_store" in runs)
    results, target = {}, None

    def save() -> list[dict]:
        """Write what has run so far (a later failure keeps it)."""
        rows = summarise(results, vars(args))
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"settings": vars(args), "skipped": missing, "rows": rows, "runs": results}, f, indent=1)
        return rows

    try:
        hosts.up()
        if "codistill_store" in runs:
            start_store(hosts, args.work_dir)
        for rate in args.rates.split(","):
            hosts.shape(rate)
            results[rate] = {}
            short = rate in args.short_rates.split(",")
            for name in [name for name in args.short_rate_runs.split(",") if name not in missing] if short else runs:
                method = name.removesuffix("_own")
                if name == "allreduce":
                    extra = [*common, "--max_steps", str(args.max_steps)]
                    if short:  # two evaluations time the steps between them
                        extra += ["--max_steps", str(args.short_steps), "--eval_steps", str(args.short_steps // 2)]
                else:
                    extra = [*common, "--max_steps", str(args.other_max_steps), "--sync_every", str(every[name]),
                             "--target_loss", str(target)]
                run = run_method(hosts, name, method, rate, args, extra)
                run["every"], run["projected"] = every[name], name == "allreduce" and short
                results[rate][name] = run
                if name == "allreduce" and not short:
                    target = run["evals"][-1]["eval_loss"]
                loss = run["evals"][-1]["eval_loss"] if run["evals"] else "-"
                print(f"{rate}: {name} (every {every[name]}) stopped at step {run['steps']} after "
                      f"{run['train_seconds']:.1f} s, eval loss {loss}, trunk bytes {run['trunk_bytes']}, "
                      f"load {run['load_average'][0]:.1f}", flush=True)
                save()
    finally:
        hosts.down()
    rows = save()
    plot(results, os.path.join(args.out, "eval_loss_vs_time.png"))
    print(markdown(rows))


if __name__ == "__main__":
    main()
