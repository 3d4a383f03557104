"""The codistillation engine: everything codistillation adds to a `Trainer`'s training, in one object.

It owns the peers and when they refresh, the distillation term and alpha's schedule, the step metrics, and the
checkpoint extras (peer copies, initial parameters, the completion marker). A trainer (a *driver*) hooks it into
training from outside, the way accelerate's `LocalSGD` hooks a periodic average into a loop:

- as a `TrainerCallback` (added by the driver), it starts at `on_train_begin`, refreshes the peers at `on_step_end`,
  completes each checkpoint at `on_save` and lands the last exchange at `on_train_end`;
- the driver's `compute_loss` calls `loss_with_distillation`, its `log` calls `pop_metrics`.

Two drivers use it: `CodistillTrainer` launched on several processes (one model per group of processes, peers
exchanged over `torch.distributed`) and the one-process trainer (every model in one process). They differ only in
what `CodistillDriver` answers and in the peer set they build (`hf_codistill.exchange`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback

from .checkpointing import (
    INIT_NAME,
    PEERS_NAME,
    invalidate_checkpoints_after,
    mark_complete,
    rank_file,
    read_state,
    rotate_group_checkpoints,
    sibling_checkpoint,
)
from .compat import reload_renamed_weights
from .losses import distillation_to_peers, flat_label_mask, sample_positions
from .peer_forward import in_precision, is_causal_lm, logits_of, peer_logits_for_term
from .step_metrics import InitialParameters, MetricSums


def alpha_at(step: int, args) -> float:
    """alpha_t: 0 during the burn-in, then a linear ramp over the warm-up, then `codistill_alpha`."""
    if step < args.codistill_burn_in_steps:
        return 0.0
    if args.codistill_alpha_warmup_steps > 0:
        ramp = (step - args.codistill_burn_in_steps + 1) / args.codistill_alpha_warmup_steps
        return args.codistill_alpha * min(1.0, ramp)
    return args.codistill_alpha


class PeerSet(Protocol):
    """The peers a process distils from (`hf_codistill.exchange` documents the interface; `PeerCopies` there,
    `LocalPeers` in one process, `StorePeers` for groups launched apart)."""

    dtype: torch.dtype | None
    restores_from_checkpoint: bool
    state_rank: int | None  # FSDP2 peers: the shard this process holds, saved by every rank in its own file

    def peers_of(self, group: int) -> dict[int, nn.Module]: ...
    def check_compatible(self) -> None: ...
    def share_initialisation(self, base_only: bool = False) -> None: ...
    def refresh(self, step: int, background: bool = False) -> None: ...
    def finish(self) -> None: ...
    def state_dict(self, group: int) -> dict[str, torch.Tensor]: ...
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...
    def counters(self) -> dict[str, int]: ...
    def checkpoint_state(self) -> dict: ...
    def load_checkpoint_state(self, state: dict) -> None: ...


class CodistillDriver(Protocol):
    """What a trainer tells the engine."""

    num_groups: int
    group_size: int

    def codistilled_models(self) -> dict[int, nn.Module]:
        """The models this process trains, by group index (one when launched, all G in one process)."""

    def make_peer_set(self, models: dict[int, nn.Module]) -> PeerSet:
        """The peers of `models`, built when training starts."""

    def resume_checkpoints(self) -> dict[int, str] | None:
        """Per group of `codistilled_models`, the checkpoint this run resumes from; None for a fresh start."""

    def group_folder(self, group: int) -> str:
        """Where group `group` writes its checkpoints."""

    def barrier(self, name: str) -> None:
        """Wait for every group (a no-op in one process)."""

    def prepare_checkpoint(self, step: int) -> None:
        """Called before the engine adds its files to step `step`'s checkpoint folders."""

    def write_run_info(self) -> None:
        """Write `codistill.json` (called once, at a fresh start)."""


