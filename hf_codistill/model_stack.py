"""The parts of one process's G models that Trainer sees as one: the module that holds them, the sampler and batch
splitting that give each model its own batch, and the optimizers and schedulers stepped together."""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import torch
from torch import nn

from .compat import align_loss_accounting
from .topology import get_topology, launched_world_size

_UNSUPPORTED_SCHEDULERS = ("reduce_lr_on_plateau", "greedy")


def _on_every_model(method: str):
    """A `CodistilledModels` method that calls `method` of every model with the same arguments."""

    def call(self, *args, **kwargs):
        for model in self.models:
            getattr(model, method)(*args, **kwargs)

    call.__name__ = method
    return call


class CodistilledModels(nn.Module):
    """The models as one module, so Trainer places and zeroes them together; each model runs on its own."""

    def __init__(self, models: list[nn.Module]):
        super().__init__()
        for model in models:
            align_loss_accounting(model)
        self.models = nn.ModuleList(models)
        self.main_input_name = getattr(models[0], "main_input_name", "input_ids")
        # Trainer reads these from its model: whether the loss shifts labels (the token count under gradient
        # accumulation), label smoothing's checks. The models share an architecture, so model 0 speaks for all.
        self.loss_type = getattr(models[0], "loss_type", None)
        self.config = getattr(models[0], "config", None)

    def share_use_cache(self) -> None:
        """Trainer sets `use_cache` on its model's config, which this module lends from model 0: give it to all."""
        use_cache = getattr(self.config, "use_cache", None)
        for model in self.models[1:]:
            if use_cache is not None and getattr(model, "config", None) is not None:
                model.config.use_cache = use_cache

    # Trainer's `gradient_checkpointing` (`activation_checkpointing` from transformers 5.2x on), for every model.
    activation_checkpointing_enable = _on_every_model("activation_checkpointing_enable")
    activation_checkpointing_disable = _on_every_model("activation_checkpointing_disable")
    gradient_checkpointing_enable = _on_every_model("gradient_checkpointing_enable")
    gradient_checkpointing_disable = _on_every_model("gradient_checkpointing_disable")

    @property
    def accepts_loss_kwargs(self) -> bool:
        # Trainer passes `num_items_in_batch` to the model (and skips its own accumulation scaling) only if every
        # model takes it; otherwise all of them get Trainer's per-batch mean.
        return all(_accepts_loss_kwargs(model) for model in self.models)

    def forward(self, *args, **kwargs):
        raise TypeError(
            "The codistilled models run one by one: call `trainer.models[g](...)`, not the module that holds them."
        )


def _accepts_loss_kwargs(model: nn.Module) -> bool:
    if hasattr(model, "accepts_loss_kwargs"):
        return bool(model.accepts_loss_kwargs)
    parameters = inspect.signature(model.forward).parameters.values()
    return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters)


class PerModelOrderSampler(torch.utils.data.Sampler[int]):
    """Indices for G models at once: per step, model 0's batch, then model 1's, ... each from its own order.

    Model g's order in epoch e is `randperm(n)` seeded with `seeds[g] + e`, the order Trainer's (seedable) random
    sampler gives a single model trained with that seed. A `DataLoader` with batch size G x b over these indices yields
    the G batches of a step as one batch (the last one G x the remainder), which `split_per_model` takes apart.
    """

    def __init__(self, num_examples: int, batch_size: int, seeds: list[int]):
        self.num_examples, self.batch_size, self.seeds = num_examples, batch_size, seeds
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_examples * len(self.seeds)

    def __iter__(self) -> Iterator[int]:
        orders = [
            torch.randperm(self.num_examples, generator=torch.Generator().manual_seed(seed + self.epoch)).tolist()
            for seed in self.seeds
        ]
        for start in range(0, self.num_examples, self.batch_size):
            for order in orders:
                yield from order[start : start + self.batch_size]
        self.epoch += 1


