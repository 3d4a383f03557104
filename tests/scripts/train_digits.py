"""Train tiny ViTs on scikit-learn's digits under a launcher; every rank writes what the tests compare.

Used by tests/test_distributed.py as `torchrun --nproc_per_node W tests/scripts/train_digits.py --output_dir ...`.
"""

import json
import os
import sys
import time

import torch
from sklearn.datasets import load_digits
from transformers import (
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    ViTConfig,
    ViTForImageClassification,
    default_data_collator,
    set_seed,
)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from benchmarks.plain_exit import exit_plain_worker  # noqa: E402
from hf_codistill import CodistillTrainer, CodistillTrainingArguments  # noqa: E402
from tests.scripts.recording import Recorder, checksum  # noqa: E402


class DigitsDataset(torch.utils.data.Dataset):
    """scikit-learn's digits as `pixel_values`/`labels` dicts (a torch Dataset, so only torch is needed)."""

    def __init__(self, pixels, labels):
        self.pixels, self.labels = pixels, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"pixel_values": self.pixels[index], "labels": self.labels[index]}


def digits_dataset(num_train):
    digits = load_digits()
    pixels = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    return DigitsDataset(pixels[:num_train], labels[:num_train]), DigitsDataset(pixels[1500:], labels[1500:])


def as_stream(data: DigitsDataset):
    """The same examples as a `datasets.IterableDataset` of 4 shards, like `load_dataset(..., streaming=True)`."""
    from datasets import Dataset

    table = Dataset.from_dict({"pixel_values": data.pixels.numpy(), "labels": data.labels.numpy(),
                               "index": list(range(len(data)))})
    return table.to_iterable_dataset(num_shards=4).with_format("torch")


def tiny_vit(hidden_size=32):
    config = ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=hidden_size, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=2 * hidden_size, num_labels=10, hidden_dropout_prob=0.1,
    )
    return ViTForImageClassification(config)


def accuracy(prediction):
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


class SlowSteps(TrainerCallback):
    """A group slowed down on purpose: `delay` seconds more per optimizer step."""

    def __init__(self, delay):
        self.delay = delay

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(self.delay)


class StopGroupOne(TrainerCallback):
    """Group 1 alone asks to stop at its evaluation of step `at` (as `EarlyStoppingCallback` would)."""

    def __init__(self, trainer, at):
        self.trainer, self.at = trainer, at

    def on_evaluate(self, args, state, control, **kwargs):
        if self.trainer.group_index == 1 and state.global_step >= self.at:
            control.should_training_stop = True


def await_live_peers(trainer, timeout):
    """Groups launched apart: refresh from the peer store until every peer is live (at most `timeout` seconds), so
    that the final evaluation scores the pair whichever group started first. Every rank of the group calls it."""
    peers = trainer.peer_copies
    for _ in range(int(timeout / 0.5)):  # a count, not a clock: every rank of the group stops at the same round
        if len(peers.live) == len(peers.peer_groups):
            return
        time.sleep(0.5)
        peers.refresh(trainer.state.global_step)


def main():
    parser = HfArgumentParser(CodistillTrainingArguments)
    args, extra = parser.parse_args_into_dataclasses(return_remaining_strings=True)
    # Options of this script are spelled `--x-name=value` so that argparse never takes them for abbreviations.
    options = dict(arg[4:].split("=", 1) for arg in extra if arg.startswith("--x-") and "=" in arg)
    train_data, eval_data = digits_dataset(int(options.get("num_train", 256)))
    seen = []  # with --x-stream=1: an id of every training example this rank's data loader collates
    if options.get("stream") == "1":
        train_data = as_stream(train_data)
        args.remove_unused_columns = False  # the collator takes the examples' `index` out
    if args.codistill:
        set_seed(args.group_seed)
        trainer_cls = CodistillTrainer
    else:
        set_seed(args.seed)
        trainer_cls = Trainer
    trainer_kwargs = {}
    lora = options.get("lora")
    if lora == "group_1_only":  # adapters on some groups only (group 1 of 2)
        lora = "shared_base" if args.group_seed != args.seed else None
    if lora in ("shared_base", "own_base"):
        # LoRA on one frozen base: built under one seed in every group (or, `own_base`, under the group's seed).
        from peft import LoraConfig

        torch.manual_seed(1234 if lora == "shared_base" else args.group_seed)
        model = tiny_vit(int(options.get("hidden_size", 32)))
        set_seed(args.group_seed)
        trainer_kwargs["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                   modules_to_save=["classifier"])
    else:
        model = tiny_vit(int(options.get("hidden_size", 32)))
    if "stop_group_one_at" in options:
        # Groups that decide differently: group 0's `score` improves at every evaluation, group 1's never after the
        # first, and group 1 alone asks to stop.
        def scores(prediction):
            return {"score": float(trainer.state.global_step * (1 if trainer.group_index == 0 else -1))}

        trainer_kwargs["compute_metrics"] = scores
    if options.get("accuracy") == "1":
        trainer_kwargs["compute_metrics"] = accuracy
    if options.get("stream") == "1":
        def collate(features):
            indices = [int(feature.pop("index")) for feature in features if "index" in feature]
            if trainer.is_in_train:  # training batches only, not the evaluation's
                seen.extend(indices)
            return default_data_collator(features)

        trainer_kwargs["data_collator"] = collate
    trainer = trainer_cls(model=model, args=args, train_dataset=train_data, eval_dataset=eval_data, **trainer_kwargs)
    recorder = Recorder(trainer)
    trainer.add_callback(recorder)
    if "stop_group_one_at" in options:
        trainer.add_callback(StopGroupOne(trainer, int(options["stop_group_one_at"])))
    if "step_delay" in options:
        trainer.add_callback(SlowSteps(float(options["step_delay"])))
    resume = options.get("resume")
    if options.get("eval_only") != "1":
        trainer.train(resume_from_checkpoint={"true": True, None: None}.get(resume, resume))
    if "await_peers" in options:
        await_live_peers(trainer, float(options["await_peers"]))
    metrics = trainer.evaluate()
    metrics_without_compute_metrics = None
    if options.get("eval_only") == "1":
        trainer.compute_metrics = None
        metrics_without_compute_metrics = trainer.evaluate()
    if options.get("save") == "1":
        trainer.save_model()
    rank = int(os.environ.get("CODISTILL_WORLD_RANK", os.environ.get("RANK", 0)))
    result = {
        "world_rank": rank,
        "group_index": getattr(trainer, "group_index", 0),
        "group_rank": getattr(trainer, "group_rank", trainer.args.process_index),
        "group_size": getattr(trainer, "group_size", trainer.args.world_size),
        "start_params": recorder.start,
        "final_params": checksum(trainer.model.parameters()),
        "steps": recorder.steps,
        "log_history": trainer.state.log_history,
        "eval": metrics,
        "eval_without_compute_metrics": metrics_without_compute_metrics,
        "seen": seen,
        "timeout_s": trainer.topology.timeout.total_seconds() if getattr(trainer, "topology", None) else None,
    }
    with open(os.path.join(options["results"], f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if trainer_cls is Trainer and torch.distributed.is_initialized():
        # The plain DDP reference aborted once at exit on gloo, as the benchmarks' plain workers did.
        exit_plain_worker()


if __name__ == "__main__":
    main()
