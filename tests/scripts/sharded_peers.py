"""Peers of FSDP2-sharded groups: 2 groups x n ranks under torchrun, `fully_shard` applied directly (accelerate does
not apply FSDP on CPU). Every rank writes what tests/test_sharded_peers.py compares with unsharded references."""

import copy
import json
import os
import sys

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from hf_codistill.exchange import PeerCopies, exchanged_tensors  # noqa: E402
from hf_codistill.losses import distillation_loss  # noqa: E402
from hf_codistill.topology import init_groups  # noqa: E402


def gather_over_column(topology, tensor):
    gathered = [torch.empty_like(tensor) for _ in range(topology.num_groups)]
    topology.column.allgather([gathered], [tensor.contiguous()]).wait()
    return gathered


def main():
    results = sys.argv[1]
    topology = init_groups(2, backend="gloo")
    group = topology.group_index
    torch.manual_seed(100 + group)  # the groups' models differ
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout: the sharded and whole steps must agree
    model = GPT2LMHeadModel(config).eval()
    reference = copy.deepcopy(model)  # this group's model, whole
    mesh = DeviceMesh("cpu", list(range(topology.group_size)))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)

    peers = PeerCopies(model, topology)
    peers.check_compatible()
    peers.exchange(model, step=0)
    (peer,) = peers.models()
    # One training step of the sharded student with a distillation term toward its sharded peer, then a second
    # exchange: the peers follow the trained models (the unsharded reference takes the same step).
    inputs = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(7 + group))
    for trained in (model, reference):
        optimizer = torch.optim.SGD(trained.parameters(), lr=0.1)
        trained.train()
        student = trained(input_ids=inputs, labels=inputs)
        with torch.no_grad():
            teacher = peer(input_ids=inputs).logits
        distill = distillation_loss(student.logits, teacher, "kl", 1.0)
        (student.loss + distill).backward()
        optimizer.step()
        trained.eval()
    peers.exchange(model, step=1)
    other = 1 - group
    whole = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])
    peer_whole = torch.cat([p.full_tensor().reshape(-1) for p in peer.parameters()])  # gathered in the group
    probe = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(11))  # the same in every group
    with torch.no_grad():
        peer_logits = peer(input_ids=probe).logits
        reference_logits = reference(input_ids=probe).logits
    result = {
        "group": group,
        "peer_equals_other_group": torch.equal(peer_whole, gather_over_column(topology, whole)[other]),
        "student_matches_reference": torch.allclose(
            torch.cat([p.full_tensor().reshape(-1) for p in model.parameters()]), whole, atol=1e-6),
        "peer_logits_match": torch.allclose(peer_logits, gather_over_column(topology, reference_logits)[other],
                                            atol=1e-6),
        "peer_local_numel": sum(p.to_local().numel() for p in peer.parameters()),
        "model_numel": sum(p.numel() for p in reference.parameters()),
        "bytes_sent": peers.bytes_sent,
        "local_bytes": sum(t.numel() * t.element_size() for t in exchanged_tensors(model).values()),
        "group_bytes_received": peers.group_bytes_received,
        "peer_requires_grad": any(p.requires_grad for p in peer.parameters()),
    }
    with open(os.path.join(results, f"rank{topology.world_rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
