#!/usr/bin/env python
"""Peak memory per rank of sharded (FSDP2) and replicated (DDP) groups, plain training vs codistillation (issue 14).

For each G (groups) and n (ranks per group) this launches W = G x n processes on this machine (gloo on the CPU,
NCCL on GPUs, one configuration at a time) and, for each of {DDP, FSDP2} x {plain, codistill}, trains a GPT-2
causal LM built from a config for a few AdamW steps on random tokens, at the library level (`fully_shard` applied
directly, as `tests/scripts/sharded_peers.py` does: accelerate does not apply FSDP on the CPU):

- DDP: every rank holds the whole model (`DistributedDataParallel` over its group); codistillation holds each peer
  whole (`PeerCopies`: frozen copies, refreshed by the sharded exchange when n > 1).
- FSDP2: `fully_shard` on every transformer block and on the root over the group's n ranks, the student built on
  the meta device and only its shards materialised; codistillation holds each peer sharded the same way
  (`PeerCopies` -> `sharding.sharded_peer`), exchanged shard to shard over the column.
- codistill: the peers' forward and the distillation term as the trainer's engine computes them
  (`peer_forward.peer_logits_for_term`, `losses.distillation_to_peers`, KL, alpha 1), and an exchange at the start
  and every `--sync_every` optimizer steps (after `zero_grad`, as the trainer refreshes after a step).

What is measured, per rank, over the training window (everything after the models, optimizer and peers are built:
the exchanges, forward, distillation term, backward, optimizer step), never over the set-up:

- CPU: the peak anonymous resident memory above the process's own after imports and process-group set-up, i.e.
  `VmHWM` (peak RSS, reset through `/proc/self/clear_refs` when the window opens and at each phase) minus the
  file-backed and shared pages at the end of the window (shared libraries: the same in every mode) minus `RssAnon`
  at the baseline. glibc's mmap threshold is fixed at 64 KiB (`MALLOC_MMAP_THRESHOLD_`) so that a freed tensor
  leaves the RSS and the peak follows the tensors alive at once, not what the allocator kept.
- CUDA: `torch.cuda.max_memory_allocated()` over the window minus `memory_allocated()` at the baseline (zero): one
  GPU per rank, so configurations with more ranks than GPUs are skipped.

The peers' share is codistill - plain (same G, n, method); FSDP2's should fall as 1/n ((G-1) x P/n held per rank)
while DDP's stays (G-1) x P. Exchanges and steps are also reported apart (the peak of each phase).

    python benchmarks/sharded_memory.py                 # the table: G in {2,4} x n in {1,2,4}, 12 min on 2 cores
    python benchmarks/sharded_memory.py --smoke         # tiny model, G=2, n in {1,2}, one step (seconds)

Writes `benchmarks/results/sharded_memory.json` (or `--json PATH`) and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results", "sharded_memory.json")
MB = 1e6
METHODS = ("DDP", "FSDP2")
MODES = ("plain", "codistill")


# ---- Memory probes ------------------------------------------------------------------------------------------------

def proc_status() -> dict[str, int]:
    """Memory fields of /proc/self/status, in bytes."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                fields[key] = int(value.split()[0]) * 1024
    return fields


