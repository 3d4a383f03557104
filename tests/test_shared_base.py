"""G students in one process as G adapters of one base model (`hf_codistill.shared_base`): tiny ViTs with LoRA on
scikit-learn's digits, compared with plain `Trainer` runs of one `PeftModel` each."""

import copy
import os
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
    set_seed,
)

from hf_codistill import CodistillTrainer, CodistillTrainingArguments
from hf_codistill.adapters import AdapterPeer, own_adapter_tensors
from hf_codistill.one_process import OneProcessCodistillTrainer
from hf_codistill.peer_forward import is_causal_lm
from hf_codistill.shared_base import AdapterStudent
from tests.scripts.train_digits import checksum, digits_dataset

LORA = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                  modules_to_save=["classifier"])
COMMON = dict(per_device_train_batch_size=16, learning_rate=1e-2, logging_steps=1, report_to="none", use_cpu=True,
              seed=42, disable_tqdm=True)


def vit_base(seed=7):
    """The frozen base: a tiny ViT without dropout, the same weights for every call with the same seed."""
    set_seed(seed)
    return ViTForImageClassification(ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def students_args(out, **overrides):
    return CodistillTrainingArguments(output_dir=str(out), codistill=True, num_groups=3,
                                      **{**COMMON, "save_strategy": "no", **overrides})


def test_alpha_zero_students_follow_their_own_peft_runs_on_one_base(tmp_path):
    """alpha = 0: student g is exactly a plain Trainer run of one `PeftModel` with seed + g (its adapter's
    initialisation and data order), gradient accumulation and clipping included; the base exists once and is not
    trained."""
    train, _ = digits_dataset(96)
    base = vit_base()
    reference_base = copy.deepcopy(base)
    settings = dict(max_steps=4, gradient_accumulation_steps=2, max_grad_norm=0.5)
    trainer = CodistillTrainer(model=base, args=students_args(tmp_path / "students", codistill_alpha=0,
                                                              codistill_sync_every=2, **settings),
                               train_dataset=train, peft_config=LORA)
    assert isinstance(trainer, OneProcessCodistillTrainer)
    assert all(isinstance(student, AdapterStudent) for student in trainer.models)
    shared = trainer.models[0].shared_model
    assert all(student.shared_model is shared for student in trainer.models)
    base_before = checksum(p for name, p in shared.named_parameters() if "lora_" not in name
                           and "modules_to_save" not in name)
    trainer.train()
    # One base, three student adapters and three peer adapters, each as large as a student's.
    adapter_size = sum(p.numel() for p in trainer.models[0].parameters())
    base_size = sum(p.numel() for p in reference_base.parameters())
    assert sum(p.numel() for p in shared.parameters()) == base_size + 6 * adapter_size
    assert {peer.shared_model for peer in trainer.peers.copies} == {shared}
    assert checksum(p for name, p in shared.named_parameters() if "lora_" not in name
                    and "modules_to_save" not in name) == base_before
    for group, student in enumerate(trainer.models):
        set_seed(42 + group)
        alone = get_peft_model(copy.deepcopy(reference_base), LORA)
        plain = Trainer(model=alone, args=TrainingArguments(output_dir=str(tmp_path / f"plain{group}"), **{
            **COMMON, **settings, "save_strategy": "no", "seed": 42 + group}), train_dataset=train)
        plain.train()
        assert checksum(student.tensors().values()) == checksum(own_adapter_tensors(alone).values())


@pytest.fixture(scope="module")
def students_run(tmp_path_factory):
    """Three codistilled students, k = 2, saved every 3 of 6 steps, evaluated."""
    out = tmp_path_factory.mktemp("students")
    train, evaluation = digits_dataset(160)
    args = students_args(out, max_steps=6, codistill_sync_every=2, save_strategy="steps", save_steps=3,
                         eval_strategy="steps", eval_steps=6)
    trainer = CodistillTrainer(model=vit_base(), args=args, train_dataset=train, eval_dataset=evaluation,
                               peft_config=LORA, compute_metrics=accuracy)
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model()
    trainer.create_model_card()
    return trainer, out, metrics


def accuracy(prediction):
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def test_students_distil_from_peer_adapters_and_report_all_pairs(students_run):
    trainer, _, metrics = students_run
    logs = [entry for entry in trainer.state.log_history if "group_2/distill_loss" in entry]
    # At step 1 every student computes the base's function (LoRA starts at zero), so the term starts at zero.
    assert [entry["step"] for entry in logs] == list(range(1, 7))
    assert all(logs[0][f"group_{g}/distill_loss"] == 0 for g in range(3))
    assert all(entry[f"group_{g}/distill_loss"] > 0 for entry in logs[1:] for g in range(3))
    # The peers are adapters of the same base, refreshed at step 6: each equals its student.
    for group, peer in enumerate(trainer.peers.copies):
        assert isinstance(peer, AdapterPeer) and peer.shared_model is trainer.models[0].shared_model
        assert checksum(peer.tensors().values()) == checksum(trainer.models[group].tensors().values())
    assert {"eval_agreement_0_1", "eval_agreement_0_2", "eval_agreement_1_2", "eval_ensemble_accuracy"} <= set(metrics)
    assert all(0 <= metrics[f"group_{g}/eval_accuracy"] <= 1 for g in range(3))
    students = [checksum(student.tensors().values()) for student in trainer.models]
    assert len(set(students)) == 3


def test_each_student_saves_its_adapter_in_peft_format(students_run):
    trainer, out, _ = students_run
    pixels = torch.rand(4, 1, 8, 8)
    for group in range(3):
        folder = out / f"group_{group}"
        assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= set(os.listdir(folder))
        assert "model.safetensors" not in os.listdir(folder)
        loaded = PeftModel.from_pretrained(vit_base(), out, subfolder=f"group_{group}").eval()
        assert set(loaded.peft_config) == {"default"}
        trainer.models[group].eval()
        with torch.no_grad():
            assert torch.allclose(loaded(pixel_values=pixels).logits,
                                  trainer.models[group](pixel_values=pixels).logits, atol=1e-6)
    checkpoint = out / "group_1" / "checkpoint-3"
    assert {"adapter_model.safetensors", "optimizer.pt", "codistill_peers.safetensors"} <= set(os.listdir(checkpoint))
    with open(out / "group_1" / "README.md") as card:
        assert "codistillation" in card.read()


def test_a_resumed_run_of_students_continues_exactly(students_run, tmp_path):
    trainer, out, _ = students_run
    copied = tmp_path / "out"
    shutil.copytree(out, copied)
    for group in range(3):
        shutil.rmtree(copied / f"group_{group}" / "checkpoint-6")
    train, evaluation = digits_dataset(160)
    args = students_args(copied, max_steps=6, codistill_sync_every=2, save_strategy="steps", save_steps=3,
                         eval_strategy="steps", eval_steps=6)
    resumed = CodistillTrainer(model=vit_base(), args=args, train_dataset=train, eval_dataset=evaluation,
                               peft_config=LORA, compute_metrics=accuracy)
    resumed.train(resume_from_checkpoint=True)  # step 3: adapters, optimizers and peers from its checkpoint
    for before, after in zip(trainer.models, resumed.models):
        assert checksum(after.tensors().values()) == checksum(before.tensors().values())
    for before, after in zip(trainer.peers.copies, resumed.peers.copies):
        assert checksum(after.tensors().values()) == checksum(before.tensors().values())


def test_bad_input_is_refused_with_the_fix(tmp_path):
    model = get_peft_model(vit_base(), LORA)
    model.add_adapter("other", LORA)
    with pytest.raises(ValueError, match="exactly one adapter"):
        CodistillTrainer(model=model, args=students_args(tmp_path))
    with pytest.raises(ValueError, match="peft_config"):
        CodistillTrainer(model=vit_base(), args=students_args(tmp_path))


def test_a_peft_causal_lm_is_scored_as_a_causal_lm():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=16))
    assert is_causal_lm(get_peft_model(gpt2, LoraConfig(r=2, target_modules=["c_attn"], task_type="CAUSAL_LM")))
