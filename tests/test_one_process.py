"""Several codistilled models in one process: tiny ViTs on scikit-learn's digits, compared with plain `Trainer`
runs."""

import copy
import functools
import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments, ViTConfig, ViTForImageClassification, set_seed

from hf_codistill import CodistillTrainer, CodistillTrainingArguments, get_last_checkpoint, model_stack, one_process
from hf_codistill.checkpointing import PEERS_NAME, STATE_NAME
from hf_codistill.one_process import OneProcessCodistillTrainer
from tests.scripts.train_digits import as_stream, checksum, digits_dataset

COMMON = dict(per_device_train_batch_size=16, learning_rate=1e-3, logging_steps=1, report_to="none", use_cpu=True,
              seed=42, save_strategy="no", disable_tqdm=True)


def vit(seed, hidden_size=32, num_labels=10, dropout=0.0):
    set_seed(seed)
    return ViTForImageClassification(ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=hidden_size, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=2 * hidden_size, num_labels=num_labels, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    ))


def _softmax(logits):
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def codistill_args(out, **overrides):
    return CodistillTrainingArguments(output_dir=str(out), codistill=True, num_groups=2, **{**COMMON, **overrides})


def by_step(log_history, key):
    return {entry["step"]: entry[key] for entry in log_history if key in entry}


class Recorder(TrainerCallback):
    """Per optimizer step: each model's checksum and each peer copy's."""

    def __init__(self, trainer):
        self.trainer, self.steps = trainer, []

    def on_step_end(self, args, state, control, **kwargs):
        peers = self.trainer.peers
        self.steps.append({
            "models": [checksum(m.parameters()) for m in self.trainer.models],
            "peers": None if peers.live else [checksum(p.parameters()) for p in peers.copies],
        })


def test_list_of_models_gives_the_one_process_trainer(tmp_path):
    trainer = CodistillTrainer(model=[vit(0), vit(1)], args=codistill_args(tmp_path),
                               train_dataset=digits_dataset(32)[0])
    assert isinstance(trainer, OneProcessCodistillTrainer) and isinstance(trainer, CodistillTrainer)
    assert len(trainer.models) == 2 and trainer.num_groups == 2
    with pytest.raises(ValueError, match="num_groups=3"):
        CodistillTrainer(model=[vit(0), vit(1), vit(2)], args=codistill_args(tmp_path))


def test_alpha_zero_equals_plain_trainer_per_model_with_per_model_clipping(tmp_path):
    """alpha = 0: each model follows exactly its own plain Trainer run (seed + g), gradient accumulation, epoch
    boundaries and gradient clipping included, even though model 1's gradients are thousands of times larger."""
    train, _ = digits_dataset(48)
    models = [vit(0), vit(1)]
    with torch.no_grad():
        models[1].classifier.weight.mul_(1e4)
    alone = [copy.deepcopy(m) for m in models]
    settings = dict(max_steps=4, gradient_accumulation_steps=2, optim="sgd", learning_rate=0.05, max_grad_norm=1.0)
    trainer = CodistillTrainer(model=models, args=codistill_args(tmp_path / "codistill", codistill_alpha=0,
                                                                 codistill_sync_every=3, **settings),
                               train_dataset=train)
    trainer.train()
    logs = trainer.state.log_history
    assert min(by_step(logs, "group_1/grad_norm").values()) > 100 * max(by_step(logs, "group_0/grad_norm").values())
    for group, model in enumerate(alone):
        plain_args = TrainingArguments(output_dir=str(tmp_path / f"plain{group}"), **{**COMMON, **settings,
                                                                                       "seed": 42 + group})
        plain = Trainer(model=model, args=plain_args, train_dataset=train)
        plain.train()
        assert checksum(trainer.models[group].parameters()) == checksum(model.parameters())
        expected = by_step(plain.state.log_history, "loss")
        assert by_step(logs, f"group_{group}/loss") == pytest.approx(expected, rel=1e-6)


