#!/usr/bin/env python
"""One worker of the slow-network benchmark: a ViT on Fashion-MNIST, trained by one of five methods.

- `allreduce`: DDP over all W workers (plain `Trainer`);
- `codistill`: 2 groups of W/2, one launch, peers exchanged over the column every k steps (`CodistillTrainer`);
- `codistill_store`: the same groups, each its own launch of W/2 workers, meeting through a peer store
  (`--peer_store`, an fsspec URL);
- `localsgd`: 2 replicas of W/2 workers, DDP inside each, parameters averaged across replicas every H steps;
- `diloco`: the same replicas, torchft's `DiLoCo` (inner AdamW, outer SGD with Nesterov momentum on the averaged
  parameter delta every H steps).

Started by `run.py` in its own network namespace with the launcher's environment (`RANK`, `WORLD_SIZE`,
`MASTER_ADDR`, `MASTER_PORT`, `GLOO_SOCKET_IFNAME`, and `HOST_ADDRS`, every host's address in rank order). Writes
`rank<r>.json`: every evaluation of this rank's model with the wall-clock seconds since training was started, and the
seconds spent evaluating until then.

With `--target_loss`, a run with replicas or groups stops at the first evaluation where replica (group) 0's model is
at or below it: every rank learns it through the launcher's store, so all stop at the same step. Groups launched
apart share no store: group 0 stops by itself, and `run.py` ends the other group then.
"""

import argparse
import gzip
import json
import os
import sys
import time
from datetime import timedelta

import fsspec
import numpy as np
import torch
import torch.distributed as dist
from transformers import TrainerCallback, ViTConfig, ViTForImageClassification, set_seed

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from benchmarks.plain_exit import exit_plain_worker  # noqa: E402
from hf_codistill import CodistillTrainer, CodistillTrainingArguments, init_groups  # noqa: E402

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
LIGHTHOUSE_PORT, REPLICA_STORE_PORT, MANAGER_PORT = 29510, 29520, 29530


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
    """Records each evaluation against wall-clock time; optionally stops once the model of group 0 hit a target.

    `topology` is the groups' (or replicas') `GroupTopology` when they share a launch, whose store tells every rank;
    a `SeparateGroup` (store mode) decides for its own group only.
    """

    def __init__(self, trainer, topology, target_loss):
        self.topology, self.target_loss = topology, target_loss
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
        topology = self.topology
        if self.target_loss is None or topology is None:
            return
        reached = int(topology.group_index == 0 and metrics["eval_loss"] <= self.target_loss)
        if not hasattr(topology, "store"):  # a group launched alone: every rank of it evaluated the same loss
            control.should_training_stop = control.should_training_stop or bool(reached)
            return
        key = f"slow_network/reached/{state.global_step}"
        topology.store.add(key, reached)
        topology.barrier("slow-network-target")
        if topology.store.add(key, 0) > 0:
            control.should_training_stop = True