def split_per_model(batch: dict, num_models: int) -> list[dict]:
    """Cut a collated batch of G sub-batches (along the first dimension) into one batch per model.

    Tensors and lists as long as the batch are cut at the same boundaries, into G equal parts or as near as a stream's
    last batch allows; other values go to every model. A last batch with fewer examples than there are models goes
    whole to every model, rather than leaving some models an empty batch that their forward cannot take.
    """
    size = _num_examples(batch)
    if size is None or size < num_models:
        return [dict(batch) for _ in range(num_models)]
    sizes = [len(part) for part in torch.arange(size).tensor_split(num_models)]
    starts = [sum(sizes[:group]) for group in range(num_models)]

    def cut(value):
        per_example = (isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size) or (
            isinstance(value, (list, tuple)) and len(value) == size)
        if not per_example:
            return [value] * num_models
        return [value[start:start + length] for start, length in zip(starts, sizes)]

    parts = {key: cut(value) for key, value in batch.items()}
    return [{key: values[group] for key, values in parts.items()} for group in range(num_models)]


def _num_examples(batch: dict) -> int | None:
    """The batch's number of examples: the first dimension of its labels, else of its first tensor, else the length
    of its first list."""
    candidates = [batch["labels"]] if "labels" in batch else []
    candidates += list(batch.values())
    for value in candidates:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return next((len(value) for value in batch.values() if isinstance(value, (list, tuple))), None)


def unwrap_optimizer(optimizer):
    """The optimizer under accelerate's `AcceleratedOptimizer` wrappers."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


class PerModelOptimizers(torch.optim.Optimizer):
    """Each model's optimizer, stepped together: what Trainer's loop (and accelerate's wrapper) sees as one optimizer.

    `Optimizer.__init__` is deliberately not called: the parameter groups and state stay in the models' own
    optimizers, and `param_groups` lists theirs so that accelerate's gradient scaler unscales every model.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)
        self.defaults = self.optimizers[0].defaults

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    @property
    def state(self) -> dict:
        merged = {}
        for optimizer in self.optimizers:
            merged.update(optimizer.state)
        return merged

    def step(self, closure=None):
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"per_model": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        for optimizer, state in zip(self.optimizers, state_dict["per_model"]):
            optimizer.load_state_dict(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(type(o).__name__ for o in self.optimizers)})"


class PerModelSchedulers:
    """Each model's LR scheduler, stepped together; Trainer logs model 0's learning rate."""

    def __init__(self, schedulers: list):
        self.schedulers = list(schedulers)

    def step(self) -> None:
        for scheduler in self.schedulers:
            scheduler.step()

    def get_last_lr(self) -> list[float]:
        return self.schedulers[0].get_last_lr()

    def state_dict(self) -> dict:
        return {"per_model": [scheduler.state_dict() for scheduler in self.schedulers]}

    def load_state_dict(self, state_dict: dict) -> None:
        for scheduler, state in zip(self.schedulers, state_dict["per_model"]):
            scheduler.load_state_dict(state)


def check_list_of_models(models: list[nn.Module], args, trainer_kwargs: dict) -> None:
    """Refuse, naming the fix, what a list of models cannot train with."""
    if not getattr(args, "codistill", False):
        raise ValueError(
            "A list of models trains them codistilled: pass `CodistillTrainingArguments(codistill=True)`."
        )
    if len(models) != args.num_groups:
        raise ValueError(
            f"Got {len(models)} models but `num_groups={args.num_groups}`: set `num_groups={len(models)}`."
        )
    if getattr(args, "codistill_peer_store", None):
        raise ValueError(
            "`codistill_peer_store` makes each launch one group with one model; a list of models trains every group "
            "in this process. Pass one model per launch, or drop `codistill_peer_store`."
        )
    if get_topology() is not None or launched_world_size() > 1:
        raise ValueError(
            "A list of models trains in one process; under a launcher, give each process one model and let "
            "`num_groups` split the processes into groups."
        )
    own_optimizers = trainer_kwargs.get("optimizers", (None, None)) != (None, None)
    if trainer_kwargs.get("model_init") is not None or own_optimizers:
        raise ValueError(
            "With a list of models, pass the models themselves: each gets its optimizer and scheduler from the "
            "arguments (`model_init` and `optimizers` are not supported)."
        )
    if args.lr_scheduler_type in _UNSUPPORTED_SCHEDULERS:
        raise ValueError(f"`lr_scheduler_type={args.lr_scheduler_type!r}` is not supported with a list of models.")