def test_peers_stay_stale_until_every_kth_step(tmp_path):
    train, _ = digits_dataset(64)
    args = codistill_args(tmp_path, max_steps=7, codistill_sync_every=3)
    trainer = CodistillTrainer(model=[vit(0), vit(1)], args=args, train_dataset=train)
    recorder = Recorder(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    peers = [s["peers"] for s in recorder.steps]
    changed = [step for step in range(2, 8) if peers[step - 1] != peers[step - 2]]
    assert changed == [3, 6]
    for step in (3, 6):
        assert peers[step - 1] == recorder.steps[step - 1]["models"]
    logs = trainer.state.log_history
    for group in (0, 1):
        task, distill = by_step(logs, f"group_{group}/task_loss"), by_step(logs, f"group_{group}/distill_loss")
        total = by_step(logs, f"group_{group}/loss")
        assert all(distill[s] > 0 and total[s] == pytest.approx(task[s] + distill[s], rel=1e-5) for s in total)
    assert by_step(logs, "group_0/loss") == pytest.approx(by_step(logs, "loss"), rel=1e-6)
    assert by_step(logs, "group_0/peer_exchanges")[7] == 3  # steps 0, 3 and 6


def test_peer_copies_in_bfloat16_are_the_rounded_models(tmp_path):
    train, _ = digits_dataset(64)
    args = codistill_args(tmp_path, max_steps=4, codistill_sync_every=2, codistill_peer_dtype="bfloat16")
    trainer = CodistillTrainer(model=[vit(0), vit(1)], args=args, train_dataset=train)
    rounded = []
    trainer.add_callback(type("Rounded", (TrainerCallback,), {"on_step_end": lambda self, *a, **k: rounded.append(
        [checksum(p.to(torch.bfloat16) for p in m.parameters()) for m in trainer.models])})())
    trainer.train()
    assert {p.dtype for copy_ in trainer.peers.copies for p in copy_.parameters()} == {torch.bfloat16}
    assert {p.dtype for model in trainer.models for p in model.parameters()} == {torch.float32}
    assert [checksum(p.parameters()) for p in trainer.peers.copies] == rounded[3]  # refreshed at step 4
    distill = by_step(trainer.state.log_history, "group_0/distill_loss")
    assert len(distill) == 4 and all(0 < value < 10 for value in distill.values())


def test_fresh_peers_are_the_live_models(tmp_path, monkeypatch):
    """k = 1 distils from the live models (no copies); that is the same as copies refreshed after every step."""
    train, _ = digits_dataset(64)
    args = dict(max_steps=4, codistill_sync_every=1)
    live = CodistillTrainer(model=[vit(0), vit(1)], args=codistill_args(tmp_path / "live", **args),
                            train_dataset=train)
    live.train()
    assert live.peers.live and live.peers.copies is None
    local_peers = one_process.LocalPeers
    monkeypatch.setattr(one_process, "LocalPeers",
                        lambda models, live, dtype, **kwargs: local_peers(models, False, dtype, **kwargs))
    copied = CodistillTrainer(model=[vit(0), vit(1)], args=codistill_args(tmp_path / "copies", **args),
                              train_dataset=train)
    copied.train()
    assert copied.peers.copies is not None
    for a, b in zip(live.models, copied.models):
        assert checksum(a.parameters()) == checksum(b.parameters())


def test_shared_batch_keeps_identical_models_identical(tmp_path):
    """One batch for all models: from one initialisation, without dropout, the models never part."""
    train, _ = digits_dataset(64)
    args = codistill_args(tmp_path, max_steps=4, codistill_shared_init=True, codistill_sync_every=2,
                          codistill_shared_batch=True)
    trainer = CodistillTrainer(model=[vit(0), vit(1)], args=args, train_dataset=train)
    trainer.train()
    assert checksum(trainer.models[0].parameters()) == checksum(trainer.models[1].parameters())
    assert by_step(trainer.state.log_history, "group_1/task_loss") == by_step(trainer.state.log_history, "task_loss")


def train_on_stream(out, num_examples, max_steps, hf_stream=False):
    """Two models trained in one process on the first `num_examples` digits as a stream (a torch `IterableDataset`,
    or a `datasets.IterableDataset` with `hf_stream`); returns the trainer and, per model forward, (model, batch
    size, sum of the pixels)."""
    train, _ = digits_dataset(num_examples)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return (train[index] for index in range(len(train)))

    trainer = CodistillTrainer(model=[vit(0), vit(1)], args=codistill_args(out, max_steps=max_steps),
                               train_dataset=as_stream(train) if hf_stream else Stream())
    seen = []
    compute_loss = trainer.compute_loss

    def recording_compute_loss(model, inputs, *args, **kwargs):
        pixels = inputs["pixel_values"]
        seen.append((trainer.models.index(model), pixels.shape[0], float(pixels.sum())))
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording_compute_loss
    trainer.train()
    return trainer, seen, train


@pytest.mark.parametrize("hf_stream", [False, True], ids=["torch", "datasets"])
def test_a_stream_deals_each_model_a_full_batch_of_its_own(tmp_path, hf_stream):
    """An iterable dataset has no per-model order: every model still gets b examples per step, not b / G, and
    together the models read the whole stream once (one process does not split it between groups)."""
    _, seen, train = train_on_stream(tmp_path, 96, max_steps=3, hf_stream=hf_stream)
    assert [(model, size) for model, size, _ in seen] == [(0, 16), (1, 16)] * 3
    assert all(seen[2 * step][2] != seen[2 * step + 1][2] for step in range(3))
    assert sum(pixels for _, _, pixels in seen) == pytest.approx(float(train.pixels.sum()), rel=1e-6)


def test_a_stream_tail_shorter_than_the_number_of_models_goes_to_every_model(tmp_path):
    """33 examples, b = 16, G = 2: the stream's last batch holds 1 example; both models train on it (no empty
    batch)."""
    trainer, seen, train = train_on_stream(tmp_path, 33, max_steps=4)
    assert [(model, size) for model, size, _ in seen] == [(0, 16), (1, 16), (0, 1), (1, 1)] * 2
    assert seen[2][2] == seen[3][2] == float(train[32]["pixel_values"].sum())
    assert all(math.isfinite(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry)


def test_split_per_model_cuts_per_example_values_at_the_same_boundaries():
    """5 examples for 2 models (a stream's uneven last batch): rows 0-2 and 3-4, in tensors and lists alike; values
    that are not per example go to both models."""
    batch = {"pixel_values": torch.arange(10).reshape(5, 2), "labels": torch.arange(5), "ids": list("abcde"),
             "meta": ["m"], "mode": "train", "scale": torch.tensor(2.0)}
    first, second = model_stack.split_per_model(batch, 2)
    assert first["labels"].tolist() == [0, 1, 2] and second["labels"].tolist() == [3, 4]
    assert first["pixel_values"].tolist() == [[0, 1], [2, 3], [4, 5]] and first["ids"] == list("abc")
    assert second["ids"] == list("de")
    assert all(part["meta"] == ["m"] and part["mode"] == "train" and part["scale"] == 2.0 for part in (first, second))
    # Fewer examples than models: every model gets the whole batch.
    parts = model_stack.split_per_model({"labels": torch.tensor([0])}, 3)
    assert all(part["labels"].tolist() == [0] for part in parts)


def test_a_model_card_without_training_has_a_folder_per_model(tmp_path):
    """`--do_eval` without `--do_train`: nothing is saved, yet each model's card has its group folder to go to."""
    trainer = CodistillTrainer(model=[vit(0), vit(1)], args=codistill_args(tmp_path / "out"))
    trainer.create_model_card()
    assert all("codistillation" in (tmp_path / "out" / f"group_{g}" / "README.md").read_text() for g in (0, 1))


def test_input_tokens_seen_are_model_zeros(tmp_path):
    """`include_num_input_tokens_seen` counts model 0's inputs (8 x 8 pixels per image for a ViT), as group 0 does."""
    args = codistill_args(tmp_path, max_steps=3, include_num_input_tokens_seen="all")
    trainer = CodistillTrainer(model=[vit(0), vit(1)], args=args, train_dataset=digits_dataset(64)[0])
    trainer.train()
    assert trainer.state.num_input_tokens_seen == 3 * 16 * 8 * 8


def test_peers_must_share_the_output_space(tmp_path):
    train, _ = digits_dataset(32)
    trainer = CodistillTrainer(model=[vit(0), vit(1, num_labels=5)], args=codistill_args(tmp_path, max_steps=1),
                               train_dataset=train)
    with pytest.raises(ValueError, match=r"this model's logits have 10 classes, its peer's 5"):
        trainer.train()


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A small and a larger ViT, with dropout, checkpointed every 3 steps across two epochs (4 steps each)."""
    out = tmp_path_factory.mktemp("one_process") / "out"
    train, val = digits_dataset(64)

    def run(resume=None):
        models = [vit(0, dropout=0.1), vit(1, hidden_size=48, dropout=0.1)]
        args = codistill_args(out, max_steps=9, codistill_sync_every=4, save_strategy="steps", save_steps=3,
                              save_total_limit=2, per_device_eval_batch_size=64)
        trainer = CodistillTrainer(model=models, args=args, train_dataset=train, eval_dataset=val,
                                   compute_metrics=accuracy)
        trainer.train(resume_from_checkpoint=resume)
        trainer.save_model()
        return trainer

    return out, run, run()


def accuracy(eval_pred):
    return {"accuracy": float((eval_pred.predictions.argmax(-1) == eval_pred.label_ids).mean())}


def test_save_layout_and_resume(saved_run, tmp_path):
    out, run, trainer = saved_run
    final = [checksum(m.parameters()) for m in trainer.models]
    # The distributed mode's layout: one folder per model, complete checkpoints, rotation, group 0 at the root.
    for group in (0, 1):
        checkpoints = sorted(p.name for p in (out / f"group_{group}").glob("checkpoint-*"))
        assert checkpoints == ["checkpoint-6", "checkpoint-9"]
        checkpoint = out / f"group_{group}" / "checkpoint-6"
        for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
                     PEERS_NAME, STATE_NAME):
            assert (checkpoint / name).is_file(), name
        assert json.loads((checkpoint / STATE_NAME).read_text())["last_exchange_step"] == 4
        assert {key.split(".")[0] for key in load_file(checkpoint / PEERS_NAME)} == {f"group_{1 - group}"}
        saved = ViTForImageClassification.from_pretrained(out, subfolder=f"group_{group}")
        assert checksum(saved.parameters()) == final[group]
    assert checksum(ViTForImageClassification.from_pretrained(out).parameters()) == final[0]
    assert get_last_checkpoint(str(out), num_groups=2) == 9
    assert json.loads((out / "codistill.json").read_text())["groups"] == ["group_0", "group_1"]
    trainer.create_model_card()
    assert all("codistillation" in (out / f"group_{g}" / "README.md").read_text() for g in (0, 1))

    # Resuming mid-epoch from step 6 (dropout, skipped batches, peers from the checkpoint) retraces the same run.
    for group in (0, 1):
        shutil.rmtree(out / f"group_{group}" / "checkpoint-9")
    resumed = run(resume=True)
    assert [checksum(m.parameters()) for m in resumed.models] == final
    resumed_loss = by_step(resumed.state.log_history, "group_1/loss")[9]
    assert resumed_loss == by_step(trainer.state.log_history, "group_1/loss")[9]


def test_evaluation_reports_each_model_the_ensemble_and_agreement(saved_run):
    _, _, trainer = saved_run
    metrics = trainer.evaluate()
    output = trainer.predict(trainer.eval_dataset)
    logits, labels = output.predictions, output.label_ids
    assert len(logits) == 2
    top1 = [model_logits.argmax(-1) for model_logits in logits]
    probabilities = np.mean([_softmax(model_logits) for model_logits in logits], axis=0)
    assert metrics["eval_accuracy"] == metrics["group_0/eval_accuracy"] == pytest.approx(np.mean(top1[0] == labels))
    assert metrics["group_1/eval_accuracy"] == pytest.approx(np.mean(top1[1] == labels))
    assert metrics["eval_ensemble_accuracy"] == pytest.approx(np.mean(probabilities.argmax(-1) == labels))
    expected_loss = -np.mean(np.log(probabilities[np.arange(len(labels)), labels]))
    assert metrics["eval_ensemble_loss"] == pytest.approx(expected_loss, rel=1e-5)
    agreement = np.mean(top1[0] == top1[1])
    assert metrics["eval_agreement_0_1"] == metrics["eval_agreement_mean"] == pytest.approx(agreement)
    assert metrics["group_0/eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-6)
    assert metrics["group_1/eval_loss"] != metrics["group_0/eval_loss"]


@pytest.mark.parametrize("architecture", ["bert", "gpt2"])
def test_language_model_losses_are_the_models_own_under_gradient_accumulation(tmp_path, architecture):
    """BERT's forward takes `**kwargs` but ignores `num_items_in_batch`; GPT-2's loss shifts its labels, so Trainer
    must count one label less per row. Either way one step on 8 copies of one sequence logs each model's own loss on
    it, and moves the weights alike whether the 8 come as one batch or as 2 accumulated batches of 4."""
    from datasets import Dataset
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    def build(seed):
        set_seed(seed)
        if architecture == "bert":
            return BertForMaskedLM(BertConfig(
                vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            ))
        return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))

    ids = list(range(3, 11))
    labels = [token if architecture == "gpt2" or i % 2 else -100 for i, token in enumerate(ids)]
    train = Dataset.from_list([{"input_ids": ids, "attention_mask": [1] * 8, "labels": labels}] * 8)
    with torch.no_grad():
        batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, 8, dtype=torch.long),
                 "labels": torch.tensor([labels])}
        expected = [build(group).eval()(**batch).loss.item() for group in (0, 1)]
    trained = {}
    for accumulation, batch_size in ((1, 8), (2, 4)):
        args = codistill_args(tmp_path / str(accumulation), max_steps=1, per_device_train_batch_size=batch_size,
                              gradient_accumulation_steps=accumulation, codistill_alpha=0, optim="sgd",
                              learning_rate=0.5)
        trainer = CodistillTrainer(model=[build(0), build(1)], args=args, train_dataset=train)
        # Trainer sets `use_cache` on its model's config; every model gets it, not only the one the holder lends.
        assert len({getattr(model.config, "use_cache", None) for model in trainer.models}) == 1
        trainer.train()
        for group in (0, 1):
            assert by_step(trainer.state.log_history, f"group_{group}/loss")[1] == pytest.approx(expected[group],
                                                                                                 rel=1e-5)
        trained[accumulation] = [torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m in trainer.models]
    for one_batch, accumulated in zip(trained[1], trained[2]):
        torch.testing.assert_close(accumulated, one_batch, rtol=1e-5, atol=1e-6)


def test_label_smoothing_gradient_checkpointing_and_tuple_outputs(tmp_path):
    """Under label smoothing Trainer computes the loss from the labels it took out of the inputs, so a model that
    returns a tuple puts its logits first; and Trainer asks the model holder for its config and to checkpoint."""
    models = [vit(0), vit(1)]
    for model in models:
        model.forward = functools.wraps(model.forward)(
            lambda *args, _forward=model.forward, **kwargs: _forward(*args, **kwargs).to_tuple()
        )
    args = codistill_args(tmp_path, max_steps=2, label_smoothing_factor=0.1, gradient_checkpointing=True,
                          codistill_sync_every=1)
    trainer = CodistillTrainer(model=models, args=args, train_dataset=digits_dataset(32)[0])
    trainer.train()
    # `is_activation_checkpointing` from transformers 5.2x on (the older name warns there).
    name = "is_activation_checkpointing" if hasattr(type(models[0]), "is_activation_checkpointing") else (
        "is_gradient_checkpointing")
    assert all(getattr(model, name) for model in trainer.models)
    distill = by_step(trainer.state.log_history, "group_0/distill_loss")
    assert len(distill) == 2 and all(math.isfinite(value) and value > 0 for value in distill.values())


def test_checkpoints_of_an_abandoned_trajectory_are_not_resumed(tmp_path):
    """Resumed from step 2, a run branches off the earlier run: its checkpoint-4 is unmarked from the start, so it is
    never picked for resuming, nor vouched for while this run rewrites it in place."""
    train, _ = digits_dataset(48)

    def trainer_for(max_steps):
        args = codistill_args(tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=2,
                              per_device_train_batch_size=8)
        return CodistillTrainer(model=[vit(0), vit(1)], args=args, train_dataset=train)

    trainer_for(4).train()
    assert get_last_checkpoint(str(tmp_path), num_groups=2) == 4
    seen = {}

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stale = [(tmp_path / f"group_{g}" / "checkpoint-4" / STATE_NAME).is_file() for g in (0, 1)]
            seen[state.global_step] = (stale, get_last_checkpoint(str(tmp_path), num_groups=2))

    resumed = trainer_for(3)
    resumed.add_callback(Probe())
    resumed.train(resume_from_checkpoint=str(tmp_path / "group_0" / "checkpoint-2"))
    assert seen == {3: ([False, False], 2)}
    assert (tmp_path / "group_1" / "checkpoint-4" / "model.safetensors").is_file()  # kept, only not resumable
    assert get_last_checkpoint(str(tmp_path), num_groups=2) == 3  # this run's last step, saved at the end


def test_rotation_drops_incomplete_checkpoints_older_than_a_complete_one(tmp_path):
    from hf_codistill.checkpointing import rotate_group_checkpoints

    for step, complete in ((3, False), (5, True), (7, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / STATE_NAME).write_text("{}")
    rotate_group_checkpoints(str(tmp_path), save_total_limit=1)
    # 7 may be being written; 3 can never be resumed from.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5", "checkpoint-7"]


def test_each_model_card_reports_its_own_model(tmp_path):
    """One process logs model 0's metrics under the plain keys: model 1's card must read `group_1/...` instead; and
    models built from a config are "trained from scratch", not "a fine-tuned version of []"."""
    train, val = digits_dataset(32)
    trainer = CodistillTrainer(model=[vit(0), vit(1)], args=codistill_args(tmp_path, max_steps=2), train_dataset=train,
                               eval_dataset=val, compute_metrics=accuracy)
    trainer.train()
    metrics = trainer.evaluate()
    assert metrics["group_0/eval_loss"] != metrics["group_1/eval_loss"]
    trainer.create_model_card()
    for group in (0, 1):
        card = (tmp_path / f"group_{group}" / "README.md").read_text()
        own = card.split("### This model's evaluation")[1].split("###")[0]
        assert f"| eval_loss | {metrics[f'group_{group}/eval_loss']:.4g} |" in own
        assert f"| eval_accuracy | {metrics[f'group_{group}/eval_accuracy']:.4g} |" in own
        assert "trained from scratch" in card and "fine-tuned version of []" not in card
