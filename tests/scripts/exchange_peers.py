"""Exchange peer copies between real processes, sharded and not, and record what every rank received.

Used by tests/test_exchange_sharded.py as `torchrun --nproc_per_node W tests/scripts/exchange_peers.py
--num_groups G --x-results=DIR`. No Trainer: the model is a small torch module with several dtypes, so that the
exchange splits it into buckets, and an odd number of values, so that shards need padding.
"""

import argparse
import copy
import json
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from hf_codistill import exchange  # noqa: E402
from hf_codistill.exchange import PeerCopies, exchanged_tensors  # noqa: E402
from hf_codistill.quantization import as_sent  # noqa: E402
from hf_codistill.topology import init_groups  # noqa: E402


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(7, 5)  # 40 float32 values
        self.scale = nn.Parameter(torch.randn(3, dtype=torch.float64))
        self.register_buffer("counts", torch.randint(0, 1000, (11,)))


def checksum(model):
    return _checksum_of(exchanged_tensors(model))


def _checksum_of(tensors):
    flat = torch.cat([t.detach().double().reshape(-1) for t in tensors.values()])
    return float((flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64).remainder(97)).sum())


def _models_of_peers(topology):
    """Every other group's model, rebuilt here from its seed (the models are built from seeds alone)."""
    models = {}
    for group in range(topology.num_groups):
        if group != topology.group_index:
            torch.manual_seed(1000 + group)
            models[group] = Mixed()
    return models


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--num_groups", type=int, default=2)
    parser.add_argument("--ring_only", action="store_true", help="record the bounded (m = 1) peer set only")
    parser.add_argument("--x-results", dest="results")
    args = parser.parse_args()
    topology = init_groups(args.num_groups)
    torch.manual_seed(1000 + topology.group_index)
    model = Mixed()
    record = {"world_rank": topology.world_rank, "group_index": topology.group_index,
              "group_size": topology.group_size, "own": checksum(model),
              "model_bytes": sum(t.numel() * t.element_size() for t in exchanged_tensors(model).values())}
    # A bounded peer set: each group holds and fetches only the next group's model (m = 1), sharded or not.
    record["ring"] = {}
    for sharded in (True, False):
        peers = PeerCopies(model, topology, sharded=sharded, num_peers=1)
        peers.exchange(model, step=0)
        peers.exchange(model, step=1)  # twice: messages of successive exchanges must not mix
        record["ring"]["sharded" if sharded else "unsharded"] = {
            "peers": {g: checksum(p) for g, p in peers.peers.items()}, "readers": peers.readers,
            "bytes_sent": peers.bytes_sent, "bytes_received": peers.bytes_received,
        }
    if args.ring_only:
        return _write(record, args.results, topology.world_rank)
    # Buckets of at most 16 bytes, so that a blocking exchange moves a tensor (or less) at a time: the same peers.
    bucket_bytes, exchange.EXCHANGE_BUCKET_BYTES = exchange.EXCHANGE_BUCKET_BYTES, 16
    record["bounded"] = {}
    for sharded in (True, False):
        peers = PeerCopies(model, topology, sharded=sharded)
        peers.exchange(model, step=0)
        record["bounded"]["sharded" if sharded else "unsharded"] = {g: checksum(p) for g, p in peers.peers.items()}
    exchange.EXCHANGE_BUCKET_BYTES = bucket_bytes
    for sharded in (True, False):
        peers = PeerCopies(model, topology, sharded=sharded)
        peers.exchange(model, step=0)
        record["sharded" if sharded else "unsharded"] = {
            "is_sharded": peers.sharded, "peers": {g: checksum(p) for g, p in peers.peers.items()},
            "bytes_sent": peers.bytes_sent, "bytes_received": peers.bytes_received,
            "group_bytes_received": peers.group_bytes_received,
        }
    # Peers held in bfloat16: the floating-point tensors travel and are stored in it, the integer buffer as it is.
    peers = PeerCopies(model, topology, dtype=torch.bfloat16)
    peers.exchange(model, step=0)
    record["bfloat16"] = {
        "own": checksum(copy.deepcopy(model).to(torch.bfloat16)),
        "peers": {g: checksum(p) for g, p in peers.peers.items()},
        "dtypes": sorted({str(t.dtype) for p in peers.models() for t in exchanged_tensors(p).values()}),
        "bytes_sent": peers.bytes_sent,
    }
    # Peers held in int8: the weight matrix travels and is stored as int8 rows with a float32 scale each; the rest as
    # it is. The sender quantises, so every group holds the same int8 copy of a peer.
    peers = PeerCopies(model, topology, dtype=torch.int8)
    peers.exchange(model, step=0)
    wire = exchanged_tensors(next(iter(peers.peers.values())))
    record["int8"] = {
        "own": _checksum_of(as_sent(exchanged_tensors(model), wire)),
        "peers": {g: checksum(p) for g, p in peers.peers.items()},
        "dtypes": {name: str(t.dtype) for name, t in wire.items()},
        "bytes_sent": peers.bytes_sent,
    }
    # Dequantised, each peer's weight is its model's to half a row's scale (the row's largest magnitude / 127).
    others = _models_of_peers(topology)
    record["int8"]["weight_error_in_scales"] = max(
        float(((p.linear.weight - others[g].linear.weight).abs() * 127
               / others[g].linear.weight.abs().amax(dim=1, keepdim=True)).max()) for g, p in peers.peers.items())
    # A shared initialisation: every group's model becomes group 0's, at full precision.
    shared = copy.deepcopy(model)
    peers.broadcast_model(shared, source_group=0)
    record["broadcast"] = checksum(shared)
    # In the background: the snapshot taken at the start is what arrives, whatever training does meanwhile.
    peers = PeerCopies(model, topology)
    before = {g: checksum(p) for g, p in peers.peers.items()}
    peers.start_exchange(model, step=5)
    snapshot = checksum(model)
    in_flight = {g: checksum(p) for g, p in peers.peers.items()}
    with torch.no_grad():
        model.linear.weight.add_(1.0)
    applied = peers.finish_exchange()
    record["overlap"] = {"snapshot": snapshot, "before": before, "in_flight": in_flight, "applied": applied,
                         "after": {g: checksum(p) for g, p in peers.peers.items()},
                         "last_exchange_step": peers.last_exchange_step, "again": peers.finish_exchange()}
    # The same number of values in another shape (the last group's weight transposed) must not be copied across.
    peers.check_same_architecture(model)
    if topology.group_index == topology.num_groups - 1:
        model.linear.weight = nn.Parameter(model.linear.weight.detach().t().contiguous())
    try:
        peers.check_same_architecture(model)
        record["transposed"] = "accepted"
    except ValueError as error:
        record["transposed"] = str(error)
    _write(record, args.results, topology.world_rank)


def _write(record, results, world_rank):
    with open(os.path.join(results, f"rank{world_rank}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main()
