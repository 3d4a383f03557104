#!/usr/bin/env python
"""Time of one training step: plain `Trainer` vs. `CodistillTrainer`, same model, batch and precision.

One process, one group's view. The plain step is the student's forward, backward and optimizer step through
`Trainer.training_step`; the codistillation step is the same call on a `CodistillTrainer` that holds one peer copy
(a frozen model of the same architecture), so it adds the peer's forward and the distillation loss exactly as the
trainer computes them. No exchange happens during the timed steps (it is every k steps and measured by
`communication.py`). Each case and mode runs in a fresh process, so peak memory is per mode.

    python benchmarks/step_overhead.py --smoke                      # CPU, tiny models (the test suite's run)
    python benchmarks/step_overhead.py --device cuda --bf16         # BERT-base MLM 64x128, GPT-2 small CLM 16x512,
                                                                    # ViT-base 128x224²
Prints: case, plain ms, codistill ms, ratio, peak memory of both (GPU: max allocated; CPU: peak RSS), then the
peak of each phase of one more step (forward, distillation term, backward, optimizer), to tell where each peaks.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = ("bert-mlm", "gpt2-clm", "vit")
PHASES = ("forward", "distillation", "backward", "optimizer")


def build_case(case: str, size: str, device, batch_size: int | None = None):
    """A model built from its config (random weights) and a factory of random batches for it.

    `size`: `tiny` (smoke), `cpu` (the real vocabularies and output heads, small bodies and batches: where the
    vocabulary-sized work of the distillation term shows on a CPU) or `full` (the issue's GPU cases). `batch_size`
    replaces the size's own.
    """
    tiny, cpu = size == "tiny", size == "cpu"
    import torch
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        GPT2Config,
        GPT2LMHeadModel,
        ViTConfig,
        ViTForImageClassification,
    )

    if case == "bert-mlm":
        config = (BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64) if tiny
                  else BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512)
                  if cpu else BertConfig())
        batch, length = (8, 32) if tiny else (8, 128) if cpu else (64, 128)

        def model():
            return BertForMaskedLM(config)

        def inputs():
            ids = torch.randint(0, config.vocab_size, (batch, length), device=device)
            labels = torch.full_like(ids, -100)
            masked = torch.rand(batch, length, device=device) < 0.15
            labels[masked] = ids[masked]
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    elif case == "gpt2-clm":
        config = (GPT2Config(vocab_size=1000, n_embd=32, n_layer=2, n_head=2, n_positions=64) if tiny
                  else GPT2Config(n_embd=128, n_layer=2, n_head=2, n_positions=256) if cpu else GPT2Config())
        batch, length = (4, 64) if tiny else (4, 256) if cpu else (16, 512)

        def model():
            return GPT2LMHeadModel(config)

        def inputs():
            ids = torch.randint(0, config.vocab_size, (batch, length), device=device)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    elif case == "vit":
        config = (ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, num_labels=10) if tiny
                  else ViTConfig(image_size=64, patch_size=8, hidden_size=128, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=512, num_labels=1000) if cpu
                  else ViTConfig(num_labels=1000))
        batch = 8 if tiny else 32 if cpu else 128

        def model():
            return ViTForImageClassification(config)

        def inputs():
            pixels = torch.randn(batch, 3, config.image_size, config.image_size, device=device)
            return {"pixel_values": pixels, "labels": torch.randint(0, config.num_labels, (batch,), device=device)}

    else:
        raise ValueError(f"unknown case {case!r}; choose from {', '.join(CASES)}")
    batch = batch_size or batch  # `inputs()` reads it when called
    shape = f"{batch}x{length}" if case != "vit" else f"{batch}x{config.image_size}²"
    return model, inputs, shape


class _OnePeer:
    """Stands in for `PeerCopies` in one process: group 0's one peer, held in `dtype`, without an exchange."""

    def __init__(self, peer, dtype):
        self.peer, self.dtype = peer, dtype

    def peers_of(self, group):
        return {1: self.peer}

    def counters(self):
        return {}


class _PhasePeaks:
    """Peak memory of each phase of a training step: the student's forward and own loss, the distillation term, the
    backward pass, the optimizer step. GPU: max allocated, the peak statistic reset at each phase change (the
    allocator's accounting follows the order in which work is queued, so no sync is needed); CPU: the process's RSS,
    sampled every 0.5 ms by a thread."""

    def __init__(self, cuda: bool):
        import threading

        self.cuda, self.phase, self.peaks = cuda, None, defaultdict(int)
        self._sampling, self._lock = False, threading.Lock()

    def enter(self, phase):
        import torch

        if self.cuda:
            self._record(self.phase, torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        self.phase = phase
        if not self.cuda:
            self._record(phase, self._rss())  # at least one sample, however short the phase

    def _record(self, phase, value):
        if phase is not None:
            with self._lock:
                self.peaks[phase] = max(self.peaks[phase], value)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def sample(self):
        import threading

        if self.cuda:
            return

        def run():
            while self._sampling:
                phase = self.phase
                rss = self._rss()
                if self.phase is phase:  # a sample taken across a phase change belongs to neither phase for sure
                    self._record(phase, rss)
                time.sleep(0.0005)

        self._sampling = True
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self):
        self.enter(None)
        if self._sampling:
            self._sampling = False
            self._thread.join()


def peak_by_phase(trainer, batch, step, cuda: bool) -> dict:
    """Run one more `step(batch)` with the peak memory (bytes) of each of its phases, to tell where a step peaks."""
    tracker = _PhasePeaks(cuda)

    def entering(phase, method):
        def wrapped(*args, **kwargs):
            previous = tracker.phase
            tracker.enter(phase)
            try:
                return method(*args, **kwargs)
            finally:
                tracker.enter(previous)
        return wrapped

    patched = [(trainer, "compute_loss", "forward"), (trainer.accelerator, "backward", "backward"),
               (trainer.optimizer, "step", "optimizer")]
    if trainer.engine is not None:
        patched.append((trainer.engine, "distillation_term", "distillation"))
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patched]
    for owner, name, phase in patched:
        setattr(owner, name, entering(phase, getattr(owner, name)))
    tracker.sample()
    try:
        step(batch)
    finally:
        tracker.stop()
        for owner, name, original in originals:
            setattr(owner, name, original)
    return dict(tracker.peaks)