class Probe:
    """Peak memory of the window's phases: CPU from the kernel's RSS high-water mark, CUDA from the allocator."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.resettable = True
        self.peaks: dict[str, int] = {}
        if cuda:
            import torch

            torch.cuda.synchronize()
            self.baseline = {"allocated": torch.cuda.memory_allocated()}
        else:
            self.baseline = proc_status()

    def reset(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            # "5": reset the peak RSS (VmHWM) to the current RSS (Linux >= 4.0). Where that is refused the peaks
            # run from the process's start (the set-up included), and `summary` says so.
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                self.resettable = False

    def end_phase(self, phase: str) -> None:
        """Record the peak since the last reset under `phase`, then reset."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = proc_status()["VmHWM"]
        self.peaks[phase] = max(self.peaks.get(phase, 0), peak)
        self.reset()

    def summary(self) -> dict:
        """Peaks above the baseline, per phase and overall, and the memory held at the end of the window."""
        if self.cuda:
            import torch

            base = self.baseline["allocated"]
            held = torch.cuda.memory_allocated() - base
            return {"peak_by_phase": {p: v - base for p, v in self.peaks.items()},
                    "peak": max(self.peaks.values()) - base, "held_at_end": held, "baseline": base,
                    "measure": "cuda max_memory_allocated"}
        end = proc_status()
        shared = end["RssFile"] + end["RssShmem"]  # libraries paged in: not the model's
        base = self.baseline["RssAnon"]
        return {"peak_by_phase": {p: v - shared - base for p, v in self.peaks.items()},
                "peak": max(self.peaks.values()) - shared - base, "held_at_end": end["RssAnon"] - base,
                "baseline": base, "baseline_rss": self.baseline["VmRSS"],
                "file_pages_growth": shared - self.baseline["RssFile"] - self.baseline["RssShmem"],
                "measure": "peak RSS - file/shared pages - RssAnon after imports"
                + ("" if self.resettable else " (peak not resettable here: set-up included)")}


# ---- One rank ---------------------------------------------------------------------------------------------------

def gpt2_config(spec: dict):
    from transformers import GPT2Config

    return GPT2Config(n_embd=spec["n_embd"], n_layer=spec["n_layer"], n_head=spec["n_head"],
                      vocab_size=spec["vocab"], n_positions=spec["seq"], bos_token_id=0, eos_token_id=0)


def build_student(method: str, spec: dict, group: int, device):
    """The group's model: whole and wrapped in DDP, or built on meta and sharded per block + root (FSDP2)."""
    import torch
    from transformers import GPT2LMHeadModel

    config = gpt2_config(spec)
    generator = torch.Generator().manual_seed(1000 + group)  # the groups' models differ
    if method == "DDP":
        torch.manual_seed(1000 + group)
        model = GPT2LMHeadModel(config).to(device)
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        return wrapped, model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device=device)
    with torch.no_grad():  # GPT-2's initialisation, on this rank's shards only (values do not matter for memory)
        for name, param in model.named_parameters():
            local = param.to_local() if isinstance(param, DTensor) else param
            if name.endswith("bias"):
                local.zero_()
            elif ".ln_" in name or name.startswith("transformer.ln_f"):
                local.fill_(1.0)
            else:
                local.copy_(torch.randn(local.shape, generator=generator) * 0.02)
    return model, model


def tensor_bytes(tensors) -> int:
    """Bytes this rank holds for `tensors` (a DTensor's local shard, not its global size)."""
    from torch.distributed.tensor import DTensor

    tensors = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in tensors)


