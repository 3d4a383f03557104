"""Workarounds for transformers behaviour that would silently change what a run trains (or what its model card says),
each with its reason."""

from __future__ import annotations

import inspect
import os

from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

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
    """Make Trainer normalise `model`'s loss the way the model computes it (both workarounds below)."""
    disable_unsupported_loss_kwargs(model)
    name_causal_lm_loss(model)


def name_causal_lm_loss(model: nn.Module) -> bool:
    """Give causal LMs whose class name hides it (e.g. `GPT2LMHeadModel`) `loss_type = "ForCausalLM"`; True if it
    changed anything.

    Their `loss_function` already falls back to the causal LM loss, which shifts the labels, but Trainer reads
    `loss_type` to decide whether to count `labels[..., 1:]` for `num_items_in_batch`: without it, it counts one label
    too many per row and the training loss reads (T - 1) / T of the model's own (measured: 3.39 for 3.88 at T = 8).
    """
    causal_lm = type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
    if not causal_lm or getattr(model, "loss_type", "") is not None:
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
