"""Codistillation of several models in one process: notebooks and single GPUs, no launcher and no process group.

`CodistillTrainer(model=[m0, m1, ...], args=CodistillTrainingArguments(codistill=True, num_groups=G, ...))` returns a
`OneProcessCodistillTrainer`: one `Trainer` whose `model` holds all G models (`model_stack.CodistilledModels`). It is
the second driver of the codistillation engine (`hf_codistill.engine`): model g plays the part of group g of the
launched mode, with the same semantics, so results carry over:

- data: every optimizer step gives each model its own batch, drawn from its own shuffling order (seed + g), or the
  same batch for all with `codistill_shared_batch`;
- loss: model g takes Trainer's own training step on its batch, with its task loss plus alpha_t * mean_j D(f_g, f_j)
  over its peers f_j: frozen copies refreshed every `codistill_sync_every` optimizer steps, or the live models (in
  eval mode) when k = 1, which gives fresh peers as in Deep Mutual Learning (Zhang et al. 2018);
- optimizer: one optimizer and LR scheduler per model, built by Trainer's `create_optimizer` / `create_scheduler`;
  gradients are clipped per model (Trainer's global norm over all parameters would couple the models);
- saving, resuming, evaluation and `push_to_hub` run the launched driver's per-group code once per model
  (`_for_model`), so the files and metrics are those of the launched mode.
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from transformers.trainer import SCALER_NAME, TRAINER_STATE_NAME
from transformers.trainer_pt_utils import find_batch_size
from transformers.utils import can_return_loss, find_labels

from .adapters import base_model_of, with_adapters
from .checkpointing import sibling_checkpoint
from .config import CodistillTrainingArguments
from .local_peers import LocalPeers
from .model_stack import (
    CodistilledModels,
    PerModelOptimizers,
    PerModelOrderSampler,
    PerModelSchedulers,
    check_list_of_models,
    split_per_model,
    unwrap_optimizer,
)
from .one_process_saving import PerModelSaving
from .peer_forward import is_causal_lm
from .peer_metrics import peer_compute_metrics, per_model_preprocess, top1_ids
from .shared_base import adapter_students
from .trainer import CodistillTrainer

RNG_STATE_NAME = "rng_state.pth"


class OneProcessCodistillTrainer(PerModelSaving, CodistillTrainer, trains_a_list_of_models=True):
    """Trains G codistilled models in one process; built by `CodistillTrainer(model=[m0, m1, ...], args=...)`.

    Takes `Trainer`'s arguments, with a list of models whose outputs share one space (they may differ in architecture
    and size), or one model with `peft_config=` (or a `PeftModel`): then the G students are G adapters of that one
    base (`hf_codistill.shared_base`). `trainer.models` lists them; model g trains with seed `seed + g` for its data
    order and is saved to `output_dir/group_<g>`. Pass your usual single-model `compute_metrics`: it is applied to
    every model and to their ensemble. `predict()` returns one predictions array per model.
    """

    def __init__(
        self,
        model: list[nn.Module] | nn.Module,
        args: CodistillTrainingArguments,
        *trainer_args,
        compute_metrics: Callable | None = None,
        preprocess_logits_for_metrics: Callable | None = None,
        **trainer_kwargs,
    ):
        peft_config = trainer_kwargs.pop("peft_config", None)
        if not isinstance(model, (list, tuple)):
            model = adapter_students(model, peft_config, [args.for_group(g).seed for g in range(args.num_groups)])
        elif peft_config is not None:
            model = with_adapters(list(model), peft_config)
        models = list(model)
        check_list_of_models(models, args, trainer_kwargs)
        self.models = models
        self._group_args = [args.for_group(group) for group in range(len(models))]
        self._active_group: int | None = None
        self._causal_lm = is_causal_lm(models[0])
        # Each model's own metrics come from Trainer's loop, the ensemble's and agreement from the peer evaluation.
        self._model_metrics = (compute_metrics, preprocess_logits_for_metrics)
        if preprocess_logits_for_metrics is None and compute_metrics is None:
            # `predict()`'s per-model predictions: ids, far smaller than logits, when no metric reads probabilities.
            preprocess_logits_for_metrics = top1_ids
        each_model = peer_compute_metrics(compute_metrics, with_peer_metrics=False) if compute_metrics else None
        super().__init__(
            CodistilledModels(models),
            args,
            *trainer_args,
            compute_metrics=each_model,
            preprocess_logits_for_metrics=per_model_preprocess(preprocess_logits_for_metrics),
            **trainer_kwargs,
        )
        self._group_args[0] = self.args  # the very object Trainer set up, so that `_for_model(0)` changes nothing
        # Trainer reads these from the class of `self.model`, which here is the holder of the models (and, as Trainer
        # does, from a PEFT model's base model).
        inspected = base_model_of(models[0])
        if args.label_names is None:
            self.label_names = find_labels(type(inspected))
        self.can_return_loss = can_return_loss(type(inspected))
        self.model.share_use_cache()
        self._hub_model_ids = [self.hub_model_id] + [None] * (len(models) - 1)
        self._grad_norms: list[float | None] = [None] * len(models)
        self._eval_losses: list[list[float]] = []

    def _join_groups(self, args: CodistillTrainingArguments) -> None:
        return None  # one process: no groups of processes to join

    # ---- Topology -------------------------------------------------------------------------------------------

    @property
    def num_groups(self) -> int:
        return len(self.models)

    @property
    def group_index(self) -> int:
        # The model Trainer's code is running for (`_for_model`); otherwise 0: Trainer's own bookkeeping (state, RNG,
        # logs) is group 0's, as on world rank 0 of the launched mode.
        return self._active_group or 0

    @property
    def group_rank(self) -> int:
        return 0

    @property
    def group_size(self) -> int:
        return 1

    @property
    def causal_lm(self) -> bool:
        return self._causal_lm

    @property
    def peers(self) -> LocalPeers | None:
        """The models' peers (built when training starts)."""
        return self.engine.peers

    @contextmanager
    def _for_model(self, group: int):
        """Point Trainer's single-model attributes at model `group`, to run Trainer's (or the launched driver's)
        per-model code for it."""
        saved = (self.model, self.model_wrapped, self.args, self.optimizer, self.lr_scheduler, self.hub_model_id,
                 self._active_group)
        self.model = self.model_wrapped = self.models[group]
        self.args = self._group_args[group]
        if isinstance(unwrap_optimizer(self.optimizer), PerModelOptimizers):
            self.optimizer = unwrap_optimizer(self.optimizer).optimizers[group]
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

    # ---- What the engine asks of its driver -----------------------------------------------------------------

    def codistilled_models(self) -> dict[int, nn.Module]:
        return dict(enumerate(self.models))

    def make_peer_set(self, models: dict[int, nn.Module]) -> LocalPeers:
        return LocalPeers(models, live=self.args.codistill_sync_every == 1, dtype=self.args.peer_torch_dtype,
                          num_peers=self.args.codistill_num_peers)

    def resume_checkpoints(self) -> dict[int, str] | None:
        if self._resume_checkpoint is None:
            return None
        return {group: sibling_checkpoint(self._resume_checkpoint, group) for group in range(self.num_groups)}

    def barrier(self, name: str) -> None:
        pass  # one process: nothing to wait for

    def prepare_checkpoint(self, step: int) -> None:
        """Give every model's checkpoint Trainer's state and RNG files, which Trainer wrote in model 0's only."""
        written = os.path.join(self.args.output_dir, f"checkpoint-{step}")
        for group in range(1, self.num_groups):
            checkpoint = sibling_checkpoint(written, group)
            os.makedirs(checkpoint, exist_ok=True)
            for name in (TRAINER_STATE_NAME, RNG_STATE_NAME, SCALER_NAME):
                if os.path.isfile(os.path.join(written, name)):
                    shutil.copyfile(os.path.join(written, name), os.path.join(checkpoint, name))

    def _codistilled_group_of(self, model: nn.Module) -> int | None:
        return next((group for group, each in enumerate(self.models) if each is model), None)

    # ---- Data -----------------------------------------------------------------------------------------------

    def _set_signature_columns_if_needed(self) -> None:
        # Private Trainer hook: the holder's `forward` names no input, so keep the columns any model takes, or
        # `remove_unused_columns` drops them all.
        if self._signature_columns is None:
            columns = []
            for each in self.models:
                # A PEFT model's `forward` takes `*args, **kwargs`: its base model names the inputs (as in Trainer).
                inspected = base_model_of(each)
                columns += [name for name in inspect.signature(inspected.forward).parameters if name not in columns]
            self._signature_columns = columns + list(set(["label", "label_ids"] + self.label_names))

    def get_train_dataloader(self):
        if self.engine.shared_batch:
            return super().get_train_dataloader()
        sampler_fn = None
        if hasattr(self.train_dataset, "__len__"):
            seeds = [view.data_seed if view.data_seed is not None else view.seed for view in self._group_args]
            sampler = PerModelOrderSampler(len(self.train_dataset), self._train_batch_size, seeds)
            sampler_fn = lambda dataset: sampler  # noqa: E731
        # else a stream, which has no order to seed per model: each batch of G x b consecutive examples is dealt out.
        # Private Trainer helper: it removes unused columns, builds the collator and prepares the loader.
        return self._get_dataloader(dataset=self.train_dataset, description="Training",
                                    batch_size=self._train_batch_size * self.num_groups, sampler_fn=sampler_fn,
                                    is_training=True)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Trainer's accumulation window, with each batch split per model and the label count made per model."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.engine.shared_batch or not batch_samples:
            return batch_samples, num_items_in_batch
        per_model = [split_per_model(batch, self.num_groups) for batch in batch_samples]
        counts = [
            # Private Trainer helper: counts labels the way the model's loss normalises by them.
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
                optimizers.append(super().create_optimizer(each))
            self.optimizer = PerModelOptimizers(optimizers)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            schedulers = []
            for each in unwrap_optimizer(self.optimizer).optimizers:
                self.lr_scheduler = None
                schedulers.append(super().create_scheduler(num_training_steps, optimizer=each))
            self.lr_scheduler = PerModelSchedulers(schedulers)
        return self.lr_scheduler

    def _clip_grad_norm(self, model):
        # Private Trainer hook. One global norm over all models would let one model's large gradients shrink every
        # other model's update, so each model is clipped on its own; Trainer logs model 0's norm.
        self.accelerator.unscale_gradients()
        self._grad_norms = [
            torch.nn.utils.clip_grad_norm_(list(each.parameters()), self.args.max_grad_norm) for each in self.models
        ]
        return self._grad_norms[0]

    def _get_grad_norm(self, model, grad_norm=None):
        # Private Trainer hook: without clipping, report the per-model norms as well.
        if grad_norm is None:
            self._grad_norms = [
                torch.nn.utils.clip_grad_norm_(list(each.parameters()), float("inf")) for each in self.models
            ]
            grad_norm = self._grad_norms[0]
        return super()._get_grad_norm(model, grad_norm)

    def _track_num_input_tokens(self, inputs) -> None:
        # Private Trainer hook: the inputs are one batch per model; count model 0's, as group 0 counts when launched.
        batch = inputs[0] if isinstance(inputs, list) else inputs
        with self._for_model(0):
            super()._track_num_input_tokens(batch)

    def floating_point_ops(self, inputs) -> int:
        batches = inputs if isinstance(inputs, list) else [inputs] * self.num_groups
        total = 0
        for group, batch in enumerate(batches):
            with self._for_model(group):
                total += super().floating_point_ops(batch)
        return total

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True):
        # accelerate wraps the prepared model's `forward` in autocast; the models here run their own `forward`.
        return self.accelerator.autocast()

    # ---- Training -------------------------------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Trainer's training step for each model on its own batch; returns model 0's loss (Trainer's `loss`)."""
        batches = inputs if isinstance(inputs, list) else [inputs] * self.num_groups
        counts = num_items_in_batch if isinstance(num_items_in_batch, list) else [num_items_in_batch] * self.num_groups
        losses = []
        try:
            for group, each in enumerate(self.models):
                loss = super().training_step(each, batches[group], counts[group])
                self.engine.record(group, "loss", loss)
                losses.append(loss)
        finally:
            self.engine.drop_shared_logits()
        return losses[0]

    # ---- Logging --------------------------------------------------------------------------------------------

    def _step_logs(self) -> dict[str, float]:
        """Every model's training metrics under `group_<g>/` (and group 0's under the plain keys)."""
        logs = {}
        for group, metrics in self.engine.pop_metrics(self.state.global_step).items():
            if self._grad_norms[group] is not None:
                metrics["grad_norm"] = float(self._grad_norms[group])
            logs.update({f"group_{group}/{name}": value for name, value in metrics.items()})
            if group == 0:
                # Trainer already logs model 0's `loss` and `grad_norm` under the plain keys.
                logs.update({k: v for k, v in metrics.items() if k not in ("loss", "grad_norm")})
        return logs

    # ---- Evaluation -----------------------------------------------------------------------------------------

    def _single_model_metrics(self):
        return self._model_metrics

    def _fetch_current_peers(self) -> None:
        pass  # every model is here, current

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Trainer's prediction step for every model; the loss is model 0's, the logits one entry per model."""
        losses, logits, labels = [], [], None
        peers_scored = self._peer_evaluation is not None  # they need the logits even when Trainer wants the loss
        for group, each in enumerate(self.models):
            with self._for_model(group):
                loss, group_logits, labels = super().prediction_step(
                    each, inputs, prediction_loss_only and not peers_scored, ignore_keys)
            losses.append(loss)
            logits.append(group_logits)
        if peers_scored and all(entry is not None for entry in logits):
            self._peer_evaluation.add_batch(logits[0], logits[1:], labels)
            if prediction_loss_only:
                logits = [None]
        if losses[0] is not None:
            batch_size = find_batch_size(inputs)
            for group, loss in enumerate(losses):
                self._eval_losses[group].append((loss.float().mean().item() * batch_size, batch_size))
        predictions = None if any(entry is None for entry in logits) else tuple(logits)
        return losses[0], predictions, labels

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """Trainer's loop, each model's metrics renamed `group_<g>/<prefix>_<name>` as in the launched mode."""
        self._eval_losses = [[] for _ in self.models]
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
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
