"""Saving, loading and publishing every model of a one-process run, each into its own group folder.

`OneProcessCodistillTrainer` trains G models in one process; Trainer's saving code is written for one model. This
mixin runs it once per model, through the trainer's `_for_model(g)` (which points Trainer's single-model attributes at
model g), so that the files are those of a launched run: `output_dir/group_<g>/...`, checkpoints included.
"""

from __future__ import annotations

import os

import torch
from transformers.trainer import TRAINING_ARGS_NAME

from .checkpointing import sibling_checkpoint
from .model_card import group_log_history
from .shared_base import AdapterStudent


class PerModelSaving:
    """Trainer's saving and loading for each of the models of a one-process trainer (mixed in before the trainer's
    class, which provides `num_groups`, `_active_group` and `_for_model`)."""

    def save_metrics(self, split: str, metrics: dict, combined: bool = True) -> None:
        """`<split>_results.json` in every model's folder, as each group writes its own in the launched mode.

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
            with self._for_model(group):
                super().save_metrics(split, metrics if group == 0 else {**shared, **own}, combined)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save model g to `<output_dir>/group_<g>` for every g, and model 0 to `<output_dir>` as well."""
        if self._active_group is not None:
            # Trainer's own code running for one model (e.g. `push_to_hub`, which saves first).
            return super().save_model(output_dir, _internal_call)
        for group in range(self.num_groups):
            with self._for_model(group):
                if _internal_call:  # a checkpoint: Trainer names model 0's folder, each model gets its own
                    super().save_model(sibling_checkpoint(output_dir, group), _internal_call=True)
                else:  # the launched driver's save for group g (with `push_to_hub`: to `<hub_model_id>-group-<g>`)
                    super().save_model(output_dir)

    def push_to_hub(self, *args, **kwargs) -> list:
        """Push model g to `<hub_model_id>-group-<g>`, for every g."""
        if self._active_group is not None:
            # Trainer's own code running for one model (its `save_model` pushes after saving): that model only.
            return super().push_to_hub(*args, **kwargs)
        commits = []
        for group in range(self.num_groups):
            with self._for_model(group):
                commits.append(super().push_to_hub(*args, **kwargs))
        return commits

    def create_model_card(self, *args, **kwargs) -> None:
        """Each model's card (`README.md` in its group folder), with the launched mode's codistillation section."""
        # Trainer's own `push_to_hub` for one model (see `push_to_hub`) asks for that model's card only.
        groups = [self._active_group] if self._active_group is not None else range(self.num_groups)
        shared_history = self.state.log_history
        try:
            for group in groups:
                # Trainer's summary and the codistillation section read the log history: model g's own values.
                self.state.log_history = group_log_history(shared_history, group)
                with self._for_model(group):
                    # Trainer makes its output folder at start-up; a group's folder exists only once something is
                    # saved (`--do_eval` without `--do_train` saves nothing).
                    os.makedirs(self.args.output_dir, exist_ok=True)
                    super().create_model_card(*args, **kwargs)
        finally:
            self.state.log_history = shared_history

    def _in_each_models_checkpoint(self, method, checkpoint: str) -> None:
        """Trainer's `method` for every model, on its own group's folder of `checkpoint`'s step."""
        for group in range(self.num_groups):
            with self._for_model(group):
                method(sibling_checkpoint(checkpoint, group))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # Private Trainer hook: each model's optimizer.pt / scheduler.pt in its own checkpoint folder.
        self._in_each_models_checkpoint(super()._save_optimizer_and_scheduler, output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        # Private Trainer hook, the counterpart of `_save_optimizer_and_scheduler`.
        if checkpoint is not None:
            self._in_each_models_checkpoint(super()._load_optimizer_and_scheduler, checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # Private Trainer hook: each model's weights from its own group's checkpoint (the engine then reloads renamed
        # keys, see `compat.reload_renamed_weights`).
        self._in_each_models_checkpoint(self._load_own_weights, resume_from_checkpoint)

    def _load_own_weights(self, checkpoint: str) -> None:
        if isinstance(self.model, AdapterStudent):
            self.model.load_adapter_weights(checkpoint)  # Trainer loads adapters of `PeftModel`s only
        else:
            super()._load_from_checkpoint(checkpoint)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        # Private Trainer hook: a student adapter of the shared base is saved in PEFT's format, as Trainer saves a
        # `PeftModel` (for other modules it writes the whole state dict), with what Trainer saves beside a model.
        if not isinstance(self.model, AdapterStudent):
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        self.model.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_best_model(self) -> None:
        # Private Trainer hook of `load_best_model_at_end`: the best step is chosen on model 0's metric.
        self._load_from_checkpoint(self.state.best_model_checkpoint)