def peer_memory(peer) -> int:
    """Bytes the peer copy holds: its parameters and buffers, each tensor once (an int8 peer's weight rows and their
    scales, its other tensors in their own precision)."""
    import itertools

    tensors = {id(t): t for t in itertools.chain(peer.parameters(), peer.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def measure(case: str, mode: str, args) -> dict:
    """Run warm-up and timed steps of one case in this process; return ms per step and peak memory."""
    import resource

    import torch
    from transformers import set_seed

    sys.path.insert(0, REPO)
    from hf_codistill import CodistillTrainer, CodistillTrainingArguments
    from hf_codistill.engine import CodistillEngine
    from hf_codistill.exchange import frozen_copy
    from hf_codistill.step_metrics import MetricSums

    cuda = args.device == "cuda"
    device = torch.device("cuda" if cuda else "cpu")
    torch.set_num_threads(args.threads) if not cuda else None
    make_model, make_inputs, shape = build_case(case, args.size, device=device, batch_size=args.batch_size)
    training_args = CodistillTrainingArguments(
        output_dir=tempfile.mkdtemp(), use_cpu=not cuda, bf16=args.bf16, report_to="none", learning_rate=1e-4,
        per_device_train_batch_size=1, disable_tqdm=True, codistill_peer_dtype=args.peer_dtype,
        codistill_position_fraction=args.position_fraction,
    )
    set_seed(0)
    model = make_model()
    trainer = CodistillTrainer(model=model, args=training_args)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1
    peer_bytes = peer_rss_bytes = None
    if mode == "codistill":
        set_seed(1)
        gc.collect()
        rss_before = _PhasePeaks._rss()
        peer = frozen_copy(make_model(), training_args.peer_torch_dtype).to(model.device)
        gc.collect()  # the float model the copy was made from is gone: the RSS growth is the peer's
        peer_bytes, peer_rss_bytes = peer_memory(peer), _PhasePeaks._rss() - rss_before
        # The codistillation branch of `compute_loss`: the engine of group 0, with this process's one peer standing
        # for the other group's.
        trainer.engine = CodistillEngine(training_args, driver=None, autocast=trainer.accelerator.autocast)
        trainer.engine.models = {0: model}
        trainer.engine.peers = _OnePeer(peer, training_args.peer_torch_dtype)
        trainer.engine.step_metrics = {0: MetricSums()}
    batches = [make_inputs() for _ in range(4)]
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def step(batch):
        trainer.training_step(trainer.model, batch)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        if mode == "codistill":
            trainer.engine.pop_metrics(trainer.state.global_step)  # Trainer's log() would

    times = []
    for i in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        began = time.perf_counter()
        step(batches[i % len(batches)])
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - began)
    times.sort()
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    phases = peak_by_phase(trainer, batches[0], step, cuda)
    return {"case": case, "shape": shape, "mode": mode, "ms": 1000 * times[len(times) // 2],
            "peak_bytes": peak, "peak_bytes_by_phase": phases, "peer_bytes": peer_bytes,
            "peer_rss_bytes": None if cuda else peer_rss_bytes,
            "device": torch.cuda.get_device_name() if cuda else "cpu"}


def run_child(case: str, mode: str, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", case, mode, "--device", args.device,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    command += ["--bf16"] * args.bf16 + ["--smoke"] * args.smoke + ["--size", args.size]
    command += ["--peer_dtype", args.peer_dtype] if args.peer_dtype else []
    command += ["--position_fraction", str(args.position_fraction)]
    command += ["--batch_size", str(args.batch_size)] if args.batch_size else []
    # A fixed mmap threshold makes glibc return every large tensor to the OS when it is freed, so that the CPU's
    # peak RSS follows the tensors alive at once rather than what the allocator kept.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO, "MALLOC_MMAP_THRESHOLD_": "1048576"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "CODISTILL_WORLD_SIZE"):
        env.pop(key, None)
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{case} ({mode}) failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="Tiny models on the CPU, a few steps.")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--size", choices=["tiny", "cpu", "full"], default=None,
                        help="Model and batch sizes (default: full; tiny with --smoke). `cpu`: real vocabularies and "
                        "heads on small bodies, for a CPU.")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--bf16", action="store_true", help="Train in bf16 mixed precision (both modes).")
    parser.add_argument("--peer_dtype", choices=["bfloat16", "float16", "float32", "int8"], default=None,
                        help="`codistill_peer_dtype` of the codistillation step (default: the model's).")
    parser.add_argument("--position_fraction", type=float, default=1.0,
                        help="`codistill_position_fraction` of the codistillation step (language models).")
    parser.add_argument("--batch_size", type=int, default=None, help="Replaces each case's batch size.")
    parser.add_argument("--steps", type=int, default=20, help="Timed steps; the median is reported.")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process.")
    parser.add_argument("--timeout", type=int, default=240, help="Seconds one case and mode may take.")
    parser.add_argument("--json", help="Also write the rows to this file.")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.device, args.steps, args.warmup = "cpu", 3, 1
    args.size = args.size or ("tiny" if args.smoke else "full")
    if args.child:
        print(json.dumps(measure(*args.child, args)))
        return
    # The smoke run stays in one process (seconds instead of minutes); its CPU memory column is then not per mode.
    run = (lambda case, mode, args: measure(case, mode, args)) if args.smoke else run_child
    rows = []
    for case in args.cases.split(","):
        plain, codistill = run(case, "plain", args), run(case, "codistill", args)
        rows.append({"case": case, "shape": plain["shape"], "device": plain["device"], "plain_ms": plain["ms"],
                     "codistill_ms": codistill["ms"], "ratio": codistill["ms"] / plain["ms"],
                     "plain_peak_bytes": plain["peak_bytes"], "codistill_peak_bytes": codistill["peak_bytes"],
                     "memory_ratio": codistill["peak_bytes"] / plain["peak_bytes"],
                     "plain_peak_bytes_by_phase": plain["peak_bytes_by_phase"],
                     "codistill_peak_bytes_by_phase": codistill["peak_bytes_by_phase"],
                     "peer_bytes": codistill["peer_bytes"], "peer_rss_bytes": codistill["peer_rss_bytes"]})
    memory = "peak GPU memory (max allocated)" if args.device == "cuda" else "peak RSS of the process"
    print(f"device: {rows[0]['device']}, precision: {'bf16 mixed' if args.bf16 else 'fp32'}, peers: "
          f"{args.peer_dtype or 'model precision'}, LM position fraction {args.position_fraction}, median of "
          f"{args.steps} steps; memory: {memory}")
    print("| case | batch | plain ms | codistill ms | ratio | plain peak MB | codistill peak MB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['shape']} | {r['plain_ms']:.1f} | {r['codistill_ms']:.1f} | {r['ratio']:.2f} | "
              f"{r['plain_peak_bytes'] / 2**20:,.0f} | {r['codistill_peak_bytes'] / 2**20:,.0f} | "
              f"{r['memory_ratio']:.2f} |")
    print("\nPeak MB by phase of one more step (where each mode peaks):")
    print("| case | mode | " + " | ".join(PHASES) + " |")
    print("|---|---|" + "---|" * len(PHASES))
    for r in rows:
        for mode in ("plain", "codistill"):
            phases = r[f"{mode}_peak_bytes_by_phase"]
            print(f"| {r['case']} | {mode} | " + " | ".join(
                f"{phases[p] / 2**20:,.0f}" if p in phases else "-" for p in PHASES) + " |")
    print(f"\nThe peer copy ({args.peer_dtype or 'model precision'}): its tensors, the RSS it added when built (CPU), "
          "and the codistillation step's peak (max of the phases above):")
    print("| case | peer tensors MB | peer RSS MB | step peak MB |")
    print("|---|---|---|---|")
    for r in rows:
        rss = "-" if r["peer_rss_bytes"] is None else f"{r['peer_rss_bytes'] / 2**20:,.0f}"
        print(f"| {r['case']} | {r['peer_bytes'] / 2**20:,.1f} | {rss} | "
              f"{max(r['codistill_peak_bytes_by_phase'].values()) / 2**20:,.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