class LocalSGD(TrainerCallback):
    """Local SGD between replicas that are DDP groups: every `every` optimizer steps, the replicas' parameters are
    replaced by their mean across replicas (Stich 2019; Lin et al. 2020's "local SGD" with a data-parallel inner).

    accelerate's `LocalSGD` cannot express this topology: it turns DDP's gradient all-reduce off and averages over the
    default process group, i.e. W independent workers. Here DDP stays on inside the replica and the average runs over
    the column (rank r of every replica), sharded like codistillation's exchange: rank r averages its 1/n of the
    flattened parameters over its column, then the replica all-gathers the n pieces, so the trunk carries one model
    per replica and sync in each direction (ring all-reduce of P/n over 2 replicas: P/n per rank and direction).
    """

    def __init__(self, model, topology, every):
        self.model, self.topology, self.every = model, topology, every
        self.syncs = 0

    @torch.no_grad()
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every:
            return
        params = [p for p in self.model.parameters()]
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        n, r = self.topology.group_size, self.topology.group_rank
        shard = -(-flat.numel() // n)
        flat = torch.nn.functional.pad(flat, (0, shard * n - flat.numel()))
        piece = flat[r * shard:(r + 1) * shard].clone()
        dist.all_reduce(piece, group=self.topology.column)
        piece.div_(self.topology.num_groups)
        pieces = [torch.empty_like(piece) for _ in range(n)]
        dist.all_gather(pieces, piece)  # the replica's own process group: inside the node
        offset, flat = 0, torch.cat(pieces)
        for p in params:
            p.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        self.syncs += 1


class TorchftDiLoCo(TrainerCallback):
    """torchft's `DiLoCo` (Douillard et al. 2023) on the Trainer's optimizer: inner AdamW every step, and every `every`
    steps the outer optimizer (SGD, lr 0.7, momentum 0.9, Nesterov, the paper's) steps on the parameter delta averaged
    across replicas.

    torchft needs per process a `Manager` (the quorum of replicas, found through a lighthouse that world rank 0 runs
    here) and a store per replica (hosted by the replica's rank 0). Each rank's manager all-reduces its whole model
    over its column: with DDP inside the replica (not FSDP), each of the n columns moves a whole model per sync.
    """

    def __init__(self, model, topology, every):
        from torchft import Manager, ProcessGroupGloo

        self.model, self.every = model, every
        addresses = os.environ["HOST_ADDRS"].split(",")
        me, replica_zero = addresses[topology.world_rank], addresses[topology.group_index * topology.group_size]
        self.lighthouse = None
        if topology.world_rank == 0:
            from torchft._torchft import LighthouseServer

            self.lighthouse = LighthouseServer(bind=f"[::]:{LIGHTHOUSE_PORT}", min_replicas=topology.num_groups)
        self.store = dist.TCPStore(me, REPLICA_STORE_PORT, is_master=True, wait_for_workers=False) \
            if topology.group_rank == 0 else None
        timeout = timedelta(seconds=300)  # a sync at 10 Mbit/s moves 2 x 4.8 MB per direction: ~8 s
        self.manager = Manager(
            pg=ProcessGroupGloo(timeout=timeout), min_replica_size=topology.num_groups, use_async_quorum=False,
            load_state_dict=model.load_state_dict, state_dict=model.state_dict, init_sync=False,
            replica_id=f"replica_{topology.group_index}", store_addr=replica_zero, store_port=REPLICA_STORE_PORT,
            rank=topology.group_rank, world_size=topology.group_size, lighthouse_addr=f"http://{addresses[0]}:"
            f"{LIGHTHOUSE_PORT}", hostname=me, port=MANAGER_PORT, timeout=timeout, quorum_timeout=timeout,
            connect_timeout=timeout)
        self.diloco = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        from torchft.local_sgd import DiLoCo

        inner = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer under accelerate's wrapper
        outer = torch.optim.SGD(self.model.parameters(), lr=0.7, momentum=0.9, nesterov=True)
        self.diloco = DiLoCo(self.manager, [self.model], inner, outer, sync_every=self.every)
        self.diloco.__enter__()

    def on_train_end(self, args, state, control, **kwargs):
        self.diloco.__exit__(None, None, None)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=["allreduce", "codistill", "codistill_store", "localsgd", "diloco"],
                        required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--eval_steps", type=int, default=25)
    parser.add_argument("--batch_size", type=int, default=16, help="Per worker.")
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--hidden_size", type=int, default=192)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--sync_every", type=int, default=25, help="k of codistillation, H of local SGD and DiLoCo.")
    parser.add_argument("--num_train", type=int, default=None)
    parser.add_argument("--num_eval", type=int, default=1000)
    parser.add_argument("--target_loss", type=float, default=None)
    parser.add_argument("--peer_store", default=None, help="codistill_store: the store's URL.")
    parser.add_argument("--group_index", type=int, default=None, help="codistill_store: this launch's group.")
    args = parser.parse_args()

    method = args.method
    replicas = method in ("localsgd", "diloco")
    # Local SGD and DiLoCo: each replica (one node's workers) is its own DDP world; rank r of every replica forms a
    # column across the trunk, as codistillation's groups do.
    topology = init_groups(2) if replicas else None
    options = {}
    if method.startswith("codistill"):
        # Evaluate each group's own model only, as the all-reduce run does (no ensemble, no extra exchange).
        options = {"codistill": True, "num_groups": 2, "codistill_sync_every": args.sync_every,
                   "codistill_peer_metrics": False}
    if method == "codistill_store":
        options.update(codistill_peer_store=args.peer_store, codistill_group_index=args.group_index)
        # s3fs caches folder listings: the store's `ls` would never show a peer's newer versions (the first one read
        # stays the peer for the whole run) unless the cache is off.
        fsspec.config.conf.setdefault("s3", {})["use_listings_cache"] = False
    training_args = CodistillTrainingArguments(
        output_dir=args.output_dir, use_cpu=True, max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=250, learning_rate=args.learning_rate,
        lr_scheduler_type="constant_with_warmup", warmup_steps=20, eval_strategy="steps", eval_steps=args.eval_steps,
        logging_steps=args.eval_steps, save_strategy="no", report_to="none", disable_tqdm=True, seed=42,
        dataloader_num_workers=0,
        # Replicas start from the same weights (seed 42) and each shuffles the data its own way, as groups do.
        data_seed=42 + topology.group_index if replicas else None, ddp_timeout=900, **options,
    )
    set_seed(training_args.group_seed)
    config = ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=args.hidden_size,
                       num_hidden_layers=args.num_layers, num_attention_heads=4,
                       intermediate_size=2 * args.hidden_size, num_labels=10)
    model = ViTForImageClassification(config)

    def accuracy(prediction):
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    trainer = CodistillTrainer(model=model, args=training_args, train_dataset=FashionMNIST("train", args.num_train),
                               eval_dataset=FashionMNIST("t10k", args.num_eval), compute_metrics=accuracy)
    averaging = None
    if method == "localsgd":
        averaging = LocalSGD(model, topology, args.sync_every)
    elif method == "diloco":
        averaging = TorchftDiLoCo(model, topology, args.sync_every)
    if averaging is not None:
        trainer.add_callback(averaging)
    timeline = Timeline(trainer, topology or trainer.topology, args.target_loss)
    trainer.add_callback(timeline)
    timeline.start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - timeline.start
    rank = int(os.environ.get("CODISTILL_WORLD_RANK", os.environ["RANK"]))
    if method == "codistill_store":
        rank += args.group_index * int(os.environ["WORLD_SIZE"])
    result = {"method": method, "world_rank": rank, "group_index": trainer.group_index if not replicas else
              topology.group_index, "group_rank": trainer.group_rank if not replicas else topology.group_rank,
              "steps": trainer.state.global_step, "train_seconds": seconds, "eval_seconds": timeline.eval_seconds,
              "evals": timeline.evals, "parameters": sum(p.numel() for p in model.parameters())}
    if method == "codistill":
        result["exchange_bytes_sent"] = trainer.peer_copies.bytes_sent
    if method == "codistill_store":
        result["store_bytes_written"] = trainer.peer_copies.store.bytes_written
        result["store_bytes_read"] = trainer.peer_copies.store.bytes_read
    if method == "localsgd":
        result["syncs"] = averaging.syncs
    with open(os.path.join(args.output_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if method == "diloco":
        topology.barrier("slow-network-diloco-done")  # the lighthouse (world rank 0) outlives every manager
        averaging.manager.shutdown()
        topology.barrier("slow-network-managers-down")
    if method == "allreduce":  # codistillation's groups and the replicas tear down in order at exit
        exit_plain_worker()


if __name__ == "__main__":
    main()