def worker(spec: dict) -> None:
    import torch
    import torch.distributed as dist

    from hf_codistill import exchange
    from hf_codistill.exchange import PeerCopies, exchanged_tensors
    from hf_codistill.losses import distillation_to_peers
    from hf_codistill.peer_forward import peer_logits_for_term
    from hf_codistill.topology import destroy_groups, init_groups

    cuda = spec["device"] == "cuda"
    exchange.EXCHANGE_BUCKET_BYTES = spec["bucket_bytes"]
    torch.set_num_threads(1)
    topology = init_groups(spec["G"], backend="nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    dist.barrier()
    probe = Probe(cuda)  # baseline: imports, process groups, nothing of the model

    method, mode, group = spec["method"], spec["mode"], topology.group_index
    began = time.perf_counter()
    wrapped, model = build_student(method, spec, group, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    peers = None
    if mode == "codistill":
        peers = PeerCopies(model, topology)  # sharded like the student under FSDP2, whole copies under DDP
        peers.check_compatible()
    generator = torch.Generator().manual_seed(7 + topology.world_rank)
    batches = [torch.randint(0, spec["vocab"], (spec["batch"], spec["seq"]), generator=generator).to(device)
               for _ in range(2)]
    dist.barrier()
    setup_s = time.perf_counter() - began

    probe.reset()  # the window opens: the set-up's transients are not counted, what it left resident is
    began = time.perf_counter()
    if peers is not None:
        peers.exchange(model, step=0)  # the trainer's first refresh
        probe.end_phase("exchange")
    losses = []
    for step in range(1, spec["steps"] + 1):
        ids = batches[step % len(batches)]
        wrapped.train()
        out = wrapped(input_ids=ids, labels=ids)
        loss = out.loss
        if peers is not None:
            def no_grad():
                return torch.no_grad()

            peer_logits = (peer_logits_for_term(peer, {"input_ids": ids}, out.logits, ids, True, None, no_grad)
                           for peer in peers.models())
            loss = loss + distillation_to_peers(out.logits, peer_logits, ids, True, "kl", 1.0)
        del out
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        del loss
        probe.end_phase("step")
        if peers is not None and step % spec["sync_every"] == 0:
            peers.exchange(model, step=step)
            probe.end_phase("exchange")
    dist.barrier()
    window_s = time.perf_counter() - began
    memory = probe.summary()

    own = exchanged_tensors(model)  # this rank's shards under FSDP2, the whole model under DDP
    whole = sum(p.numel() for p in model.parameters())  # a DTensor's numel is the global size
    optimizer_bytes = tensor_bytes(t for state in optimizer.state.values() for t in state.values()
                                   if isinstance(t, torch.Tensor) and t.dim() > 0)
    result = {
        "world_rank": topology.world_rank, "group": group, "group_rank": topology.group_rank,
        "losses": losses, "setup_s": setup_s, "window_s": window_s, **memory,
        "model_params": whole, "own_bytes": tensor_bytes(own.values()), "optimizer_bytes": optimizer_bytes,
        "peer_bytes": tensor_bytes(t for peer in (peers.models() if peers else [])
                                   for t in exchanged_tensors(peer).values()),
        "exchanges": peers.num_exchanges if peers else 0,
        "exchange_bytes_sent": peers.bytes_sent if peers else 0,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
    }
    with open(os.path.join(spec["out"], f"rank{topology.world_rank}.json"), "w") as f:
        json.dump(result, f)
    del peers, wrapped, model, optimizer
    destroy_groups()  # a forked rank exits without running atexit handlers


# ---- The launcher -----------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _rank_main(spec: dict, rank: int, world: int, port: int) -> None:
    """One rank in a child process: the launcher's environment (env:// on localhost), then `worker`."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "LOCAL_RANK": str(rank if spec["device"] == "cuda" else 0)})
    for key in ("CODISTILL_WORLD_SIZE", "CODISTILL_WORLD_RANK", "CODISTILL_NUM_GROUPS"):
        os.environ.pop(key, None)
    worker(spec)


def launch(spec: dict, timeout: float) -> list[dict]:
    """W = G x n ranks of `worker(spec)`, each its own process; each rank's result.

    On the CPU the ranks are forked from this process, which has imported torch, transformers and the package
    already: no rank pays the imports (7 s of CPU each), and their pages are shared until written (the baseline each
    rank subtracts is measured in the rank, after the fork). CUDA ranks are spawned (no CUDA state is forked)."""
    import multiprocessing

    world = spec["G"] * spec["n"]
    context = multiprocessing.get_context("spawn" if spec["device"] == "cuda" else "fork")
    with tempfile.TemporaryDirectory(prefix="sharded_memory_") as out:
        spec = {**spec, "out": out}
        port = free_port()
        procs = [context.Process(target=_rank_main, args=(spec, rank, world, port), daemon=False)
                 for rank in range(world)]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + timeout
        failed = None
        for rank, proc in enumerate(procs):
            proc.join(timeout=max(1.0, deadline - time.monotonic()))
            code = proc.exitcode if proc.exitcode is not None else "timeout"
            if code != 0:
                failed = (rank, code)
                break
        if failed is not None:
            for proc in procs:  # only the processes started here, by their handles
                if proc.is_alive():
                    proc.kill()
                    proc.join()
            raise RuntimeError(f"{spec['method']} {spec['mode']} G={spec['G']} n={spec['n']}: rank {failed[0]} "
                               f"ended with {failed[1]} (its traceback is above)")
        return [json.load(open(os.path.join(out, f"rank{rank}.json"))) for rank in range(world)]


def model_params(spec: dict) -> int:
    import torch
    from transformers import GPT2LMHeadModel

    with torch.device("meta"):
        return sum(p.numel() for p in GPT2LMHeadModel(gpt2_config(spec)).parameters())


def estimate_need(spec: dict, param_bytes: int) -> int:
    """A generous guess of what a configuration needs (bytes), from a first measurement (G=4, n=1): per rank 0.15
    GB of its own beside the pages shared with this process, and up to 6 model sizes for plain training (model,
    gradients, DDP's buckets, Adam) plus 3.5 per peer for codistillation (the copy, and the exchange's buffers,
    which peak at about 3 model sizes per peer on gloo)."""
    world, G, n = spec["G"] * spec["n"], spec["G"], spec["n"]
    models = 6 + (3.5 * (G - 1) if spec["mode"] == "codistill" else 0)
    per_rank = 0.15e9 + models * param_bytes / (n if spec["method"] == "FSDP2" else 1)
    return int(world * per_rank)


def summarise(rows: list[dict], param_bytes: int) -> dict:
    """Peers' share (codistill - plain) and ratio per G, n, method; the 1/n fall and the 1.3x target."""
    by = {(r["G"], r["n"], r["method"], r["mode"]): r for r in rows}
    pairs = []
    for (G, n, method, mode), row in sorted(by.items()):
        if mode != "codistill" or (G, n, method, "plain") not in by:
            continue
        plain = by[(G, n, method, "plain")]
        expected = (G - 1) * param_bytes / (n if method == "FSDP2" else 1)
        pairs.append({"G": G, "n": n, "method": method, "plain_peak": plain["peak"], "codistill_peak": row["peak"],
                      "peers_share": row["peak"] - plain["peak"], "ratio": row["peak"] / plain["peak"],
                      "steps_ratio": row["peak_by_phase"]["step"] / plain["peak_by_phase"]["step"],
                      "held_share": row["held_at_end"] - plain["held_at_end"],
                      "peers_expected": expected})
    falls = []
    for pair in pairs:
        first = next((p for p in pairs if p["G"] == pair["G"] and p["method"] == pair["method"] and p["n"] == 1), None)
        if first is not None and pair["n"] > 1:
            falls.append({"G": pair["G"], "n": pair["n"], "method": pair["method"],
                          "share_fraction_of_n1": pair["peers_share"] / first["peers_share"],
                          "held_fraction_of_n1": pair["held_share"] / first["held_share"],
                          "expected_fraction": 1 / pair["n"] if pair["method"] == "FSDP2" else 1.0})
    target = [{"n": p["n"], "ratio": p["ratio"], "within_1_3": p["ratio"] <= 1.3, "steps_ratio": p["steps_ratio"]}
              for p in pairs if p["G"] == 2 and p["method"] == "FSDP2"]
    return {"pairs": pairs, "falls": falls, "target_fsdp2_g2": target}


def print_tables(result: dict) -> None:
    rows, summary, meta = result["rows"], result["summary"], result["meta"]
    pairs = {(p["G"], p["n"], p["method"]): p for p in summary["pairs"]}
    print(f"\nGPT-2 {meta['n_layer']} x {meta['n_embd']}, vocabulary {meta['vocab']}: P = {meta['model_params']:,} "
          f"parameters ({meta['param_bytes'] / MB:.1f} MB fp32); batch {meta['batch']} x {meta['seq']} tokens per "
          f"rank, {meta['steps']} AdamW steps, exchanges every {meta['sync_every']}; {meta['measure']}, largest "
          "rank.\n")
    print("| G | n | method | mode | peak per rank (MB) | peers' share (MB) | expected (G-1)P/n or (G-1)P (MB) | "
          "ratio codistill/plain |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        pair = pairs.get((r["G"], r["n"], r["method"])) if r["mode"] == "codistill" else None
        share = f"{pair['peers_share'] / MB:,.1f}" if pair else "-"
        expected = f"{pair['peers_expected'] / MB:,.1f}" if pair else "-"
        ratio = f"{pair['ratio']:.2f}" if pair else "-"
        print(f"| {r['G']} | {r['n']} | {r['method']} | {r['mode']} | {r['peak'] / MB:,.1f} | {share} | "
              f"{expected} | {ratio} |")
    print("\nPeak of each phase and what is held at the end (MB, largest rank):\n")
    print("| G | n | method | mode | steps | exchanges | steps ratio codistill/plain | held at end | peers held | "
          "Adam state |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        phases = r["peak_by_phase"]
        exchange = f"{phases['exchange'] / MB:,.1f}" if "exchange" in phases else "-"
        pair = pairs.get((r["G"], r["n"], r["method"])) if r["mode"] == "codistill" else None
        steps_ratio = f"{pair['steps_ratio']:.2f}" if pair else "-"
        print(f"| {r['G']} | {r['n']} | {r['method']} | {r['mode']} | {phases['step'] / MB:,.1f} | {exchange} | "
              f"{steps_ratio} | {r['held_at_end'] / MB:,.1f} | {r['peer_bytes'] / MB:,.1f} | "
              f"{r['optimizer_bytes'] / MB:,.1f} |")
    if summary["falls"]:
        print("\nPeers' share at n relative to n = 1 (peak difference; resident difference at the end):\n")
        print("| G | n | method | peak share / share at n=1 | held share / at n=1 | expected |")
        print("|---|---|---|---|---|---|")
        for f in summary["falls"]:
            print(f"| {f['G']} | {f['n']} | {f['method']} | {f['share_fraction_of_n1']:.2f} | "
                  f"{f['held_fraction_of_n1']:.2f} | {f['expected_fraction']:.2f} |")
    for t in summary["target_fsdp2_g2"]:
        print(f"FSDP2, G=2, n={t['n']}: codistill/plain peak {t['ratio']:.2f} "
              f"({'within' if t['within_1_3'] else 'above'} 1.3x); steps alone {t['steps_ratio']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="Tiny model, G=2, n in {1,2}, one step.")
    parser.add_argument("--groups", default="2,4", help="G values (comma-separated).")
    parser.add_argument("--sizes", default="1,2,4", help="n values, ranks per group (comma-separated).")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--n_embd", type=int, default=256)
    parser.add_argument("--n_layer", type=int, default=8)
    parser.add_argument("--n_head", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=64, help="Tokens per sequence.")
    parser.add_argument("--batch", type=int, default=2, help="Sequences per rank and step.")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--sync_every", type=int, default=2, help="k: optimizer steps between exchanges.")
    parser.add_argument("--bucket_mb", type=float, default=None,
                        help="The exchange's bucket bound in MB (default: the package's, 25 MB); a model this small "
                             "needs a smaller one to show what the bound does for a large one.")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="Default: cuda if available.")
    parser.add_argument("--nice", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=600, help="Seconds per configuration.")
    parser.add_argument("--json", default=None, help=f"Where to write the results (default: {RESULTS}).")
    parser.add_argument("--report", metavar="JSON", help="Print the tables of a results file again; run nothing.")
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    if args.report:
        with open(args.report) as f:
            result = json.load(f)
        result["summary"] = summarise(result["rows"], result["meta"]["param_bytes"])
        print_tables(result)
        return
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        # glibc reads it when the process starts: start again with it (the ranks are forked from this process).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env)
    os.nice(args.nice)  # the ranks inherit it
    if args.smoke:
        args.groups, args.sizes, args.steps, args.sync_every = "2", "1,2", 1, 1
        args.n_embd, args.n_layer, args.n_head, args.vocab, args.seq = 32, 2, 2, 128, 16
    sys.path.insert(0, REPO)
    import torch
    import transformers.models.gpt2.modeling_gpt2  # noqa: F401 - imported once, before the ranks are forked

    import hf_codistill.exchange
    import hf_codistill.peer_forward  # noqa: F401

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    base = {"n_embd": args.n_embd, "n_layer": args.n_layer, "n_head": args.n_head, "vocab": args.vocab,
            "seq": args.seq, "batch": args.batch, "steps": args.steps, "sync_every": args.sync_every,
            "device": device, "bucket_bytes": int(args.bucket_mb * 2**20) if args.bucket_mb is not None
            else hf_codistill.exchange.EXCHANGE_BUCKET_BYTES}
    params = model_params(base)
    param_bytes = 4 * params
    rows, skipped = [], []
    began = time.perf_counter()
    for G in (int(g) for g in args.groups.split(",")):
        for n in (int(s) for s in args.sizes.split(",")):
            for method in args.methods.split(","):
                for mode in MODES:
                    spec = {**base, "G": G, "n": n, "method": method, "mode": mode}
                    world = G * n
                    if device == "cuda" and world > torch.cuda.device_count():
                        skipped.append({**spec, "why": f"{world} ranks, {torch.cuda.device_count()} GPUs"})
                        continue
                    need, available = estimate_need(spec, param_bytes), mem_available()
                    if device == "cpu" and need > 0.8 * available:
                        skipped.append({**spec, "why": f"needs ~{need / 1e9:.1f} GB, {available / 1e9:.1f} GB free"})
                        print(f"skip {method} {mode} G={G} n={n}: {skipped[-1]['why']}", flush=True)
                        continue
                    started = time.perf_counter()
                    ranks = launch(spec, args.timeout)
                    wall = time.perf_counter() - started
                    worst = max(ranks, key=lambda r: r["peak"])
                    row = {"G": G, "n": n, "method": method, "mode": mode, "world": world, "wall_s": wall,
                           "peak": worst["peak"], "peak_by_phase": worst["peak_by_phase"],
                           "held_at_end": max(r["held_at_end"] for r in ranks),
                           "peer_bytes": worst["peer_bytes"], "own_bytes": worst["own_bytes"],
                           "optimizer_bytes": worst["optimizer_bytes"], "mem_available_before": available,
                           "ranks": ranks}
                    rows.append(row)
                    print(f"{method:5} {mode:9} G={G} n={n}: peak {row['peak'] / MB:8.1f} MB per rank (largest of "
                          f"{world}; steps {worst['peak_by_phase']['step'] / MB:.1f}, exchanges "
                          f"{worst['peak_by_phase'].get('exchange', 0) / MB:.1f}), {wall:.0f} s", flush=True)
    measure = ranks[0]["measure"] if rows else "-"
    result = {"meta": {**base, "model_params": params, "param_bytes": param_bytes, "measure": measure,
                       "torch": torch.__version__, "total_s": time.perf_counter() - began, "smoke": args.smoke,
                       "device_name": rows[0]["ranks"][0]["device"] if rows else device},
              "rows": rows, "skipped": skipped, "summary": summarise(rows, param_bytes)}
    path = args.json or RESULTS
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print_tables(result)
    print(f"\n{len(rows)} configurations in {result['meta']['total_s']:.0f} s; results in {path}")


if __name__ == "__main__":
    main()
