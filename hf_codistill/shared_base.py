"""G codistilled students in one process on one base model: each student is an adapter of one `PeftModel`.

Fine-tuning adapters (LoRA and the like, with `peft`) leaves the base weights frozen, so G students need the base once:
`CodistillTrainer(model=base, args=CodistillTrainingArguments(codistill=True, num_groups=4), peft_config=...)` in one
process gives one `PeftModel` with adapters `group_0` ... `group_3`, and the one-process driver trains the four
students (`AdapterStudent`, a view of one adapter) like a list of four models: each its own batches, optimizer,
clipping, checkpoint folder and saved adapter. Memory: one base plus G adapters plus the peers, themselves adapters on
the same base (`hf_codistill.adapters`). `peft` is imported only when this is asked for.
"""

from __future__ import annotations

import copy
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import set_seed

from .adapters import OneAdapter, base_model_of, is_peft_model

STUDENT_ADAPTER = "group_{}"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT's file names, which `PeftModel.from_pretrained` reads


class AdapterStudent(OneAdapter):
    """Student g of the one-process run: adapter `adapter` of the `PeftModel` that every student shares.

    Its forward makes its adapter the active one and runs the shared model. Its parameters are its adapter's alone,
    so Trainer's optimizer, clipping and parameter counts see one student; every student's adapter stays trainable
    (peft would freeze the inactive ones), and only the active one is in a forward's graph.
    The shared model is a registered submodule of every student: modules that hold several students (the
    one-process holder) list its weights once, as `nn.Module` lists a shared module.
    """

    def __init__(self, model: nn.Module, adapter: str, students: tuple[str, ...]):
        super().__init__()
        self.shared_model = model
        self.adapter = adapter
        self.students = students  # every student's adapter
        self.config = base_model_of(model).config
        self.main_input_name = getattr(base_model_of(model), "main_input_name", "input_ids")

    # What Trainer reads from its model to normalise the loss, read from the base as Trainer reads a PEFT model's.
    @property
    def accepts_loss_kwargs(self) -> bool:
        return bool(getattr(base_model_of(self), "accepts_loss_kwargs", True))

    @property
    def loss_type(self) -> str | None:
        return getattr(base_model_of(self), "loss_type", None)

    def activate(self) -> None:
        """Make this student's adapter the active one, and keep every student's trainable."""
        if self.shared_model.active_adapter == self.adapter:
            return
        self.shared_model.set_adapter(self.adapter)  # which freezes every other adapter
        markers = tuple(f".{name}." for name in self.students)
        for name, parameter in self.shared_model.named_parameters():
            if any(marker in name for marker in markers):
                parameter.requires_grad_(True)

    def forward(self, **inputs):
        self.activate()
        return self.shared_model(**inputs)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        marker = f".{self.adapter}."
        prefix = f"{prefix}.shared_model" if prefix else "shared_model"
        for name, parameter in self.shared_model.named_parameters(prefix, recurse, remove_duplicate):
            if marker in name:
                yield name, parameter

    def parameters(self, recurse: bool = True):
        for _, parameter in self.named_parameters(recurse=recurse):
            yield parameter

    def get_base_model(self) -> nn.Module:
        return base_model_of(self)

    def gradient_checkpointing_enable(self, *args, **kwargs):
        return self.shared_model.gradient_checkpointing_enable(*args, **kwargs)

    def gradient_checkpointing_disable(self, *args, **kwargs):
        return self.shared_model.gradient_checkpointing_disable(*args, **kwargs)

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """This student's adapter in PEFT's format, as adapter `default`: `PeftModel.from_pretrained(base,
        save_directory)` loads it (peft's own `save_pretrained` writes any adapter but `default` to a subfolder)."""
        from peft import get_peft_model_state_dict

        os.makedirs(save_directory, exist_ok=True)
        weights = get_peft_model_state_dict(self.shared_model, adapter_name=self.adapter)
        save_file({name: tensor.detach().contiguous() for name, tensor in weights.items()},
                  os.path.join(save_directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        config = copy.deepcopy(self.shared_model.peft_config[self.adapter])
        config.inference_mode = True
        config.save_pretrained(save_directory)

    def load_adapter_weights(self, directory: str) -> None:
        """Load the adapter `save_pretrained` wrote into `directory` (a checkpoint) into this student's adapter."""
        from peft import set_peft_model_state_dict

        path = os.path.join(directory, ADAPTER_WEIGHTS)
        if not os.path.isfile(path):
            raise ValueError(f"Can't find this student's adapter ({ADAPTER_WEIGHTS}) in the checkpoint {directory}.")
        result = set_peft_model_state_dict(self.shared_model, load_file(path), adapter_name=self.adapter)
        unexpected = list(getattr(result, "unexpected_keys", []))
        if unexpected:
            raise ValueError(f"The adapter in {directory} does not fit adapter {self.adapter!r}: {unexpected[:3]} ...")


def adapter_students(model: nn.Module, peft_config, seeds: list[int]) -> list[AdapterStudent]:
    """One `AdapterStudent` per seed on one base: `model` with adapters of `peft_config`, or a `PeftModel` with one
    adapter (student 0's) and more of its configuration. Student g's adapter is initialised under `seeds[g]`."""
    if peft_config is None and not is_peft_model(model):
        raise ValueError(
            "One model in one process trains G students as G adapters of it: pass `peft_config=` (e.g. a "
            "`peft.LoraConfig`) or a `PeftModel`; to train G whole models, pass a list of G models."
        )
    if is_peft_model(model) and (peft_config is not None or len(model.peft_config) != 1):
        raise ValueError(
            "`model` already carries adapters: pass a `PeftModel` with exactly one adapter (the students copy its "
            "configuration) and no `peft_config`, or pass its base model with `peft_config`."
        )
    names = []
    for group, seed in enumerate(seeds):
        set_seed(seed)  # Trainer sets its own seed again when it starts
        if group == 0 and is_peft_model(model):
            shared, name = model, model.active_adapter
        elif group == 0:
            from peft import get_peft_model

            name = STUDENT_ADAPTER.format(group)
            shared = get_peft_model(model, peft_config, adapter_name=name)
        else:
            name = STUDENT_ADAPTER.format(group)
            shared.add_adapter(name, shared.peft_config[names[0]])
        names.append(name)
    students = [AdapterStudent(shared, name, tuple(names)) for name in names]
    shared.set_adapter(names[1])  # so that `activate` below runs and leaves every student's adapter trainable
    students[0].activate()
    return students


def are_adapter_students(models: list[nn.Module]) -> bool:
    return bool(models) and all(isinstance(model, AdapterStudent) for model in models)


@torch.no_grad()
def copy_adapter(source: OneAdapter, target: OneAdapter) -> None:
    for into, value in zip(target.tensors().values(), source.tensors().values()):
        into.copy_(value)
