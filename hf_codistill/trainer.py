"""`CodistillTrainer`: `Trainer` plus a distillation term toward stale copies of the other groups' models.

This module is the launched driver of the codistillation engine (`hf_codistill.engine`): one model per group of
processes, peers exchanged over `torch.distributed`. Given a list of models it builds the one-process driver instead
(`hf_codistill.one_process`), which runs this class's per-group code once per model.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import get_last_checkpoint as get_last_trainer_checkpoint

from .adapters import (
    EVALUATION_PEER_ADAPTER,
    adapted_base_name,
    is_peft_model,
    saving_own_adapter_only,
    with_adapters,
)
from .checkpointing import group_dir, resolve_resume_checkpoint, write_run_info
from .compat import align_loss_accounting, say_trained_from_scratch
from .config import CodistillTrainingArguments
from .engine import CodistillEngine, alpha_at
from .exchange import PeerCopies, ring_peers
from .group_data import group_stream
from .model_card import (
    add_codistillation_section,
    codistillation_section,
    last_eval_metrics,
    peer_names,
    with_codistillation_tag,
)
from .peer_evaluation import PeerEvaluation
from .peer_forward import is_causal_lm, logits_of, peer_logits_at_labels
from .regularization import WeightDecaySchedule, parse_milestones
from .sharding import check_sharded_trainer
from .step_metrics import InitialParameters, ParameterDistanceCallback
from .store_peers import StorePeers
from .topology import GroupTopology, SeparateGroup, get_topology, launched_world_size


def _adapters_on_one_base(model: nn.Module | None, args, peft_config) -> bool:
    """Whether a single model is to train G students in this process, as G adapters of it (`shared_base`): with
    codistillation, adapters (`peft_config` or a `PeftModel`), more than one group, and neither a launcher nor a store
    to make this process one group."""
    return (model is not None and (peft_config is not None or is_peft_model(model))
            and getattr(args, "codistill", False) and args.num_groups > 1 and not args.codistill_peer_store
            and launched_world_size() == 1)


class CodistillTrainer(Trainer):
    """Trains one of G codistilled models per process group; takes the same arguments as [`Trainer`].

    With `args.codistill=False` it is exactly `Trainer`. With `args.codistill=True`, launched on W processes
    (`torchrun` or `accelerate launch`), the processes form G groups of W/G ranks (see `hf_codistill.topology`).
    Each group trains its own model with DDP inside the group and adds to its loss
    `alpha_t * mean_j D(f_i(x), f_j(x))` over stale local copies f_j of the other groups' models, refreshed every
    `codistill_sync_every` steps. Group g trains with seed `seed + g` and writes to `output_dir/group_<g>`; group
    0's final model is also written to `output_dir` itself. Pass a list of models to train them all in this process.
    """

    # The trainer a list of models builds (`hf_codistill.one_process` registers it, and the package imports it).
    _list_of_models_driver: type[CodistillTrainer] | None = None

    def __init_subclass__(cls, trains_a_list_of_models: bool = False, **kwargs):
        super().__init_subclass__(**kwargs)
        if trains_a_list_of_models:
            CodistillTrainer._list_of_models_driver = cls

    def __new__(cls, model: nn.Module | list[nn.Module] | None = None, *args, **kwargs):
        if cls is CodistillTrainer and (isinstance(model, (list, tuple)) or _adapters_on_one_base(
                model, args[0] if args else kwargs.get("args"), kwargs.get("peft_config"))):
            cls = CodistillTrainer._list_of_models_driver
        return super().__new__(cls)

    def __init__(self, model: nn.Module | None = None, args: CodistillTrainingArguments | None = None, *a,
                 peft_config=None, **kw):
        """`peft_config` (a `peft.PeftConfig`, as TRL's trainers take it) trains adapters of `model` instead of the
        model itself; with codistillation each peer is then one more adapter on this group's base model."""
        if peft_config is not None:
            model = with_adapters(model, peft_config)
        self.codistilling = bool(getattr(args, "codistill", False))
        self.topology: GroupTopology | None = self._join_groups(args) if self.codistilling else None
        self.engine: CodistillEngine | None = None
        self.initial_parameters: InitialParameters | None = None
        self._resume_checkpoint: str | None = None
        self._peer_evaluation: PeerEvaluation | None = None
        self._eval_peers: PeerCopies | None = None
        self._eval_peer_logits: list | None = None
        root_args = args
        if self.codistilling:
            if model is not None:
                align_loss_accounting(model)
            self.codistill_root = args.output_dir
            args = args.for_group(self.group_index, reports=self.topology is None or self.topology.is_world_zero)
        super().__init__(model, args, *a, **kw)
        if self.codistilling:
            check_sharded_trainer(self)
        self._add_weight_decay_schedule()
        if not self.codistilling:
            if getattr(self.args, "logs_param_distance", False):
                self.add_callback(ParameterDistanceCallback(self))
            return
        self.engine = CodistillEngine(root_args, driver=self, autocast=lambda: self.accelerator.autocast(),
                                      shared_batch=self.topology is None and root_args.codistill_shared_batch)
        self.add_callback(self.engine)
        if not self.is_world_zero:
            # World rank 0 shows the progress bar and reports every group's metrics; other groups stay quiet.
            self.remove_callback(ProgressCallback)
            self.remove_callback(PrinterCallback)

    def _join_groups(self, args: CodistillTrainingArguments) -> GroupTopology | SeparateGroup:
        if args.codistill_peer_store:
            return SeparateGroup(args.num_groups, args.group_index, timedelta(seconds=args.ddp_timeout))
        topology = get_topology()
        if topology is None:
            raise ValueError(
                f"`codistill=True` with num_groups={args.num_groups} needs at least {args.num_groups} processes, "
                "one group of ranks per model: launch with e.g. `torchrun --nproc_per_node "
                f"{2 * args.num_groups} your_script.py` or `accelerate launch --multi_gpu --num_processes "
                f"{2 * args.num_groups} your_script.py`; or, to train them all in this process, pass a list of "
                f"{args.num_groups} models: `CodistillTrainer(model=[model_0, model_1, ...], ...)`, or one model with "
                f"`peft_config=` to train {args.num_groups} adapters of it."
            )
        return topology

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

    # ---- Topology -------------------------------------------------------------------------------------------

    @property
    def num_groups(self) -> int:
        return self.topology.num_groups if self.topology is not None else 1

    @property
    def group_index(self) -> int:
        return self.topology.group_index if self.topology is not None else 0

    @property
    def group_rank(self) -> int:
        return self.topology.group_rank if self.topology is not None else self.args.process_index

    @property
    def group_size(self) -> int:
        return self.topology.group_size if self.topology is not None else self.args.world_size

    @property
    def is_world_zero(self) -> bool:
        """Whether this process reports for every group (world rank 0)."""
        return self.topology.is_world_zero if self.topology is not None else self.args.process_index == 0

    @property
    def causal_lm(self) -> bool:
        """Whether the model is a causal LM (its position t is scored against label t + 1)."""
        return is_causal_lm(self.accelerator.unwrap_model(self.model))

    @property
    def peer_copies(self) -> PeerCopies | None:
        """This group's stale peers (built when training starts)."""
        return self.engine.peers if self.engine is not None else None

    # ---- What the engine asks of its driver (`hf_codistill.engine.CodistillDriver`) ---------------------------

    def codistilled_models(self) -> dict[int, nn.Module]:
        return {self.group_index: self.model}

    def make_peer_set(self, models: dict[int, nn.Module]) -> PeerCopies | StorePeers:
        if self.args.codistill_peer_store:
            return StorePeers.from_arguments(models[self.group_index], self.args,
                                             fresh=self._resume_checkpoint is None)
        return PeerCopies(models[self.group_index], self.topology, sharded=self.args.codistill_sharded_exchange,
                          dtype=self.args.peer_torch_dtype, num_peers=self.args.codistill_num_peers)

    def resume_checkpoints(self) -> dict[int, str] | None:
        return {self.group_index: self._resume_checkpoint} if self._resume_checkpoint else None

    def group_folder(self, group: int) -> str:
        return group_dir(self.codistill_root, group)

    def barrier(self, name: str) -> None:
        self.topology.barrier(name)

    def prepare_checkpoint(self, step: int) -> None:
        pass  # Trainer has written this group's folder whole

    def write_run_info(self, root: str | None = None) -> None:
        # Groups launched apart may share `output_dir`: group 0 alone writes the run's description there.
        if self.is_world_zero and not (self.args.codistill_peer_store and self.group_index != 0):
            write_run_info(root or self.codistill_root, self.args, self.num_groups, self.group_size,
                           **({"one_process": True} if self.topology is None else {}))

    # ---- Training -------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, *a, **kw):
        if self.codistilling and resume_from_checkpoint not in (None, False):
            resume_from_checkpoint = resolve_resume_checkpoint(
                resume_from_checkpoint, self.codistill_root, self.group_index, self.num_groups,
                alone=bool(self.args.codistill_peer_store),
            )
        if self.topology is not None:
            self._split_stream_between_groups()
        resumed = resume_from_checkpoint
        if resumed is True:  # plain mode: the folder Trainer itself will pick (and complain about if there is none)
            resumed = get_last_trainer_checkpoint(self.args.output_dir)
        self._resume_checkpoint = resumed or None
        return super().train(resume_from_checkpoint, *a, **kw)

    def _split_stream_between_groups(self) -> None:
        """Each group reads its own 1/G of a streamed training set (`hf_codistill.group_data`), split once."""
        if self.train_dataset is not getattr(self, "_group_stream", None):  # a first or a new data set
            self.train_dataset = self._group_stream = group_stream(self.train_dataset, self.group_index,
                                                                   self.num_groups)

    def _codistilled_group_of(self, model: nn.Module) -> int | None:
        """The group whose model `model` is (this process trains one: any model in training is it)."""
        return self.group_index

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        group = self._codistilled_group_of(model) if self.engine is not None and model.training else None
        if group is None:
            if self._eval_peers is not None:
                self._record_eval_peer_logits(inputs)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.get("labels")
        peer_inputs = {key: value for key, value in inputs.items() if key != "labels"}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        loss = self.engine.loss_with_distillation(
            group, loss, logits_of(outputs, with_loss=self._outputs_hold_loss(labels)), peer_inputs, labels,
            step=self.state.global_step, ga_steps=self.current_gradient_accumulation_steps,
            loss_is_scaled_for_ga=self._loss_is_scaled_for_ga(num_items_in_batch),
        )
        return (loss, outputs) if return_outputs else loss

    def current_alpha(self) -> float:
        """The weight of the distillation term at the current step (`codistill_alpha` after burn-in and warm-up)."""
        return alpha_at(self.state.global_step, self.args)

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

    # ---- Evaluation -----------------------------------------------------------------------------------------

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """Trainer's loop, plus the ensemble and agreement of all G current models (`codistill_peer_metrics`).

        Collective across groups: every group evaluates at the same steps, so they fetch each other's current
        models into temporary copies here, leaving the stale peers that training uses as they were.
        """
        if self.engine is None or not self.args.codistill_peer_metrics:
            return super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                           metric_key_prefix)
        compute_metrics, preprocess = self._single_model_metrics()
        peer_groups = self._fetch_current_peers()
        if peer_groups == []:  # groups launched apart, none of them live
            self._eval_peers = None
            return super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                           metric_key_prefix)
        self._peer_evaluation = PeerEvaluation(self.accelerator, self.group_index, self.causal_lm, preprocess,
                                               keep_predictions=compute_metrics is not None, peer_groups=peer_groups)
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
            output.metrics.update(self._peer_evaluation.metrics(compute_metrics, metric_key_prefix))
        finally:
            if isinstance(self._eval_peers, PeerCopies) and self._eval_peers is not self.peer_copies:
                self._eval_peers.release()  # temporary copies: drop them, count what they moved
                if self.peer_copies is not None:
                    self.peer_copies.bytes_sent += self._eval_peers.bytes_sent
                    self.peer_copies.bytes_received += self._eval_peers.bytes_received
            self._eval_peers = self._peer_evaluation = None
        return output

    def _single_model_metrics(self):
        """`compute_metrics` and `preprocess_logits_for_metrics` for one model, which also score the ensemble."""
        return self.compute_metrics, self.preprocess_logits_for_metrics

    def _fetch_current_peers(self) -> list[int] | None:
        """The other groups' current models, into temporary copies for this evaluation (collective); returns their
        groups (None: all the others). Groups launched apart score with the live peers they hold (from the store)."""
        if self.args.codistill_peer_store:
            self._eval_peers = self.peer_copies
            return list(self.peer_copies.live) if self.peer_copies is not None else []
        self._eval_peers = PeerCopies(self.model, self.topology, sharded=self.args.codistill_sharded_exchange,
                                      adapter_name=EVALUATION_PEER_ADAPTER)
        self._eval_peers.check_same_architecture(self.model)
        self._eval_peers.exchange(self.model, self.state.global_step)
        return None

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
        barrier or the next exchange. Private Trainer hook (see `hf_codistill.compat.PRIVATE_TRAINER_HOOKS`): Trainer
        calls it right after every evaluation during training, in every process, after the callbacks' `on_evaluate`.
        """
        is_new_best = super()._determine_best_metric(metrics=metrics, trial=trial)
        if self.topology is None:
            return is_new_best
        is_new_best, stop = self.topology.any_rank((is_new_best, self.control.should_training_stop), "evaluation")
        self.control.should_training_stop = stop
        return is_new_best

    def _record_eval_peer_logits(self, inputs) -> None:
        """Run the evaluation copies of the peers on the batch `compute_loss` received (inputs already on device),
        their output heads only where a label scores them."""
        labels = inputs.get("labels")
        peer_inputs = {key: value for key, value in inputs.items() if key != "labels"}
        with torch.no_grad(), self.accelerator.autocast():
            self._eval_peer_logits = [peer_logits_at_labels(peer, peer_inputs, labels, shift_labels=self.causal_lm)
                                      for peer in self._eval_peers.models()]

    # ---- Logging --------------------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the codistillation metrics, then gather every group's logs on world rank 0.

        World rank 0 logs its own (group 0) values under the usual keys and every group's under `group_<g>/`, so
        they reach its log history, progress bar and `report_to` integrations.
        """
        schedule = self.weight_decay_schedule
        if "loss" in logs and schedule is not None and schedule.current is not None:
            logs = {**logs, "weight_decay": schedule.current}
        if "loss" in logs and self.engine is not None:
            logs = {**logs, **self._step_logs()}
        elif "loss" in logs and self.initial_parameters is not None:
            logs = {**logs, "param_distance_from_init": self.initial_parameters.distance(self.model)}
        if self.topology is not None:
            gathered = self.topology.gather_to_world_zero(logs if self.args.process_index == 0 else None)
            if gathered is not None:
                # A new dict: `evaluate()` returns the one it passes here, and that must stay this group's metrics.
                logs = {**logs}
                for group, group_logs in enumerate(gathered):
                    logs.update({f"group_{group}/{key}": value for key, value in group_logs.items()})
        super().log(logs, start_time)

    def _step_logs(self) -> dict[str, float]:
        """This group's codistillation metrics since the last log, averaged over its processes."""
        def group_mean(total: torch.Tensor) -> torch.Tensor:
            return self.accelerator.reduce(total.to(self.args.device), reduction="mean")

        # The distance of an FSDP2 model sums its shards over the group: every rank computes it.
        metrics = self.engine.pop_metrics(self.state.global_step, group_mean,
                                          with_distance=self.args.process_index == 0 or self.is_fsdp_enabled)
        return metrics[self.group_index]

    def parameter_distance_from_init(self, group: int | None = None) -> float:
        """L2 distance of a model's trainable parameters from their values when training started: this group's
        model, or model `group` of a list of models (Sodhani et al.'s diagnostic of over-regularisation)."""
        if self.engine is None:
            return self.initial_parameters.distance(self.model)
        group = self.group_index if group is None else group
        return self.engine.initial_parameters[group].distance(self.engine.models[group])

    # ---- Saving ---------------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save this group's model to `<output_dir>/group_<g>`; group 0 also saves to `<output_dir>` itself.

        Checkpoint saves (internal calls) already target this group's own folder. A PEFT model saves its own adapter
        only, not the adapters that hold its peers.
        """
        with saving_own_adapter_only(self.model):
            if not self.codistilling or _internal_call:
                return super().save_model(output_dir, _internal_call)
            root = output_dir if output_dir is not None else self.codistill_root
            self._save_whole_model(group_dir(root, self.group_index), push=True)
            if self.group_index == 0:
                self._save_whole_model(root, push=False)
                self.write_run_info(root)

    def _save_whole_model(self, output_dir: str, push: bool) -> None:
        """Trainer's `save_model` (pushing with `push`), except that an FSDP2 group with sharded checkpoints
        (`fsdp_config["state_dict_type"] = "SHARDED_STATE_DICT"`), for which Trainer writes nothing, gathers its
        model whole (collective over the group), so that `from_pretrained(output_dir)` reads it."""
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if plugin is None or "FULL_STATE_DICT" in str(plugin.state_dict_type):
            return super().save_model(output_dir, _internal_call=not push)
        self._save(output_dir, state_dict=self.accelerator.get_state_dict(self.model))
        if push and self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def create_model_card(self, *args, **kwargs) -> None:
        """Trainer's card, tagged `codistillation`, plus a section with G, k, alpha, the peers and the ensemble."""
        if self.codistilling:
            kwargs["tags"] = with_codistillation_tag(kwargs.get("tags"))
        super().create_model_card(*args, **kwargs)
        if not self.is_world_process_zero():
            return
        card = os.path.join(self.args.output_dir, "README.md")
        say_trained_from_scratch(card)
        if not self.codistilling:
            return
        own_name = (getattr(self, "hub_model_id", None) or self.args.hub_model_id
                    or os.path.basename(self.args.output_dir))
        section = codistillation_section(
            self.args, self.group_index, self.num_groups, self.group_size,
            peers=peer_names(own_name, self.group_index,
                             ring_peers(self.group_index, self.num_groups, self.args.codistill_num_peers)),
            dataset=kwargs.get("dataset"), eval_metrics=last_eval_metrics(self.state.log_history),
            base_model=adapted_base_name(self.model),
        )
        add_codistillation_section(card, section)
