"""Where hf_codistill depends on transformers' internals: the private `Trainer` hooks it overrides or calls, and
workarounds for behaviour that would silently change what a run trains (or what its model card says), each with its
reason."""

from __future__ import annotations

import inspect
import os

import torch
from safetensors import safe_open
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import SAFE_WEIGHTS_NAME

from .adapters import base_model_of
from .peer_forward import is_causal_lm

# The transformers versions on which every hook below was checked (`tests/test_compat.py` checks that they exist with
# the parameters used here; pyproject.toml pins the range).
CHECKED_TRANSFORMERS = ("5.18", "5.24")

# Private `Trainer` methods hf_codistill overrides or calls: name -> (the parameters it relies on, who, why).
PRIVATE_TRAINER_HOOKS = {
    "_determine_best_metric": (
        ("metrics", "trial"), "CodistillTrainer", "groups agree on saving the best checkpoint and on early stopping"),
    "_set_signature_columns_if_needed": (
        (), "one process", "keep the input columns any of the models takes (the holder's `forward` names none)"),
    "_get_dataloader": (
        ("dataset", "description", "batch_size", "sampler_fn", "is_training"), "one process",
        "a training loader of G batches per step, each model's from its own order"),
    "_get_num_items_in_batch": (
        ("batch_samples", "device"), "one process", "count each model's labels the way its loss normalises by them"),
    "_clip_grad_norm": (("model",), "one process", "clip each model's gradients on its own"),
    "_get_grad_norm": (("model", "grad_norm"), "one process", "report each model's gradient norm without clipping"),
    "_track_num_input_tokens": (("inputs",), "one process", "count model 0's tokens, as group 0 does when launched"),
    "_save_optimizer_and_scheduler": (
        ("output_dir",), "one process", "each model's optimizer and scheduler in its own folder"),
    "_load_optimizer_and_scheduler": (
        ("checkpoint",), "one process", "the counterpart of `_save_optimizer_and_scheduler`"),
    "_load_from_checkpoint": (
        ("resume_from_checkpoint", "model"), "one process", "each model's weights from its own group's checkpoint"),
    "_load_best_model": ((), "one process", "`load_best_model_at_end` for every model"),
    "_save": (("output_dir", "state_dict"), "one process",
              "save a student adapter of one shared base in PEFT's format (Trainer does so for `PeftModel`s only)"),
}


def reload_renamed_weights(model: nn.Module, checkpoint: str) -> None:
    """Reload a checkpoint's weights through `from_pretrained`, which applies the model's key renaming.

    Trainer's resume loads the raw state dict; for models whose saved names differ from their module names (ViT in
    transformers 5.2x) it silently keeps the current weights, and resumed runs drift off their trajectory.
    """
    weights = os.path.join(checkpoint, SAFE_WEIGHTS_NAME)
    if not isinstance(model, PreTrainedModel) or not os.path.isfile(weights):
        return
    with safe_open(weights, framework="pt") as saved_file:
        if set(saved_file.keys()) <= set(model.state_dict()):
            return  # nothing renamed: the raw state dict loaded every weight
    saved = type(model).from_pretrained(checkpoint, config=model.config)
    with torch.no_grad():
        model.load_state_dict(saved.state_dict(), strict=False)

_SCRATCH_AS_FINE_TUNED = "This model is a fine-tuned version of [](https://huggingface.co/) on "


def say_trained_from_scratch(card_path: str) -> None:
    """Trainer's card calls a model whose config names no source (`_name_or_path == ""`, as the recipes leave models
    built from a config) "a fine-tuned version of []": only `None` reads as trained from scratch there."""
    if not os.path.isfile(card_path):
        return
    with open(card_path, encoding="utf-8") as f:
        card = f.read()
    if _SCRATCH_AS_FINE_TUNED in card:
        with open(card_path, "w", encoding="utf-8") as f:
            f.write(card.replace(_SCRATCH_AS_FINE_TUNED, "This model was trained from scratch on "))


def align_loss_accounting(model: nn.Module) -> None:
    """Make Trainer normalise `model`'s loss the way the model computes it (both workarounds below); for a PEFT
    model, its base model's, which Trainer reads through it."""
    model = base_model_of(model)
    disable_unsupported_loss_kwargs(model)
    name_causal_lm_loss(model)


def name_causal_lm_loss(model: nn.Module) -> bool:
    """Give causal LMs whose class name hides it (e.g. `GPT2LMHeadModel`) `loss_type = "ForCausalLM"`; True if it
    changed anything.

    Their `loss_function` already falls back to the causal LM loss, which shifts the labels, but Trainer reads
    `loss_type` to decide whether to count `labels[..., 1:]` for `num_items_in_batch`: without it, it counts one label
    too many per row and the training loss reads (T - 1) / T of the model's own (measured: 3.39 for 3.88 at T = 8).
    """
    if not is_causal_lm(model) or getattr(model, "loss_type", "") is not None:
        return False
    model.loss_type = "ForCausalLM"
    return True


def disable_unsupported_loss_kwargs(model: nn.Module) -> bool:
    """Stop Trainer from rescaling the loss of models that ignore `num_items_in_batch`; True if it changed anything.

    Trainer (transformers 5.x) passes `num_items_in_batch` to any model whose `forward` takes `**kwargs` and multiplies
    the returned loss by the number of processes, assuming the model summed over tokens. Models that still return a
    plain mean (e.g. `BertForMaskedLM`) then train and evaluate with loss and gradients multiplied by the world size:
    measured here, all-MiniLM-L6-v2's eval loss read 21.5 on 2 processes against 10.7 on one. With
    `accepts_loss_kwargs = False` Trainer averages per-device means instead, as for any model without loss kwargs.
    """
    if hasattr(model, "accepts_loss_kwargs"):
        return False
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return False
    if "loss_function" in source or "num_items_in_batch" in source:
        return False
    model.accepts_loss_kwargs = False
    return True
