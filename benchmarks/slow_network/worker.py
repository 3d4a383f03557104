#!/usr/bin/env python
"""One worker of the slow-network benchmark: a ViT on Fashion-MNIST, all-reduce DDP or codistillation.

Started by `run.py` in its own network namespace with the launcher's environment (`RANK`, `WORLD_SIZE`,
`MASTER_ADDR`, `MASTER_PORT`, `GLOO_SOCKET_IFNAME`). Writes `rank<r>.json`: every evaluation of this rank's model
with the wall-clock seconds since training was started, and the seconds spent evaluating until then.

With `--target_loss`, a codistillation run stops at the first evaluation where group 0's model is at or below it
(every rank learns it through the launcher's store, so all groups stop at the same step).
"""

import argparse
import gzip
import json
import os
import sys
import time

import numpy as np
import torch
from transformers import TrainerCallback, ViTConfig, ViTForImageClassification, set_seed

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from benchmarks.plain_exit import exit_plain_worker  # noqa: E402
from hf_codistill import CodistillTrainer, CodistillTrainingArguments  # noqa: E402

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


class FashionMNIST(torch.utils.data.Dataset):
    """Fashion-MNIST from its IDX files, normalised to [-1, 1], as `pixel_values`/`labels` dicts."""

    def __init__(self, prefix, limit=None):
        def read(name):
            file_name = f"{prefix}-{name}-idx{3 if name == 'images' else 1}-ubyte.gz"
            with gzip.open(os.path.join(FASHION_MNIST_DIR, file_name)) as f:
                data = f.read()
            return np.frombuffer(data, np.uint8, offset=16 if name == "images" else 8)

        images = torch.from_numpy(read("images").copy()).view(-1, 1, 28, 28)
        labels = torch.from_numpy(read("labels").astype(np.int64))
        limit = limit or len(labels)
        self.pixels = images[:limit].float().div(127.5).sub(1.0)
        self.labels = labels[:limit]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"pixel_values": self.pixels[index], "labels": self.labels[index]}


class Timeline(TrainerCallback):
    """Records each evaluation against wall-clock time; optionally stops every group once group 0 hit a target."""

    def __init__(self, trainer, target_loss):
        self.trainer, self.target_loss = trainer, target_loss
        self.start, self.eval_seconds, self.eval_began, self.evals = None, 0.0, None, []
        evaluate = trainer.evaluate

        def timed_evaluate(*args, **kwargs):
            began = self.eval_began = time.perf_counter()
            try:
                return evaluate(*args, **kwargs)
            finally:
                self.eval_seconds += time.perf_counter() - began

        trainer.evaluate = timed_evaluate

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.evals.append({"step": state.global_step, "seconds": time.perf_counter() - self.start,
                           "train_seconds_at_eval": self.eval_began - self.start - self.eval_seconds,
                           "eval_loss": metrics["eval_loss"],
                           "eval_accuracy": metrics.get("eval_accuracy")})
        topology = self.trainer.topology
        if self.target_loss is None or topology is None:
            return
        reached = int(topology.group_index == 0 and metrics["eval_loss"] <= self.target_loss)
        key = f"slow_network/reached/{state.global_step}"
        topology.store.add(key, reached)
        topology.barrier("slow-network-target")
        if topology.store.add(key, 0) > 0:
            control.should_training_stop = True


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=["allreduce", "codistill"], required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--eval_steps", type=int, default=25)
    parser.add_argument("--batch_size", type=int, default=16, help="Per worker.")
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--hidden_size", type=int, default=192)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--sync_every", type=int, default=25)
    parser.add_argument("--num_train", type=int, default=None)
    parser.add_argument("--num_eval", type=int, default=1000)
    parser.add_argument("--target_loss", type=float, default=None)
    args = parser.parse_args()

    codistill = args.method == "codistill"
    training_args = CodistillTrainingArguments(
        output_dir=args.output_dir, codistill=codistill, num_groups=2, codistill_sync_every=args.sync_every,
        use_cpu=True, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=250, learning_rate=args.learning_rate, lr_scheduler_type="constant_with_warmup",
        warmup_steps=20, eval_strategy="steps", eval_steps=args.eval_steps, logging_steps=args.eval_steps,
        save_strategy="no", report_to="none", disable_tqdm=True, seed=42, dataloader_num_workers=0,
    )
    if codistill:
        # Evaluate each group's own model only, as the all-reduce run does (no ensemble, no extra exchange).
        training_args.codistill_peer_metrics = False
    set_seed(training_args.group_seed)
    config = ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=args.hidden_size,
                       num_hidden_layers=args.num_layers, num_attention_heads=4,
                       intermediate_size=2 * args.hidden_size, num_labels=10)
    model = ViTForImageClassification(config)

    def accuracy(prediction):
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    trainer = CodistillTrainer(model=model, args=training_args, train_dataset=FashionMNIST("train", args.num_train),
                               eval_dataset=FashionMNIST("t10k", args.num_eval), compute_metrics=accuracy)
    timeline = Timeline(trainer, args.target_loss if codistill else None)
    trainer.add_callback(timeline)
    timeline.start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - timeline.start
    rank = int(os.environ.get("CODISTILL_WORLD_RANK", os.environ["RANK"]))
    result = {"method": args.method, "world_rank": rank, "group_index": trainer.group_index,
              "group_rank": trainer.group_rank, "steps": trainer.state.global_step, "train_seconds": seconds,
              "eval_seconds": timeline.eval_seconds, "evals": timeline.evals,
              "parameters": sum(p.numel() for p in model.parameters())}
    if codistill:
        result["exchange_bytes_sent"] = trainer.peer_copies.bytes_sent
    with open(os.path.join(args.output_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if not codistill:  # codistillation's groups tear down in order at exit
        exit_plain_worker()


if __name__ == "__main__":
    main()
