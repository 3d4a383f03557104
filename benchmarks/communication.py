#!/usr/bin/env python
"""Bytes crossing group boundaries per step: codistillation (sharded and whole-model exchange) vs. DDP all-reduce.

Launches short real runs of a ViT on scikit-learn's digits under torchrun on CPU (gloo) and reads what was moved:
the peer exchange's counters (`PeerCopies.bytes_sent`, the trainer's logged `peer_exchange_bytes_sent`) and, through
a DDP communication hook, the gradient bytes every all-reduce carries.

    python benchmarks/communication.py            # W=4: DDP over 4 workers vs codistill 2 groups x 2, k=10
    python benchmarks/communication.py --smoke    # a few steps of DDP and the sharded exchange, for the test suite
    python benchmarks/communication.py --modes ddp,codistill_sharded_int8   # some of the modes

Ring all-reduce sends 2(W-1)/W x P bytes per rank and step, and with the W ranks in G blocks of n (nodes), one ring
edge leaves every block, carrying that much across its boundary each step. Codistillation moves nothing across
groups between exchanges; an exchange costs each group (G-1) x P sharded, n x (G-1) x P unsharded.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("ddp", "codistill_sharded", "codistill_unsharded", "codistill_sharded_bf16", "codistill_sharded_int8")
PEER_DTYPES = {"bf16": "bfloat16", "int8": "int8"}  # a mode's suffix: the peers' `codistill_peer_dtype`


def peer_dtype(mode: str) -> str | None:
    return PEER_DTYPES.get(mode.rsplit("_", 1)[-1])


def run_worker(args):
    import torch
    from sklearn.datasets import load_digits
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from transformers import TrainerCallback, ViTConfig, ViTForImageClassification, set_seed

    sys.path.insert(0, REPO)
    from hf_codistill import CodistillTrainer, CodistillTrainingArguments
    from hf_codistill.exchange import exchanged_tensors

    codistill = args.mode != "ddp"
    sharded = args.mode.startswith("codistill_sharded")
    training_args = CodistillTrainingArguments(
        output_dir=os.path.join(args.results, "out"), codistill=codistill, num_groups=args.num_groups,
        codistill_sync_every=args.sync_every, codistill_sharded_exchange=sharded, use_cpu=True,
        codistill_peer_dtype=peer_dtype(args.mode),
        max_steps=args.steps, per_device_train_batch_size=16, learning_rate=1e-3, logging_steps=args.steps,
        save_strategy="no", report_to="none", disable_tqdm=True,
    )

    digits = load_digits()
    pixels = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    data = [{"pixel_values": p, "labels": int(y)} for p, y in zip(pixels, digits.target)]
    set_seed(training_args.group_seed)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=args.hidden_size, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=2 * args.hidden_size, num_labels=10)
    model = ViTForImageClassification(config)
    trainer = CodistillTrainer(model=model, args=training_args, train_dataset=data)

    reduced = {"bytes": 0}

    def counting_allreduce(state, bucket):
        reduced["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
        return default_hooks.allreduce_hook(None, bucket)

    counters = {}

    class Meter(TrainerCallback):
        def on_train_begin(self, *_, **__):
            # After CodistillTrainer's own callback, i.e. after the first exchange: count from here.
            wrapped = trainer.model_wrapped
            if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
                wrapped.register_comm_hook(None, counting_allreduce)
            peers = trainer.peer_copies
            counters["start"] = (peers.bytes_sent, peers.group_bytes_received, peers.num_exchanges) if peers else None

    trainer.add_callback(Meter())
    trainer.train()
    peers = trainer.peer_copies
    if codistill and peers.sharded != (sharded and trainer.group_size > 1):
        raise RuntimeError(f"asked for sharded={sharded}, the trainer's peers have sharded={peers.sharded}")
    logged = [e for e in trainer.state.log_history if "peer_exchange_bytes_sent" in e]
    world_rank = int(os.environ.get("CODISTILL_WORLD_RANK", os.environ.get("RANK", "0")))
    result = {
        "mode": args.mode, "world_rank": world_rank, "steps": trainer.state.global_step,
        "group_index": trainer.group_index, "group_size": trainer.group_size, "num_groups": trainer.num_groups,
        "model_bytes": sum(t.numel() * t.element_size() for t in exchanged_tensors(trainer.model).values()),
        "allreduced_bytes": reduced["bytes"],
    }
    if codistill:
        sent0, group0, exchanges0 = counters["start"]
        result.update(cross_sent=peers.bytes_sent - sent0, group_received=peers.group_bytes_received - group0,
                      exchanges=peers.num_exchanges - exchanges0, sharded=peers.sharded,
                      logged_bytes_sent=logged[-1]["peer_exchange_bytes_sent"] if logged else None,
                      total_bytes_sent=peers.bytes_sent)
    with open(os.path.join(args.results, f"rank{world_rank}.json"), "w") as f:
        json.dump(result, f)
    if not codistill:
        from benchmarks.plain_exit import exit_plain_worker

        exit_plain_worker()


def launch(mode, args, root):
    results = os.path.join(root, mode)
    os.makedirs(results, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
               "--master_port", str(args.port + MODES.index(mode)), os.path.abspath(__file__), "--worker",
               "--mode", mode, "--results", results, "--steps", str(args.steps), "--sync_every", str(args.sync_every),
               "--num_groups", str(args.num_groups), "--hidden_size", str(args.hidden_size)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "CODISTILL_WORLD_SIZE", "CODISTILL_WORLD_RANK"):
        env.pop(key, None)
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return [json.load(open(path)) for path in sorted(glob.glob(os.path.join(results, "rank*.json")))]


def summarise(mode, ranks):
    """Per step: bytes a rank sends across group boundaries, what a whole group sends, and intra-group bytes."""
    first = ranks[0]
    steps, world = first["steps"], len(ranks)
    if mode == "ddp":
        # Ring all-reduce over all W ranks; with the ranks in blocks of n, one ring edge leaves each block.
        wire = 2 * (world - 1) / world * first["allreduced_bytes"] / steps
        return {"mode": "DDP all-reduce over W", "model_bytes": first["model_bytes"], "rank_cross": wire,
                "group_cross": wire, "rank_intra": 0.0, "exchanges": "-"}
    group = [r for r in ranks if r["group_index"] == 0]
    n = first["group_size"]
    # Intra-group: the group's own DDP gradient all-reduce (ring over n) plus, sharded, the shard all-gather.
    intra = 2 * (n - 1) / n * first["allreduced_bytes"] / steps + first["group_received"] / steps
    label = "codistill, sharded exchange" if first["sharded"] else "codistill, whole-model exchange"
    label += {"bfloat16": ", bfloat16 peers", "int8": ", int8 peers (float32 scale per row)"}.get(peer_dtype(mode), "")
    return {"mode": f"{label} (k={first['steps'] // max(1, first['exchanges'])})", "model_bytes": first["model_bytes"],
            "rank_cross": first["cross_sent"] / steps, "group_cross": sum(r["cross_sent"] for r in group) / steps,
            "rank_intra": intra, "exchanges": first["exchanges"]}


def table(rows, world, num_groups):
    ddp = next(r for r in rows if r["mode"].startswith("DDP"))
    lines = [f"W = {world} workers, G = {num_groups} groups of {world // num_groups}; model P = "
             f"{ddp['model_bytes'] / 1e6:.3f} MB; bytes per optimizer step, measured over the run",
             "",
             "| method | cross-group bytes / step, per rank | per group (node) | intra-group bytes / step, per rank "
             "| cross-group vs DDP |",
             "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['mode']} | {row['rank_cross'] / 1e3:,.1f} kB | {row['group_cross'] / 1e3:,.1f} kB | "
                     f"{row['rank_intra'] / 1e3:,.1f} kB | {row['group_cross'] / ddp['group_cross']:.4f}x |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="A few steps of each mode (the test suite's run).")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--results", help=argparse.SUPPRESS)
    parser.add_argument("--nproc", type=int, default=4, help="W, the number of worker processes.")
    parser.add_argument("--num_groups", type=int, default=2, help="G for the codistillation runs.")
    parser.add_argument("--steps", type=int, default=40, help="Optimizer steps per run (a multiple of k).")
    parser.add_argument("--sync_every", type=int, default=10, help="k, steps between exchanges.")
    parser.add_argument("--hidden_size", type=int, default=64, help="ViT width (P grows with its square).")
    parser.add_argument("--port", type=int, default=29630)
    parser.add_argument("--timeout", type=int, default=300, help="Seconds each launched run may take.")
    parser.add_argument("--modes", default=",".join(MODES), help="Comma-separated modes to run (ddp first: the "
                        "table's reference).")
    parser.add_argument("--json", help="Also write the rows to this file.")
    args = parser.parse_args()
    if args.worker:
        return run_worker(args)
    if args.smoke:
        args.steps, args.sync_every, args.hidden_size = 4, 2, 32
    with tempfile.TemporaryDirectory() as root:
        # The smoke run skips the whole-model exchange (tests/test_exchange_sharded.py compares the two paths).
        modes = MODES[:2] if args.smoke else args.modes.split(",")
        rows = [summarise(mode, launch(mode, args, root)) for mode in modes]
    print(table(rows, args.nproc, args.num_groups))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
