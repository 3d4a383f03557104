"""Workarounds for transformers behaviour that would silently change what a run trains, each with its reason."""

from __future__ import annotations

import inspect

from torch import nn


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
