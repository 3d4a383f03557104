"""`CodistillTrainer`: `Trainer` plus a distillation term toward stale copies of the other groups' models."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os

import datasets
import torch
from datasets.distributed import split_dataset_by_node
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import get_last_checkpoint as get_last_trainer_checkpoint
from transformers.utils import SAFE_WEIGHTS_NAME, logging

from .checkpointing import (
    INIT_NAME,
    PEERS_NAME,
    STATE_NAME,
    group_dir,
    invalidate_checkpoints_after,
    read_state,
    resolve_resume_checkpoint,
    rotate_group_checkpoints,
    save_file_atomically,
    write_run_info,
)
from .compat import align_loss_accounting, say_trained_from_scratch
from .config import CodistillTrainingArguments
from .exchange import PeerCopies
from .losses import distillation_to_peers, scored_sample, token_mask
from .model_card import add_codistillation_section, codistillation_section, last_eval_metrics, peer_names
from .peer_evaluation import PeerEvaluation
from .peer_forward import (
    in_precision,
    is_causal_lm,
    logits_of,
    peer_logits_for_term,
)
from .regularization import WeightDecaySchedule, parse_milestones
from .topology import GroupTopology, get_topology

logger = logging.get_logger(__name__)


def _reload_renamed_weights(model: nn.Module, checkpoint: str) -> None:
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


class MetricSums:
    """Per metric, the sum of the 0-d tensors recorded since the last log and their count.

    Constant memory however long logging waits (`logging_strategy="no"` never asks), and no host sync until it does.
    """

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self.sums[name] = value if name not in self.sums else self.sums[name] + value
        self.counts[name] = self.counts.get(name, 0) + 1

    def pop(self) -> list[tuple[str, torch.Tensor, int]]:
        """(name, sum, count) of every metric, and start afresh."""
        popped = [(name, total, self.counts[name]) for name, total in self.sums.items()]
        self.sums, self.counts = {}, {}
        return popped


class _CodistillCallback(TrainerCallback):
    """Ties the peers and the checkpoint extras to Trainer's events, through the trainer's `_start_codistillation`,
    `_refresh_peers`, `_save_codistill_checkpoint` and `_finish_codistillation` (one process or several).

    `on_step_end` follows every optimizer update, skipped (fp16 overflow) or not, and `global_step` advances the
    same way in every group, so all ranks agree on when to exchange.
    """

    def __init__(self, trainer: CodistillTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._start_codistillation()
        self.trainer._invalidate_checkpoints_after(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._refresh_peers(state, control)

    def on_save(self, args, state, control, **kwargs):
        self.trainer._save_codistill_checkpoint()

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer._finish_codistillation()


class _ParameterDistanceCallback(TrainerCallback):
    """Without codistillation: keeps the initial parameters (in every checkpoint too) for
    `param_distance_from_init`."""

    def __init__(self, trainer: CodistillTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        checkpoint = self.trainer._resume_checkpoint
        init_path = os.path.join(checkpoint, INIT_NAME) if checkpoint else None
        if init_path is not None and os.path.isfile(init_path):
            self.trainer._init_params = load_file(init_path)
        else:
            self.trainer._init_params = self.trainer._snapshot_parameters()

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            os.makedirs(checkpoint, exist_ok=True)
            # After Trainer's own files (no completion marker without codistillation): all or nothing.
            save_file_atomically(self.trainer._init_params, os.path.join(checkpoint, INIT_NAME))


class CodistillTrainer(Trainer):
    """Trains one of G codistilled models per process group; takes the same arguments as [`Trainer`].

    With `args.codistill=False` it is exactly `Trainer`. With `args.codistill=True`, launched on W processes
    (`torchrun` or `accelerate launch`), the processes form G groups of W/G ranks (see `hf_codistill.topology`).
    Each group trains its own model with DDP inside the group and adds to its loss
    `alpha_t * mean_j D(f_i(x), f_j(x))` over stale local copies f_j of the other groups' models, refreshed every
    `codistill_sync_every` steps. Group g trains with seed `seed + g` and writes to `output_dir/group_<g>`; group
    0's final model is also written to `output_dir` itself.
    """

    def __new__(cls, model: nn.Module | list[nn.Module] | None = None, *args, **kwargs):
        # A list of models means one process trains them all (notebooks, one GPU); see `hf_codistill.one_process`.
        if cls is CodistillTrainer and isinstance(model, (list, tuple)):
            from .one_process import OneProcessCodistillTrainer

            cls = OneProcessCodistillTrainer
        return super().__new__(cls)

    def __init__(self, model: nn.Module | None = None, args: CodistillTrainingArguments | None = None, *a, **kw):
        self.codistilling = bool(getattr(args, "codistill", False))
        self.topology: GroupTopology | None = None
        self.peer_copies: PeerCopies | None = None
        if self.codistilling:
            self.topology = get_topology()
            if self.topology is None:
                raise ValueError(
                    f"`codistill=True` with num_groups={args.num_groups} needs at least {args.num_groups} processes, "
                    "one group of ranks per model: launch with e.g. `torchrun --nproc_per_node "
                    f"{2 * args.num_groups} your_script.py` or `accelerate launch --multi_gpu --num_processes "
                    f"{2 * args.num_groups} your_script.py`; or, to train them all in this process, pass a list of "
                    f"{args.num_groups} models: `CodistillTrainer(model=[model_0, model_1, ...], ...)`."
                )
            if model is not None:
                align_loss_accounting(model)
            self.codistill_root = args.output_dir
            self._save_total_limit = args.save_total_limit
            args = self._group_view_of(args)
        self._peer_evaluation: PeerEvaluation | None = None
        self._eval_peers: PeerCopies | None = None
        self._eval_peer_logits: list | None = None
        super().__init__(model, args, *a, **kw)
        self._add_weight_decay_schedule()
        self._init_params: dict[str, torch.Tensor] | None = None
        self._resume_checkpoint: str | None = None
        if not self.codistilling:
            if getattr(self.args, "logs_param_distance", False):
                self.add_callback(_ParameterDistanceCallback(self))
            return
        self.add_callback(_CodistillCallback(self))
        if not self.topology.is_world_zero:
            # World rank 0 shows the progress bar and reports every group's metrics; other groups stay quiet.
            self.remove_callback(ProgressCallback)
            self.remove_callback(PrinterCallback)
        self._step_metrics = MetricSums()
        self._metrics_since_step = 0

    def call_model_init(self, trial=None):
        model = super().call_model_init(trial)
        if self.codistilling:
            align_loss_accounting(model)  # as for a model passed in (see `hf_codistill.compat`)
        return model

    def _add_weight_decay_schedule(self) -> None:
        self.weight_decay_schedule: WeightDecaySchedule | None = None
        if getattr(self.args, "codistill_weight_decay_schedule", "constant") != "constant":
            milestones = parse_milestones(self.args.codistill_weight_decay_milestones)
            self.weight_decay_schedule = WeightDecaySchedule(self.args.codistill_weight_decay_schedule, milestones)
            self.add_callback(self.weight_decay_schedule)

    def _with_weight_decay(self, logs: dict[str, float]) -> dict[str, float]:
        """Training logs plus the weight decay in use, when a schedule changes it."""
        schedule = getattr(self, "weight_decay_schedule", None)
        if "loss" in logs and schedule is not None and schedule.current is not None:
            return {**logs, "weight_decay": schedule.current}
        return logs

    # ---- Topology -------------------------------------------------------------------------------------------

    @property
    def num_groups(self) -> int:
        return self.topology.num_groups if self.codistilling else 1

    @property
    def group_index(self) -> int:
        return self.topology.group_index if self.codistilling else 0

    @property
    def group_rank(self) -> int:
        return self.topology.group_rank if self.codistilling else self.args.process_index

    @property
    def group_size(self) -> int:
        return self.topology.group_size if self.codistilling else self.args.world_size

    def _group_view_of(self, args: CodistillTrainingArguments) -> CodistillTrainingArguments:
        """The arguments as this group's `Trainer` sees them: its own seed, output folder and Hub repository."""
        view = copy.copy(args)
        group = self.topology.group_index
        view.seed = args.seed + group
        if args.data_seed is not None:
            view.data_seed = args.data_seed + group
        view.output_dir = group_dir(args.output_dir, group)
        # Rotation waits until every group has written the newer checkpoint (see `_save_codistill_checkpoint`).
        view.save_total_limit = None
        if args.push_to_hub:
            base = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
            view.hub_model_id = f"{base}-group-{group}"
        if not self.topology.is_world_zero:
            view.report_to = []
        return view

    # ---- Training -------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, *a, **kw):
        if self.codistilling and resume_from_checkpoint not in (None, False):
            resume_from_checkpoint = resolve_resume_checkpoint(
                resume_from_checkpoint, self.codistill_root, self.group_index, self.num_groups
            )
        if self.codistilling:
            self._split_stream_between_groups()
        resumed = resume_from_checkpoint
        if resumed is True:  # plain mode: the folder Trainer itself will pick (and complain about if there is none)
            resumed = get_last_trainer_checkpoint(self.args.output_dir)
        self._resume_checkpoint = resumed or None
        return super().train(resume_from_checkpoint, *a, **kw)

    def _split_stream_between_groups(self) -> None:
        """A data set is reshuffled per group (seed + group index), but a stream has no order to reshuffle: left
        alone, every group would read the same examples in the same order. Each group reads its own 1/G of a
        `datasets.IterableDataset` instead, as G x n data-parallel workers would."""
        dataset = self.train_dataset
        if isinstance(dataset, datasets.IterableDataset):
            if dataset is not getattr(self, "_group_stream", None):  # not split yet (a first or a new data set)
                self.train_dataset = self._group_stream = split_dataset_by_node(
                    dataset, rank=self.group_index, world_size=self.num_groups
                )
        elif isinstance(dataset, torch.utils.data.IterableDataset):
            logger.warning(
                "The training set is a torch `IterableDataset`: every group will read the same stream. Give each "
                "group its own part (e.g. by `trainer.group_index`), or pass a `datasets.IterableDataset`, which "
                "CodistillTrainer splits between groups."
            )

    def _start_codistillation(self) -> None:
        """Build the peer copies: from the checkpoint when resuming, else by a first exchange."""
        model = self.model
        self.peer_copies = PeerCopies(model, self.topology, sharded=self.args.codistill_sharded_exchange,
                                      dtype=self.args.peer_torch_dtype)
        self.peer_copies.check_same_architecture(model)
        step = self.state.global_step
        self._metrics_since_step = step
        if self._resume_checkpoint is not None:
            _reload_renamed_weights(model, self._resume_checkpoint)
            self.peer_copies.load_state_dict(load_file(os.path.join(self._resume_checkpoint, PEERS_NAME)))
            state = read_state(self._resume_checkpoint)
            self.peer_copies.last_exchange_step = state["last_exchange_step"]
            self.peer_copies.bytes_sent = state["exchange_bytes_sent"]
            self.peer_copies.bytes_received = state["exchange_bytes_received"]
            self.peer_copies.num_exchanges = state["num_exchanges"]
            init_path = os.path.join(self._resume_checkpoint, INIT_NAME)
            if self.args.logs_param_distance and os.path.isfile(init_path):
                self._init_params = load_file(init_path)
            return
        if self._shares_initialisation(model):
            self.peer_copies.broadcast_model(model, source_group=0)
        self.peer_copies.exchange(model, step)
        if self.args.logs_param_distance:
            self._init_params = self._snapshot_parameters()
        self._write_run_info()

    def _invalidate_checkpoints_after(self, step: int) -> None:
        # Every process has chosen its checkpoint (reading every group's markers) before any marker goes.
        self.topology.barrier("resume-chosen")
        if self.args.should_save:
            invalidate_checkpoints_after(self.args.output_dir, step)

    def _refresh_peers(self, state, control) -> None:
        """After every optimizer step: land a background exchange, and exchange every `codistill_sync_every` steps."""
        peers = self.peer_copies
        # A background exchange started at the previous step lands now, before anything reads the peers again.
        peers.finish_exchange()
        if state.global_step % self.args.codistill_sync_every != 0:
            return
        # Saves and the end of training need the peers settled: a resumed run must see the same peers.
        if self.args.codistill_overlap_exchange and not (control.should_save or control.should_training_stop):
            peers.start_exchange(self.model, state.global_step)
        else:
            peers.exchange(self.model, state.global_step)

    def _finish_codistillation(self) -> None:
        self.peer_copies.finish_exchange()
        if self.args.load_best_model_at_end and self.state.best_model_checkpoint is not None:
            # Trainer has just loaded the best checkpoint's raw state dict, which misses renamed keys.
            _reload_renamed_weights(self.model, self.state.best_model_checkpoint)

    def _snapshot_parameters(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().float().cpu().clone() for name, p in self.model.named_parameters() if p.requires_grad}

    def _shares_initialisation(self, model: nn.Module) -> bool:
        if self.args.codistill_shared_init is not None:
            return self.args.codistill_shared_init
        # `from_pretrained` records where the weights came from; configs and `model_init` from a config do not.
        return bool(getattr(model, "name_or_path", ""))

    def current_alpha(self) -> float:
        """alpha_t: 0 during the burn-in, then a linear ramp over the warm-up, then `codistill_alpha`."""
        args, step = self.args, self.state.global_step
        if step < args.codistill_burn_in_steps:
            return 0.0
        if args.codistill_alpha_warmup_steps > 0:
            ramp = (step - args.codistill_burn_in_steps + 1) / args.codistill_alpha_warmup_steps
            return args.codistill_alpha * min(1.0, ramp)
        return args.codistill_alpha

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not (self.codistilling and model.training):
            if self._peer_evaluation is not None:
                self._record_eval_peer_logits(inputs)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.get("labels")
        peer_inputs = {key: value for key, value in inputs.items() if key != "labels"}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)

        # Trainer divides the returned loss by the accumulation steps unless it is already normalised over the whole
        # accumulated batch; the distillation term is a per-batch mean, so it is put on the same footing here.
        # Metrics are recorded per optimizer step, i.e. divided by the accumulation steps like Trainer's `loss`.
        ga_steps = self.current_gradient_accumulation_steps
        loss_is_scaled_for_ga = self._loss_is_scaled_for_ga(num_items_in_batch)
        self._step_metrics.add("task_loss", loss / (1 if loss_is_scaled_for_ga else ga_steps))

        alpha = self.current_alpha()
        if alpha > 0:
            distill = self._distillation_term(model, outputs, peer_inputs, labels)
            self._step_metrics.add("distill_loss", distill / ga_steps)
            loss = loss + alpha * (distill / ga_steps if loss_is_scaled_for_ga else distill)
        self._step_metrics.add("alpha", torch.tensor(alpha))
        return (loss, outputs) if return_outputs else loss

    def _outputs_hold_loss(self, labels) -> bool:
        """Whether the model computed its own loss (first in a tuple output): under label smoothing or a
        `compute_loss_func`, Trainer takes the labels out of the inputs and computes the loss itself."""
        return labels is not None and self.label_smoother is None and self.compute_loss_func is None

    def _loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        # Mirrors Trainer.training_step's decision; `loss_is_scaled_for_ga` exists from transformers 5.2x on.
        declared = getattr(self, "loss_is_scaled_for_ga", None)
        if declared is not None:
            return declared
        if self.compute_loss_func is not None:
            return True
        return self.model_accepts_loss_kwargs and num_items_in_batch is not None

    def _distillation_term(self, model, outputs, peer_inputs, labels) -> torch.Tensor:
        """mean over peers j of D(f_i(x), f_j(x)) at the positions that carry a label."""
        student_logits = logits_of(outputs, with_loss=self._outputs_hold_loss(labels))
        causal_lm = self._is_causal_lm(model)
        peer_inputs = in_precision(peer_inputs, self.args.peer_torch_dtype)
        positions = scored_sample(token_mask(student_logits, labels, causal_lm), self.args.codistill_position_fraction)
        peers = (peer_logits_for_term(peer, peer_inputs, student_logits, labels, causal_lm, positions,
                                      self._peer_forward_context)
                 for peer in self.peer_copies.models())
        return distillation_to_peers(student_logits, peers, labels, causal_lm, self.args.codistill_loss,
                                     self.args.codistill_temperature, positions)

    @contextlib.contextmanager
    def _peer_forward_context(self):
        """The peers' forward: no autograd graph, and the training precision (autocast) of the student's."""
        with torch.no_grad(), self.accelerator.autocast():
            yield

    # ---- Evaluation -----------------------------------------------------------------------------------------

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """Trainer's loop, plus the ensemble and agreement of all G current models (`codistill_peer_metrics`).

        Collective across groups: every group evaluates at the same steps, so they fetch each other's current
        models into temporary copies here, leaving the stale peers that training uses as they were.
        """
        if not (self.codistilling and self.args.codistill_peer_metrics):
            return super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                           metric_key_prefix)
        self._eval_peers = PeerCopies(self.model, self.topology, sharded=self.args.codistill_sharded_exchange)
        self._eval_peers.check_same_architecture(self.model)
        self._eval_peers.exchange(self.model, self.state.global_step)
        self._peer_evaluation = PeerEvaluation(self.accelerator, self.group_index, self._is_causal_lm(self.model),
                                               self.preprocess_logits_for_metrics,
                                               keep_predictions=self.compute_metrics is not None)
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
            output.metrics.update(self._peer_evaluation.metrics(self.compute_metrics, metric_key_prefix))
        finally:
            if self.peer_copies is not None:
                self.peer_copies.bytes_sent += self._eval_peers.bytes_sent
                self.peer_copies.bytes_received += self._eval_peers.bytes_received
            self._eval_peers = self._peer_evaluation = None
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if self._peer_evaluation is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        # The peers need this model's logits even when Trainer only wants the loss.
        loss, logits, labels = super().prediction_step(model, inputs, False, ignore_keys)
        peer_logits, self._eval_peer_logits = self._eval_peer_logits, None
        if peer_logits is not None and logits is not None:
            self._peer_evaluation.add_batch(logits, peer_logits, labels)
        return (loss, None, None) if prediction_loss_only else (loss, logits, labels)

    def _determine_best_metric(self, metrics, trial) -> bool:
        """Trainer's decision, agreed by all groups: save when any group has a new best, stop when any group stops.

        Each group scores its own model, so under `save_strategy="best"` or `EarlyStoppingCallback` the groups would
        decide differently, and a group that saves or stops alone leaves the others waiting at the checkpoint's
        barrier or the next exchange. Private Trainer hook (transformers 5.18-5.24): Trainer calls it right after
        every evaluation during training, in every process, after the callbacks' `on_evaluate`.
        """
        is_new_best = super()._determine_best_metric(metrics=metrics, trial=trial)
        if self.topology is None:
            return is_new_best
        is_new_best, stop = self.topology.any_rank((is_new_best, self.control.should_training_stop), "evaluation")
        self.control.should_training_stop = stop
        return is_new_best

    def _record_eval_peer_logits(self, inputs) -> None:
        """Run the evaluation copies of the peers on the batch `compute_loss` received (inputs already on device)."""
        peer_inputs = {key: value for key, value in inputs.items() if key != "labels"}
        with torch.no_grad(), self.accelerator.autocast():
            self._eval_peer_logits = [peer(**peer_inputs) for peer in self._eval_peers.models()]

    def _is_causal_lm(self, model) -> bool:
        return is_causal_lm(self.accelerator.unwrap_model(model))

    # ---- Logging --------------------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the group's codistillation metrics, then gather every group's logs on world rank 0.

        World rank 0 logs its own (group 0) values under the usual keys and every group's under `group_<g>/`, so
        they reach its log history, progress bar and `report_to` integrations.
        """
        logs = self._with_weight_decay(logs)
        if not self.codistilling:
            if "loss" in logs and self._init_params is not None:
                logs = {**logs, "param_distance_from_init": self.parameter_distance_from_init()}
            return super().log(logs, start_time)
        if "loss" in logs:
            logs = {**logs, **self._pop_step_metrics()}
        gathered = self.topology.gather_to_world_zero(logs if self.args.process_index == 0 else None)
        if gathered is not None:
            # A new dict: `evaluate()` returns the one it passes here, and that must stay this group's metrics.
            logs = {**logs}
            for group, group_logs in enumerate(gathered):
                logs.update({f"group_{group}/{key}": value for key, value in group_logs.items()})
        super().log(logs, start_time)

    def _pop_step_metrics(self) -> dict[str, float]:
        steps = max(1, self.state.global_step - self._metrics_since_step)
        self._metrics_since_step = self.state.global_step
        metrics = {}
        for name, total, count in self._step_metrics.pop():
            total = self.accelerator.reduce(total.to(self.args.device), reduction="mean")
            metrics[name] = (total / steps).item() if name != "alpha" else (total / count).item()
        if self._init_params is not None and self.args.process_index == 0:
            metrics["param_distance_from_init"] = self.parameter_distance_from_init()
        peers = self.peer_copies
        if peers is not None:
            metrics["peer_exchanges"] = peers.num_exchanges
            metrics["peer_exchange_bytes_sent"] = peers.bytes_sent
            metrics["peer_exchange_bytes_received"] = peers.bytes_received
        return metrics

    @torch.no_grad()
    def parameter_distance_from_init(self) -> float:
        """L2 distance between the trainable parameters and their initial values."""
        squared = 0.0
        for name, param in self.model.named_parameters():
            if name in self._init_params:
                squared += (param.detach().float().cpu() - self._init_params[name]).pow(2).sum().item()
        return math.sqrt(squared)

    # ---- Saving ---------------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save this group's model to `<output_dir>/group_<g>`; group 0 also saves to `<output_dir>` itself.

        Checkpoint saves (internal calls) already target this group's own folder.
        """
        if not self.codistilling or _internal_call:
            return super().save_model(output_dir, _internal_call)
        root = output_dir if output_dir is not None else self.codistill_root
        super().save_model(group_dir(root, self.group_index), _internal_call)
        if self.group_index == 0:
            super().save_model(root, _internal_call=True)
        if self.topology.is_world_zero:
            self._write_run_info(root)

    def create_model_card(self, *args, **kwargs) -> None:
        """Trainer's card, tagged `codistillation`, plus a section with G, k, alpha, the peers and the ensemble."""
        if not self.codistilling:
            super().create_model_card(*args, **kwargs)
            if self.is_world_process_zero():
                say_trained_from_scratch(os.path.join(self.args.output_dir, "README.md"))
            return
        tags = kwargs.get("tags") or []
        tags = [tags] if isinstance(tags, str) else list(tags)
        kwargs["tags"] = tags + (["codistillation"] if "codistillation" not in tags else [])
        super().create_model_card(*args, **kwargs)
        if not self.is_world_process_zero():
            return
        say_trained_from_scratch(os.path.join(self.args.output_dir, "README.md"))
        own_name = (getattr(self, "hub_model_id", None) or self.args.hub_model_id
                    or os.path.basename(self.args.output_dir))
        section = codistillation_section(
            self.args, self.group_index, self.num_groups, self.group_size,
            peers=peer_names(own_name, self.group_index, self.num_groups),
            dataset=kwargs.get("dataset"), eval_metrics=last_eval_metrics(self.state.log_history),
        )
        add_codistillation_section(os.path.join(self.args.output_dir, "README.md"), section)

    def _write_run_info(self, root: str | None = None) -> None:
        if not self.topology.is_world_zero:
            return
        root = root or self.codistill_root
        write_run_info(root, self.args, self.num_groups, self.group_size)

    def _save_codistill_checkpoint(self) -> None:
        """Add the peer copies to the checkpoint Trainer just wrote, then mark it complete once all groups have."""
        # A save the step-end callback did not foresee (e.g. `save_strategy="best"`) may meet a background exchange.
        self.peer_copies.finish_exchange()
        step = self.state.global_step
        checkpoint = os.path.join(self.args.output_dir, f"checkpoint-{step}")
        writer = self.args.should_save
        if writer:
            os.makedirs(checkpoint, exist_ok=True)
            save_file(self.peer_copies.state_dict(), os.path.join(checkpoint, PEERS_NAME))
            if self._init_params is not None:
                save_file(self._init_params, os.path.join(checkpoint, INIT_NAME))
        self.topology.barrier("checkpoint-written")
        if writer:
            state = {
                "num_groups": self.num_groups,
                "group_index": self.group_index,
                "group_size": self.group_size,
                "global_step": step,
                "last_exchange_step": self.peer_copies.last_exchange_step,
                "num_exchanges": self.peer_copies.num_exchanges,
                "exchange_bytes_sent": self.peer_copies.bytes_sent,
                "exchange_bytes_received": self.peer_copies.bytes_received,
            }
            tmp = os.path.join(checkpoint, STATE_NAME + ".tmp")
            with open(tmp, "w") as f:
                json.dump(state, f, indent=2)
            os.replace(tmp, os.path.join(checkpoint, STATE_NAME))
        self.topology.barrier("checkpoint-complete")
        if writer:
            rotate_group_checkpoints(self.args.output_dir, self._save_total_limit,
                                     keep=self.state.best_model_checkpoint)
