"""Codistillation of several models in one process: notebooks and single GPUs, no launcher and no process group.

`CodistillTrainer(model=[m0, m1, ...], args=CodistillTrainingArguments(codistill=True, num_groups=G, ...))` returns a
`OneProcessCodistillTrainer`: one `Trainer` whose `model` holds all G models. Model g plays the part of group g of the
distributed mode, with the same semantics, so results carry over:

- data: every optimizer step gives each model its own batch, drawn from its own shuffling order (seed + g), or the
  same batch for all with `codistill_shared_batch`;
- loss: model g takes Trainer's own training step on its batch, with its task loss plus alpha_t * mean_j D(f_g, f_j)
  over its peers f_j: frozen copies refreshed every `codistill_sync_every` optimizer steps, or the live models (in
  eval mode) when k = 1, which gives fresh peers as in Deep Mutual Learning (Zhang et al. 2018);
- optimizer: one optimizer and LR scheduler per model, built by Trainer's `create_optimizer` / `create_scheduler`;
  gradients are clipped per model (Trainer's global norm over all parameters would couple the models);
- saving, resuming, evaluation and `push_to_hub` run Trainer's single-model code once per model (`_as_group`), so the
  files are those of the distributed mode: `output_dir/group_<g>/checkpoint-<N>/...`, `codistill.json`, group 0's
  final model also at `output_dir`.

Evaluation reports each model's metrics (group 0's under the plain keys, every model's under `group_<g>/`), the
ensemble's (`eval_ensemble_<metric>`) and the top-1 agreement (`eval_agreement_<i>_<j>`, `eval_agreement_mean`).
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer
from transformers.trainer import SCALER_NAME, TRAINER_STATE_NAME
from transformers.trainer_pt_utils import find_batch_size
from transformers.utils import can_return_loss, find_labels

from .checkpointing import (
    INIT_NAME,
    PEERS_NAME,
    STATE_NAME,
    group_dir,
    invalidate_checkpoints_after,
    read_state,
    rotate_group_checkpoints,
    write_run_info,
)
from .compat import align_loss_accounting
from .config import CodistillTrainingArguments
from .exchange import exchanged_tensors, frozen_copy
from .losses import distillation_to_peers, scored_sample, token_mask
from .model_card import group_log_history
from .peer_forward import in_precision, is_causal_lm, logits_of, peer_logits_for_term
from .peer_metrics import peer_compute_metrics
from .topology import get_topology, launched_world_size
from .trainer import CodistillTrainer, MetricSums, _CodistillCallback, _reload_renamed_weights

RNG_STATE_NAME = "rng_state.pth"
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


class LocalPeers:
    """What each model distils from: frozen copies (in `dtype` if given) refreshed every k steps, or (k = 1) the live
    models themselves, which need no copies and keep their own precision."""

    def __init__(self, models: list[nn.Module], live: bool, dtype: torch.dtype | None = None):
        self.live = live
        self.copies = None if live else [frozen_copy(model, dtype) for model in models]
        self.last_exchange_step: int | None = None
        self.num_exchanges = 0

    def model(self, group: int, models: list[nn.Module]) -> nn.Module:
        return models[group] if self.live else self.copies[group]

    @torch.no_grad()
    def refresh(self, models: list[nn.Module], step: int) -> None:
        if not self.live:
            for copy_, model in zip(self.copies, models):
                for target, source in zip(exchanged_tensors(copy_).values(), exchanged_tensors(model).values()):
                    target.copy_(source)
        self.last_exchange_step = step
        self.num_exchanges += 1

    def state_dict(self, group: int, models: list[nn.Module]) -> dict[str, torch.Tensor]:
        """Group `group`'s peers as the distributed mode stores them (`group_<j>.<name>`, j != group)."""
        return {
            f"group_{peer}.{name}": tensor.detach().cpu().clone()
            for peer in range(len(models)) if peer != group
            for name, tensor in exchanged_tensors(self.model(peer, models)).items()
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.live:
            return
        for peer, copy_ in enumerate(self.copies):
            for name, tensor in exchanged_tensors(copy_).items():
                key = f"group_{peer}.{name}"
                if key in state:
                    tensor.copy_(state[key])


@contextmanager
def _evaluating(model: nn.Module):
    """Run a live model as a peer: eval mode (no dropout), then back to the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _sibling_checkpoint(checkpoint: str, group: int) -> str:
    """`root/group_0/checkpoint-N` -> `root/group_<group>/checkpoint-N`."""
    checkpoint = os.path.normpath(checkpoint)
    root = os.path.dirname(os.path.dirname(checkpoint))
    return os.path.join(group_dir(root, group), os.path.basename(checkpoint))


class OneProcessCodistillTrainer(CodistillTrainer):
    """Trains G codistilled models in one process; built by `CodistillTrainer(model=[m0, m1, ...], args=...)`.

    Takes `Trainer`'s arguments, with a list of models whose outputs share one space (they may differ in architecture
    and size). `trainer.models` lists them; model g trains with seed `seed + g` for its data order and is saved to
    `output_dir/group_<g>`. Pass your usual single-model `compute_metrics`: it is applied to every model and to their
    ensemble. `predict()` returns one predictions array per model.

    It calls `Trainer`'s implementations directly (`Trainer.training_step(self, ...)`), not `CodistillTrainer`'s,
    whose overrides exchange with other process groups.
    """

    def __init__(
        self,
        model: list[nn.Module],
        args: CodistillTrainingArguments,
        *trainer_args,
        compute_metrics: Callable | None = None,
        preprocess_logits_for_metrics: Callable | None = None,
        **trainer_kwargs,
    ):
        models = list(model)
        self._check_arguments(models, args, trainer_kwargs)
        self.models = models
        self.codistilling = True
        self.topology = None
        self.peer_copies = None
        self.peers: LocalPeers | None = None
        self.codistill_root = args.output_dir
        self._save_total_limit = args.save_total_limit
        self._group_args = [self._group_view_of(args, group) for group in range(len(models))]
        self._active_group: int | None = None
        self._causal_lm = is_causal_lm(models[0])
        # Ids are enough for agreement and far smaller than logits when no metric needs the probabilities.
        if preprocess_logits_for_metrics is None and compute_metrics is None:
            preprocess_logits_for_metrics = _argmax
        # CodistillTrainer.__init__ is for one model per process group; the models here need Trainer's as is.
        Trainer.__init__(
            self,
            CodistilledModels(models),
            self._group_args[0],
            *trainer_args,
            compute_metrics=peer_compute_metrics(compute_metrics, shift_labels=self._causal_lm,
                                                 with_peer_metrics=args.codistill_peer_metrics),
            preprocess_logits_for_metrics=_per_model(preprocess_logits_for_metrics),
            **trainer_kwargs,
        )
        # Trainer reads these from the class of `self.model`, which here is the holder of the models.
        if args.label_names is None:
            self.label_names = find_labels(type(models[0]))
        self.can_return_loss = can_return_loss(type(models[0]))
        # Trainer sets `use_cache` on its model's config, which the holder lends from model 0: give it to every model.
        use_cache = getattr(getattr(models[0], "config", None), "use_cache", None)
        for model in models[1:]:
            if use_cache is not None and getattr(model, "config", None) is not None:
                model.config.use_cache = use_cache
        self._hub_model_ids = [self.hub_model_id] + [None] * (len(models) - 1)
        self._step_metrics = [MetricSums() for _ in models]
        self._grad_norms: list[float | None] = [None] * len(models)
        self._metrics_since_step = 0
        self._init_params: list[dict[str, torch.Tensor]] | None = None
        self._resume_checkpoint = None
        self._eval_losses: list[list[float]] = []
        self._shared_peer_logits: dict[int, torch.Tensor] = {}
        self.add_callback(_CodistillCallback(self))
        self._add_weight_decay_schedule()

    @staticmethod
    def _check_arguments(models, args, trainer_kwargs) -> None:
        if not isinstance(args, CodistillTrainingArguments) or not args.codistill:
            raise ValueError(
                "A list of models trains them codistilled: pass `CodistillTrainingArguments(codistill=True)`."
            )
        if len(models) != args.num_groups:
            raise ValueError(
                f"Got {len(models)} models but `num_groups={args.num_groups}`: set `num_groups={len(models)}`."
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

    @staticmethod
    def _group_view_of(args: CodistillTrainingArguments, group: int) -> CodistillTrainingArguments:
        """Model g's arguments, as group g sees them in the distributed mode: seed, output folder, Hub repository."""
        view = copy.copy(args)
        view.seed = args.seed + group
        if args.data_seed is not None:
            view.data_seed = args.data_seed + group
        view.output_dir = group_dir(args.output_dir, group)
        # Rotation waits until every model has written the newer checkpoint (see `_save_codistill_checkpoint`).
        view.save_total_limit = None
        if args.push_to_hub:
            base = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
            view.hub_model_id = f"{base}-group-{group}"
        return view

    # ---- Topology -------------------------------------------------------------------------------------------

    @property
    def num_groups(self) -> int:
        return len(self.models)

    @property
    def group_index(self) -> int:
        # The model Trainer's code is running for (`_as_group`); otherwise 0: Trainer's own bookkeeping (state, RNG,
        # logs) is group 0's, as on world rank 0 of the distributed mode.
        return self._active_group or 0

    @property
    def group_rank(self) -> int:
        return 0

    @property
    def group_size(self) -> int:
        return 1

    @property
    def shared_batch(self) -> bool:
        return bool(getattr(self.args, "codistill_shared_batch", False))

    @contextmanager
    def _as_group(self, group: int):
        """Point Trainer's single-model attributes at model `group`, to run Trainer's own code for it."""
        saved = (self.model, self.model_wrapped, self.args, self.optimizer, self.lr_scheduler, self.hub_model_id,
                 self._active_group)
        self.model = self.model_wrapped = self.models[group]
        self.args = self._group_args[group]
        if isinstance(self._unwrapped_optimizer(), PerModelOptimizers):
            self.optimizer = self._unwrapped_optimizer().optimizers[group]
        if isinstance(self.lr_scheduler, PerModelSchedulers):
            self.lr_scheduler = self.lr_scheduler.schedulers[group]
        self.hub_model_id = self._hub_model_ids[group]
        self._active_group = group
        try:
            yield
        finally:
            self._hub_model_ids[group] = self.hub_model_id
            (self.model, self.model_wrapped, self.args, self.optimizer, self.lr_scheduler, self.hub_model_id,
             self._active_group) = saved

    def _unwrapped_optimizer(self):
        optimizer = self.optimizer
        while hasattr(optimizer, "optimizer"):  # accelerate's AcceleratedOptimizer
            optimizer = optimizer.optimizer
        return optimizer

    # ---- Data -----------------------------------------------------------------------------------------------

    def _set_signature_columns_if_needed(self) -> None:
        # Private Trainer hook (transformers 5.18-5.24): the holder's `forward` names no input, so keep the columns
        # any model takes, or `remove_unused_columns` drops them all.
        if self._signature_columns is None:
            columns = []
            for model in self.models:
                columns += [name for name in inspect.signature(model.forward).parameters if name not in columns]
            self._signature_columns = columns + list(set(["label", "label_ids"] + self.label_names))

    def get_train_dataloader(self):
        if self.shared_batch:
            return Trainer.get_train_dataloader(self)
        if not hasattr(self.train_dataset, "__len__"):
            # A stream has no order to seed per model: each batch of G x b consecutive examples is dealt out, b each.
            # Private Trainer helper (5.18-5.24), as below.
            return self._get_dataloader(dataset=self.train_dataset, description="Training",
                                        batch_size=self._train_batch_size * self.num_groups, is_training=True)
        seeds = [view.data_seed if view.data_seed is not None else view.seed for view in self._group_args]
        sampler = PerModelOrderSampler(len(self.train_dataset), self._train_batch_size, seeds)
        # Private Trainer helper (5.18-5.24): it removes unused columns, builds the collator and prepares the loader.
        return self._get_dataloader(
            dataset=self.train_dataset,
            description="Training",
            batch_size=self._train_batch_size * self.num_groups,
            sampler_fn=lambda dataset: sampler,
            is_training=True,
        )

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Trainer's accumulation window, with each batch split per model and the label count made per model."""
        batch_samples, num_items_in_batch = Trainer.get_batch_samples(self, epoch_iterator, num_batches, device)
        if self.shared_batch or not batch_samples:
            return batch_samples, num_items_in_batch
        per_model = [split_per_model(batch, self.num_groups) for batch in batch_samples]
        counts = [
            # Private Trainer helper (5.18-5.24): counts labels the way the model's loss normalises by them.
            self._get_num_items_in_batch([batches[group] for batches in per_model], device)
            for group in range(self.num_groups)
        ]
        return per_model, counts

    # ---- Optimizers -----------------------------------------------------------------------------------------

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            optimizers = []
            for each in self.models:
                self.optimizer = None
                optimizers.append(Trainer.create_optimizer(self, each))
            self.optimizer = PerModelOptimizers(optimizers)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            schedulers = []
            for each in self._unwrapped_optimizer().optimizers:
                self.lr_scheduler = None
                schedulers.append(Trainer.create_scheduler(self, num_training_steps, optimizer=each))
            self.lr_scheduler = PerModelSchedulers(schedulers)
        return self.lr_scheduler

    def _clip_grad_norm(self, model):
        # Private Trainer hook (5.18-5.24). One global norm over all models would let one model's large gradients
        # shrink every other model's update, so each model is clipped on its own; Trainer logs model 0's norm.
        self.accelerator.unscale_gradients()
        self._grad_norms = [
            torch.nn.utils.clip_grad_norm_(list(each.parameters()), self.args.max_grad_norm) for each in self.models
        ]
        return self._grad_norms[0]

    def _get_grad_norm(self, model, grad_norm=None):
        # Private Trainer hook (5.18-5.24): without clipping, report the per-model norms as well.
        if grad_norm is None:
            self._grad_norms = [
                torch.nn.utils.clip_grad_norm_(list(each.parameters()), float("inf")) for each in self.models
            ]
            grad_norm = self._grad_norms[0]
        return Trainer._get_grad_norm(self, model, grad_norm)

    def _track_num_input_tokens(self, inputs) -> None:
        # Private Trainer hook (5.2x): the inputs are one batch per model; count model 0's, as Trainer logs model 0
        # (what group 0 counts when launched).
        batch = inputs[0] if isinstance(inputs, list) else inputs
        with self._as_group(0):
            Trainer._track_num_input_tokens(self, batch)

    def floating_point_ops(self, inputs) -> int:
        batches = inputs if isinstance(inputs, list) else [inputs] * self.num_groups
        total = 0
        for group, batch in enumerate(batches):
            with self._as_group(group):
                total += Trainer.floating_point_ops(self, batch)
        return total

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True):
        # accelerate wraps the prepared model's `forward` in autocast; the models here run their own `forward`.
        return self.accelerator.autocast()

    # ---- Training -------------------------------------------------------------------------------------------

    def _start_codistillation(self) -> None:
        """Shared initialisation, the peers and the initial parameters; from the checkpoint when resuming."""
        models = self.models
        self._metrics_since_step = self.state.global_step
        if self._resume_checkpoint is None and self._shares_initialisation(models[0]):
            self._copy_initialisation()
        self.peers = LocalPeers(models, live=self.args.codistill_sync_every == 1, dtype=self.args.peer_torch_dtype)
        if self._resume_checkpoint is not None:
            checkpoints = [_sibling_checkpoint(self._resume_checkpoint, g) for g in range(len(models))]
            for checkpoint in checkpoints:
                self.peers.load_state_dict(load_file(os.path.join(checkpoint, PEERS_NAME)))
            state = read_state(checkpoints[0])
            self.peers.last_exchange_step = state["last_exchange_step"]
            self.peers.num_exchanges = state["num_exchanges"]
            init_files = [os.path.join(checkpoint, INIT_NAME) for checkpoint in checkpoints]
            if self.args.logs_param_distance and all(os.path.isfile(path) for path in init_files):
                self._init_params = [load_file(path) for path in init_files]
            return
        self.peers.refresh(models, self.state.global_step)
        if self.args.logs_param_distance:
            self._init_params = [
                {name: p.detach().float().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}
                for model in models
            ]
        self._write_run_info()

    def _copy_initialisation(self) -> None:
        reference = self.models[0].state_dict()
        for group, model in enumerate(self.models[1:], start=1):
            shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
            if shapes != {name: tuple(t.shape) for name, t in reference.items()}:
                raise ValueError(
                    f"`codistill_shared_init` starts every model from model 0's weights, but model {group} has "
                    "another architecture; set `codistill_shared_init=False` for peers that differ in architecture or "
                    "size."
                )
            with torch.no_grad():
                model.load_state_dict(reference)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Trainer's training step for each model on its own batch; returns model 0's loss (Trainer's `loss`)."""
        batches = inputs if isinstance(inputs, list) else [inputs] * self.num_groups
        counts = num_items_in_batch if isinstance(num_items_in_batch, list) else [num_items_in_batch] * self.num_groups
        losses = []
        try:
            for group, each in enumerate(self.models):
                loss = Trainer.training_step(self, each, batches[group], counts[group])
                self._step_metrics[group].add("loss", loss)
                losses.append(loss)
        finally:
            self._shared_peer_logits = {}  # the peers' whole logits: not kept through the optimizer step
        return losses[0]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        group = next((g for g, each in enumerate(self.models) if each is model), None)
        if group is None or not model.training:
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.get("labels")
        peer_inputs = {key: value for key, value in inputs.items() if key != "labels"}
        loss, outputs = Trainer.compute_loss(
            self, model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )

        # As in `CodistillTrainer.compute_loss`: the distillation term is a per-batch mean, put on the same footing as
        # the task loss for gradient accumulation; metrics are per optimizer step.
        ga_steps = self.current_gradient_accumulation_steps
        loss_is_scaled_for_ga = self._loss_is_scaled_for_ga(num_items_in_batch)
        metrics = self._step_metrics[group]
        metrics.add("task_loss", loss / (1 if loss_is_scaled_for_ga else ga_steps))
        alpha = self.current_alpha()
        if alpha > 0:
            student_logits = logits_of(outputs, with_loss=self._outputs_hold_loss(labels))
            distill = self._distillation_to_peers(group, student_logits, peer_inputs, labels)
            metrics.add("distill_loss", distill / ga_steps)
            loss = loss + alpha * (distill / ga_steps if loss_is_scaled_for_ga else distill)
        metrics.add("alpha", torch.tensor(alpha))
        return (loss, outputs) if return_outputs else loss

    def _distillation_to_peers(self, group: int, logits: torch.Tensor, peer_inputs: dict, labels) -> torch.Tensor:
        """mean over the other models j of D(f_group(x), f_j(x)) at the positions that carry a label."""
        positions = scored_sample(token_mask(logits, labels, self._causal_lm), self.args.codistill_position_fraction)
        others = [peer for peer in range(self.num_groups) if peer != group]
        if not self.peers.live:
            peer_inputs = in_precision(peer_inputs, self.args.peer_torch_dtype)
        if self.shared_batch:
            # One batch for all models: each peer's whole predictions on it serve every other model.
            peers = (self._shared_peer_logits_of(peer, peer_inputs) for peer in others)
        else:
            # Each model's own batch: as in the distributed mode, a peer computes only what this term scores.
            peers = (peer_logits_for_term(self.peers.model(peer, self.models), peer_inputs, logits, labels,
                                          self._causal_lm, positions, self._peer_forward_context_of(peer))
                     for peer in others)
        return distillation_to_peers(logits, peers, labels, self._causal_lm, self.args.codistill_loss,
                                     self.args.codistill_temperature, positions)

    def _peer_forward_context_of(self, peer: int):
        """A factory of the context of peer `peer`'s forward: no_grad, autocast, and eval mode (no dropout) for a live
        model, then back to the mode it was in."""

        @contextmanager
        def context():
            model = self.peers.model(peer, self.models)
            with torch.no_grad(), self.autocast_smart_context_manager(), _evaluating(model):
                yield

        return context

    def _shared_peer_logits_of(self, peer: int, peer_inputs: dict) -> torch.Tensor:
        if peer not in self._shared_peer_logits:
            with self._peer_forward_context_of(peer)():
                self._shared_peer_logits[peer] = logits_of(self.peers.model(peer, self.models)(**peer_inputs))
        return self._shared_peer_logits[peer]

    # ---- Logging --------------------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add every model's training metrics under `group_<g>/` (and group 0's under the plain keys)."""
        if "loss" in logs:
            logs = {**self._with_weight_decay(logs), **self._pop_step_metrics()}
        Trainer.log(self, logs, start_time)

    def _pop_step_metrics(self) -> dict[str, float]:
        steps = max(1, self.state.global_step - self._metrics_since_step)
        self._metrics_since_step = self.state.global_step
        logs = {}
        for group, recorded in enumerate(self._step_metrics):
            metrics = {}
            for name, total, count in recorded.pop():
                metrics[name] = (total / (count if name == "alpha" else steps)).item()
            if self._grad_norms[group] is not None:
                metrics["grad_norm"] = float(self._grad_norms[group])
            if self._init_params is not None:
                metrics["param_distance_from_init"] = self.parameter_distance_from_init(group)
            if self.peers is not None:
                metrics["peer_exchanges"] = self.peers.num_exchanges
            logs.update({f"group_{group}/{name}": value for name, value in metrics.items()})
            if group == 0:
                # Trainer already logs model 0's `loss` and `grad_norm` under the plain keys.
                logs.update({k: v for k, v in metrics.items() if k not in ("loss", "grad_norm")})
        return logs

    @torch.no_grad()
    def parameter_distance_from_init(self, group: int = 0) -> float:
        """L2 distance between model `group`'s trainable parameters and their initial values."""
        initial = self._init_params[group]
        squared = 0.0
        for name, param in self.models[group].named_parameters():
            if name in initial:
                squared += (param.detach().float().cpu() - initial[name]).pow(2).sum().item()
        return math.sqrt(squared)

    # ---- Evaluation -----------------------------------------------------------------------------------------

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Trainer's prediction step for every model; the loss is model 0's, the logits one entry per model."""
        losses, logits, labels = [], [], None
        for group, each in enumerate(self.models):
            with self._as_group(group):
                loss, group_logits, labels = Trainer.prediction_step(
                    self, each, inputs, prediction_loss_only, ignore_keys
                )
            losses.append(loss)
            logits.append(group_logits)
        if losses[0] is not None:
            batch_size = find_batch_size(inputs)
            for group, loss in enumerate(losses):
                self._eval_losses[group].append((loss.float().mean().item() * batch_size, batch_size))
        predictions = None if any(entry is None for entry in logits) else tuple(logits)
        return losses[0], predictions, labels

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """Trainer's loop, each model's metrics renamed `group_<g>/<prefix>_<name>` as in the distributed mode."""
        self._eval_losses = [[] for _ in self.models]
        output = Trainer.evaluation_loop(self, dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        per_group = re.compile(rf"^{re.escape(metric_key_prefix)}_group_(\d+)/(.+)$")
        metrics = {}
        for key, value in output.metrics.items():
            match = per_group.match(key)
            metrics[f"group_{match.group(1)}/{metric_key_prefix}_{match.group(2)}" if match else key] = value
        for group, batches in enumerate(self._eval_losses):
            if batches:
                total, count = np.sum(batches, axis=0)
                metrics[f"group_{group}/{metric_key_prefix}_loss"] = float(total / count)
        return output._replace(metrics=metrics)

    # ---- Saving ---------------------------------------------------------------------------------------------

    def save_metrics(self, split: str, metrics: dict, combined: bool = True) -> None:
        """`<split>_results.json` in every model's folder, as each group writes its own in the distributed mode.

        Model 0's folder gets `metrics` as they are (its own under the plain keys, every model's under `group_<g>/`);
        model g's gets its `group_<g>/` metrics under the plain keys, beside the run's shared ones (ensemble,
        agreement, runtime). Plain keys that are model 0's alone (Trainer's `train_loss`) are left out of the others.
        """
        model_zero = {key[len("group_0/"):] for key in metrics if key.startswith("group_0/")} | {"train_loss"}
        shared = {key: value for key, value in metrics.items()
                  if not key.startswith("group_") and key not in model_zero}
        for group in range(self.num_groups):
            prefix = f"group_{group}/"
            own = {key[len(prefix):]: value for key, value in metrics.items() if key.startswith(prefix)}
            with self._as_group(group):
                Trainer.save_metrics(self, split, metrics if group == 0 else {**shared, **own}, combined)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save model g to `<output_dir>/group_<g>` for every g, and model 0 to `<output_dir>` as well."""
        if self._active_group is not None:
            # Trainer's own code running for one model (e.g. `push_to_hub`, which saves first).
            return Trainer.save_model(self, output_dir, _internal_call)
        if _internal_call:
            # A checkpoint: Trainer names group 0's folder; every model gets the same step in its own group folder.
            for group in range(self.num_groups):
                with self._as_group(group):
                    Trainer.save_model(self, _sibling_checkpoint(output_dir, group), _internal_call=True)
            return
        root = output_dir if output_dir is not None else self.codistill_root
        for group in range(self.num_groups):
            with self._as_group(group):
                # Not an internal call: with `push_to_hub`, model g goes to `<hub_model_id>-group-<g>`.
                Trainer.save_model(self, group_dir(root, group))
        with self._as_group(0):
            Trainer.save_model(self, root, _internal_call=True)
        self._write_run_info(root)

    def push_to_hub(self, *args, **kwargs) -> list:
        """Push model g to `<hub_model_id>-group-<g>`, for every g."""
        if self._active_group is not None:
            # Trainer's own code running for one model (its `save_model` pushes after saving): that model only.
            return Trainer.push_to_hub(self, *args, **kwargs)
        commits = []
        for group in range(self.num_groups):
            with self._as_group(group):
                commits.append(Trainer.push_to_hub(self, *args, **kwargs))
        return commits

    def create_model_card(self, *args, **kwargs) -> None:
        """Each model's card (`README.md` in its group folder), with the distributed mode's codistillation section."""
        # Trainer's own `push_to_hub` for one model (see `push_to_hub`) asks for that model's card only.
        groups = [self._active_group] if self._active_group is not None else range(self.num_groups)
        shared_history = self.state.log_history
        try:
            for group in groups:
                # Trainer's summary and the codistillation section read the log history: model g's own values.
                self.state.log_history = group_log_history(shared_history, group)
                with self._as_group(group):
                    # Trainer makes its output folder at start-up; a group's folder exists only once something is
                    # saved (`--do_eval` without `--do_train` saves nothing).
                    os.makedirs(self.args.output_dir, exist_ok=True)
                    CodistillTrainer.create_model_card(self, *args, **kwargs)
        finally:
            self.state.log_history = shared_history

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # Private Trainer hook (5.18-5.24): each model's optimizer.pt / scheduler.pt in its own checkpoint folder.
        for group in range(self.num_groups):
            with self._as_group(group):
                Trainer._save_optimizer_and_scheduler(self, _sibling_checkpoint(output_dir, group))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        # Private Trainer hook (5.18-5.24), the counterpart of `_save_optimizer_and_scheduler`.
        if checkpoint is None:
            return
        for group in range(self.num_groups):
            with self._as_group(group):
                Trainer._load_optimizer_and_scheduler(self, _sibling_checkpoint(checkpoint, group))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # Private Trainer hook (5.18-5.24): load each model's weights from its own group's checkpoint.
        for group in range(self.num_groups):
            self._load_group_weights(group, _sibling_checkpoint(resume_from_checkpoint, group))

    def _load_best_model(self) -> None:
        # Private Trainer hook (5.18-5.24) of `load_best_model_at_end`: the best step is chosen on model 0's metric.
        best = self.state.best_model_checkpoint
        for group in range(self.num_groups):
            self._load_group_weights(group, _sibling_checkpoint(best, group))

    def _load_group_weights(self, group: int, checkpoint: str) -> None:
        with self._as_group(group):
            Trainer._load_from_checkpoint(self, checkpoint)
        _reload_renamed_weights(self.models[group], checkpoint)

    def _split_stream_between_groups(self) -> None:
        pass  # one process deals every batch of a stream out between its models (`split_per_model`)

    def _write_run_info(self, root: str | None = None) -> None:
        root = root or self.codistill_root
        write_run_info(root, self.args, self.num_groups, self.group_size, one_process=True)

    def _invalidate_checkpoints_after(self, step: int) -> None:
        if self.args.should_save:
            for group in range(self.num_groups):
                invalidate_checkpoints_after(group_dir(self.codistill_root, group), step)

    def _refresh_peers(self, state, control) -> None:
        if state.global_step % self.args.codistill_sync_every == 0:
            self.peers.refresh(self.models, state.global_step)

    def _finish_codistillation(self) -> None:
        pass  # peers are refreshed in place, nothing in flight

    def _save_codistill_checkpoint(self) -> None:
        """Give every model Trainer's state and RNG files, its peers and initial weights; then mark the step done."""
        if not self.args.should_save:
            return
        step = self.state.global_step
        written = os.path.join(self.args.output_dir, f"checkpoint-{step}")
        checkpoints = [_sibling_checkpoint(written, group) for group in range(self.num_groups)]
        for group, checkpoint in enumerate(checkpoints):
            os.makedirs(checkpoint, exist_ok=True)
            if group > 0:
                for name in (TRAINER_STATE_NAME, RNG_STATE_NAME, SCALER_NAME):
                    if os.path.isfile(os.path.join(written, name)):
                        shutil.copyfile(os.path.join(written, name), os.path.join(checkpoint, name))
            save_file(self.peers.state_dict(group, self.models), os.path.join(checkpoint, PEERS_NAME))
            if self._init_params is not None:
                save_file(self._init_params[group], os.path.join(checkpoint, INIT_NAME))
        for group, checkpoint in enumerate(checkpoints):
            state = {
                "num_groups": self.num_groups,
                "group_index": group,
                "group_size": self.group_size,
                "global_step": step,
                "last_exchange_step": self.peers.last_exchange_step,
                "num_exchanges": self.peers.num_exchanges,
                "exchange_bytes_sent": 0,
                "exchange_bytes_received": 0,
            }
            tmp = os.path.join(checkpoint, STATE_NAME + ".tmp")
            with open(tmp, "w") as f:
                json.dump(state, f, indent=2)
            os.replace(tmp, os.path.join(checkpoint, STATE_NAME))
        for group in range(self.num_groups):
            rotate_group_checkpoints(
                group_dir(self.codistill_root, group), self._save_total_limit,
                keep=_sibling_checkpoint(self.state.best_model_checkpoint, group)
                if self.state.best_model_checkpoint else None,
            )


def _argmax(logits, labels):
    return _first(logits).argmax(dim=-1)


def _per_model(preprocess: Callable | None) -> Callable | None:
    """Apply a single-model `preprocess_logits_for_metrics` to each model's logits."""
    if preprocess is None:
        return None

    def apply(logits, labels):
        return tuple(preprocess(entry, labels) for entry in logits)

    return apply


def _first(logits):
    return logits[0] if isinstance(logits, (tuple, list)) else logits