class CodistillEngine(TrainerCallback):
    """Codistillation for the models of one process; see the module docstring for how drivers use it."""

    def __init__(self, args, driver: CodistillDriver, autocast: Callable[[], AbstractContextManager],
                 shared_batch: bool = False):
        self.args = args
        self.shared_batch = shared_batch
        self.driver = driver
        self.autocast = autocast
        self.models: dict[int, nn.Module] = {}
        self.peers: PeerSet | None = None
        self.initial_parameters: dict[int, InitialParameters] = {}
        self.step_metrics: dict[int, MetricSums] = {}
        self._metrics_since_step = 0
        self._shared_peer_logits: dict[int, torch.Tensor] = {}

    # ---- Trainer events -------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        self.start(state.global_step)
        # Every process has chosen its checkpoint (reading every group's markers) before any marker goes.
        self.driver.barrier("resume-chosen")
        if args.should_save:
            for group in self.models:
                invalidate_checkpoints_after(self.driver.group_folder(group), state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        # `on_step_end` follows every optimizer update, skipped (fp16 overflow) or not, and `global_step` advances
        # the same way in every group, so all processes agree on when to exchange.
        # Saves and the end of training need the peers settled: a resumed run must see the same peers.
        self.after_step(state.global_step, settle=control.should_save or control.should_training_stop)

    def on_save(self, args, state, control, **kwargs):
        self.save_checkpoint(state.global_step, args.should_save, state.best_model_checkpoint)

    def on_train_end(self, args, state, control, **kwargs):
        self.peers.finish()
        if args.load_best_model_at_end and state.best_model_checkpoint is not None:
            # Trainer has just loaded the best checkpoint's raw state dict, which misses renamed keys.
            for group, model in self.models.items():
                reload_renamed_weights(model, sibling_checkpoint(state.best_model_checkpoint, group))

    # ---- Peers ----------------------------------------------------------------------------------------------

    def start(self, step: int) -> None:
        """Build the peers: from the checkpoint when resuming, else from a first refresh."""
        self.models = self.driver.codistilled_models()
        self.step_metrics = {group: MetricSums() for group in self.models}
        self._metrics_since_step = step
        self.peers = self.driver.make_peer_set(self.models)
        shares = self._shares_initialisation(self.models[min(self.models)])
        resume = self.driver.resume_checkpoints()
        # Checkpoints hold the models (a PEFT model's adapter only): a resumed run shares a PEFT base again.
        if shares:
            self.peers.share_initialisation(base_only=bool(resume))
        self.peers.check_compatible()
        if resume:
            state = read_state(resume[min(resume)])
            self._check_same_shards(state)
            for group, checkpoint in resume.items():
                reload_renamed_weights(self.models[group], checkpoint)
                if self.peers.restores_from_checkpoint:
                    self.peers.load_state_dict(load_file(os.path.join(checkpoint, self._own_file(PEERS_NAME))))
            self.peers.load_checkpoint_state(state)
            if not self.peers.restores_from_checkpoint:
                self.peers.refresh(step)
            if self.args.logs_param_distance:
                loaded = {group: InitialParameters.load(os.path.join(checkpoint, self._own_file(INIT_NAME)))
                          for group, checkpoint in resume.items()}
                self.initial_parameters = loaded if None not in loaded.values() else {}
            return
        self.peers.refresh(step)
        if self.args.logs_param_distance:
            self.initial_parameters = {group: InitialParameters.of(model) for group, model in self.models.items()}
        self.driver.write_run_info()

    def _own_file(self, name: str) -> str:
        """A checkpoint file of this process: the group's, or this rank's for peers sharded with FSDP2."""
        return rank_file(name, self.peers.state_rank)

    def _check_same_shards(self, state: dict) -> None:
        if self.peers.state_rank is not None and state["group_size"] != self.driver.group_size:
            raise ValueError(
                f"This checkpoint was written by groups of {state['group_size']} processes, whose FSDP2 peers are "
                f"sharded {state['group_size']} ways; this run has {self.driver.group_size} per group. Resume with "
                f"{state['group_size']} processes per group ({state['group_size'] * self.driver.num_groups} in all)."
            )

    def _shares_initialisation(self, model: nn.Module) -> bool:
        if self.args.codistill_shared_init is not None:
            return self.args.codistill_shared_init
        # `from_pretrained` records where the weights came from; configs and `model_init` from a config do not.
        return bool(getattr(model, "name_or_path", ""))

    def after_step(self, step: int, settle: bool = True) -> None:
        """Land a background refresh, and refresh every `codistill_sync_every` steps (in the background with
        `codistill_overlap_exchange`, unless `settle`)."""
        self.peers.finish()
        if step % self.args.codistill_sync_every == 0:
            self.peers.refresh(step, background=self.args.codistill_overlap_exchange and not settle)

    # ---- The distillation term ------------------------------------------------------------------------------

    def current_alpha(self, step: int) -> float:
        return alpha_at(step, self.args)

    def loss_with_distillation(self, group: int, loss: torch.Tensor, student_logits: torch.Tensor,
                               peer_inputs: dict, labels: torch.Tensor | None, *, step: int, ga_steps: int,
                               loss_is_scaled_for_ga: bool) -> torch.Tensor:
        """Group `group`'s task loss plus alpha_t times its distillation term, and both recorded for the logs.

        Trainer divides the returned loss by the accumulation steps unless it is already normalised over the whole
        accumulated batch (`loss_is_scaled_for_ga`); the term is a per-batch mean, so it is put on the same footing.
        Metrics are recorded per optimizer step, i.e. divided by the accumulation steps like Trainer's `loss`.
        """
        metrics = self.step_metrics[group]
        metrics.add("task_loss", loss / (1 if loss_is_scaled_for_ga else ga_steps))
        alpha = self.current_alpha(step)
        peers = self.peers.peers_of(group) if alpha > 0 else {}
        if peers:  # groups launched apart may have no live peer for a while
            distill = self.distillation_term(group, student_logits, peer_inputs, labels, peers)
            metrics.add("distill_loss", distill / ga_steps)
            loss = loss + alpha * (distill / ga_steps if loss_is_scaled_for_ga else distill)
        metrics.add("alpha", torch.tensor(alpha))
        return loss

    def distillation_term(self, group: int, student_logits: torch.Tensor, peer_inputs: dict,
                          labels: torch.Tensor | None, peers: dict[int, nn.Module] | None = None) -> torch.Tensor:
        """mean over the peers j of D(f_group(x), f_j(x)) at the positions that carry a label; each peer computes
        only what the term scores (`peer_forward`)."""
        causal_lm = is_causal_lm(self.models[group])
        scored = flat_label_mask(student_logits, labels, causal_lm)
        positions = sample_positions(scored, self.args.codistill_position_fraction)
        peer_inputs = in_precision(peer_inputs, self.peers.dtype)
        peers = self.peers.peers_of(group) if peers is None else peers
        if self.shared_batch:
            # One batch for every model: each peer's whole predictions on it serve every other model this step.
            logits: Iterable = (self._shared_logits_of(index, peer, peer_inputs) for index, peer in peers.items())
        else:
            logits = (peer_logits_for_term(peer, peer_inputs, student_logits, labels, causal_lm, positions,
                                           self._forward_context(peer))
                      for peer in peers.values())
        return distillation_to_peers(student_logits, logits, labels, causal_lm, self.args.codistill_loss,
                                     self.args.codistill_temperature, positions)

    def _forward_context(self, peer: nn.Module) -> Callable[[], AbstractContextManager]:
        """The context of a peer's forward: no autograd graph, the student's training precision (autocast), and
        eval mode (no dropout; a live model in one process goes back to the mode it was in)."""

        @contextmanager
        def context():
            live = peer.training  # frozen copies stay in eval mode: no walk over their modules per forward
            if live:
                peer.eval()
            try:
                with torch.no_grad(), self.autocast():
                    yield
            finally:
                if live:
                    peer.train()

        return context

    def _shared_logits_of(self, index: int, peer: nn.Module, peer_inputs: dict) -> torch.Tensor:
        if index not in self._shared_peer_logits:
            with self._forward_context(peer)():
                self._shared_peer_logits[index] = logits_of(peer(**peer_inputs))
        return self._shared_peer_logits[index]

    def drop_shared_logits(self) -> None:
        """Forget the peers' whole logits of a shared batch: not kept through the optimizer step."""
        self._shared_peer_logits = {}

    # ---- Metrics --------------------------------------------------------------------------------------------

    def record(self, group: int, name: str, value: torch.Tensor) -> None:
        self.step_metrics[group].add(name, value)

    def pop_metrics(self, step: int, reduce: Callable[[torch.Tensor], torch.Tensor] = lambda total: total,
                    with_distance: bool = True) -> dict[int, dict[str, float]]:
        """Per group, the means of the step metrics since the last call (reduced over the group's processes by
        `reduce`), the distance from the initial parameters (`with_distance`) and the peers' counters."""
        steps = max(1, step - self._metrics_since_step)
        self._metrics_since_step = step
        logs = {}
        for group, sums in self.step_metrics.items():
            metrics = {name: (reduce(total) / (count if name == "alpha" else steps)).item()
                       for name, total, count in sums.pop()}
            if with_distance and group in self.initial_parameters:
                metrics["param_distance_from_init"] = self.initial_parameters[group].distance(self.models[group])
            metrics.update(self.peers.counters() if self.peers is not None else {})
            logs[group] = metrics
        return logs

    # ---- Checkpoints ----------------------------------------------------------------------------------------

    def save_checkpoint(self, step: int, writer: bool, best_checkpoint: str | None) -> None:
        """Add the peers and initial parameters to the checkpoint Trainer just wrote, then mark it complete once
        every group has; only then rotate older ones (see `hf_codistill.checkpointing`)."""
        # A save the step-end did not foresee (e.g. `save_strategy="best"`) may meet a background exchange.
        self.peers.finish()
        checkpoints = {group: os.path.join(self.driver.group_folder(group), f"checkpoint-{step}")
                       for group in self.models}
        if writer:
            self.driver.prepare_checkpoint(step)
        if writer or self.peers.state_rank is not None:  # FSDP2 peers: every rank writes its shards
            for group, checkpoint in checkpoints.items():
                os.makedirs(checkpoint, exist_ok=True)
                if self.peers.restores_from_checkpoint:
                    save_file(self.peers.state_dict(group), os.path.join(checkpoint, self._own_file(PEERS_NAME)))
                if group in self.initial_parameters:
                    self.initial_parameters[group].save(os.path.join(checkpoint, self._own_file(INIT_NAME)))
        self.driver.barrier("checkpoint-written")
        if writer:
            state = {"num_groups": self.driver.num_groups, "group_size": self.driver.group_size,
                     "global_step": step, **self.peers.checkpoint_state()}
            for group, checkpoint in checkpoints.items():
                mark_complete(checkpoint, {"group_index": group, **state})
        self.driver.barrier("checkpoint-complete")
        if writer:
            for group in self.models:
                keep = sibling_checkpoint(best_checkpoint, group) if best_checkpoint else None
                rotate_group_checkpoints(self.driver.group_folder(group), self.args.save_total_limit, keep=keep)
