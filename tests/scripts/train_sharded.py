"""Codistill tiny GPT-2s on Shakespeare through `CodistillTrainer`'s FSDP2 path (or DDP, for reference) on CPUs.

Used by tests/test_sharding.py as `torchrun --nproc_per_node 4 tests/scripts/train_sharded.py --output_dir ...
--codistill --num_groups 2 [--fsdp full_shard --fsdp_config fsdp.json --x-shard_on_cpu=1] --x-results=DIR`.
accelerate applies FSDP on the CPU only through `fsdp_on_cpu` (`--x-shard_on_cpu=1`; see there); the rest is the
library's and Trainer's own code. Every rank writes, per optimizer step, checksums of its model and of its peers
gathered whole, so runs can be compared across ranks.
"""

import json
import logging
import os
import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel, HfArgumentParser

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from hf_codistill import CodistillTrainer, CodistillTrainingArguments  # noqa: E402
from hf_codistill.recipes.data import load_shakespeare  # noqa: E402
from hf_codistill.sharding import is_fully_sharded  # noqa: E402
from tests.scripts.recording import Recorder, checksum, whole  # noqa: E402

BLOCK = 32


def byte_blocks(texts, count):
    """The speeches' UTF-8 bytes, concatenated and cut into `count` blocks of `BLOCK` tokens (vocabulary: 256)."""
    data = "\n\n".join(texts).encode("utf-8")[: count * BLOCK]
    ids = torch.tensor(list(data), dtype=torch.long).reshape(count, BLOCK)
    return [{"input_ids": row, "labels": row} for row in ids]


def tiny_gpt2():
    config = GPT2Config(vocab_size=256, n_positions=BLOCK, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


class Messages(logging.Handler):
    """The warnings a logger gave (here the library's sharding module's)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def main():
    parser = HfArgumentParser(CodistillTrainingArguments)
    args, extra = parser.parse_args_into_dataclasses(return_remaining_strings=True)
    options = dict(arg[4:].split("=", 1) for arg in extra if arg.startswith("--x-") and "=" in arg)
    if options.get("shard_on_cpu") == "1":
        import tests.scripts.fsdp_on_cpu  # noqa: F401  (before the Trainer is built)
    warnings = Messages()
    logging.getLogger("hf_codistill.sharding").addHandler(warnings)
    speeches = load_shakespeare()
    train = byte_blocks(list(speeches["train"]["text"][:400]), 96)
    evaluation = byte_blocks(list(speeches["validation"]["text"][:100]), 16)
    # `model_init`: each group builds its model under its own seed (`seed + g`), whatever the launch.
    trainer = CodistillTrainer(model_init=tiny_gpt2, args=args, train_dataset=train, eval_dataset=evaluation)
    recorder = Recorder(trainer)
    trainer.add_callback(recorder)
    trainer.train(resume_from_checkpoint=options.get("resume") or None)
    metrics = trainer.evaluate()
    trainer.save_model()
    peers = trainer.peer_copies
    peer = next(iter(peers.peers.values()))
    result = {
        "group": trainer.group_index,
        "group_rank": trainer.group_rank,
        "sharded": is_fully_sharded(trainer.model),
        "warnings": warnings.messages,
        "model_class": type(trainer.model).__name__,
        "model_numel": sum(whole(p).numel() for p in trainer.model.parameters()),
        "local_numel": sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                           for p in trainer.model.parameters()),
        "peer_local_numel": sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                                for p in peer.parameters()),
        "peer_requires_grad": any(p.requires_grad for p in peer.parameters()),
        "start_own": recorder.start,
        "final_own": checksum(trainer.model.parameters()),
        "steps": recorder.steps,
        "logs": [entry for entry in trainer.state.log_history if "loss" in entry],
        "eval": metrics,
        "max_memory_allocated": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "bytes_sent": peers.bytes_sent,
        "group_bytes_received": peers.group_bytes_received,
    }
    if trainer.group_rank == 0:  # the final model, saved whole: what `from_pretrained` reads back
        folder = os.path.join(args.output_dir, f"group_{trainer.group_index}")
        result["saved"] = checksum(GPT2LMHeadModel.from_pretrained(folder).parameters())
        if trainer.group_index == 0:
            result["saved_root"] = checksum(GPT2LMHeadModel.from_pretrained(args.output_dir).parameters())
    results = options["results"]
    with open(os.path.join(results, f"rank{int(os.environ['CODISTILL_WORLD_RANK'])}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
