"""Training arguments for codistillation: the `TrainingArguments` of a `CodistillTrainer`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from .topology import GroupTopology, get_topology, init_groups, launched_world_size

DISTILLATION_LOSSES = ("kl", "ce", "mse")


@dataclass
class CodistillTrainingArguments(TrainingArguments):
    r"""
    [`TrainingArguments`] for [`CodistillTrainer`].

    With `codistill=True`, the W launched processes are split into `num_groups` groups of W / `num_groups`
    contiguous ranks. Each group trains its own model with ordinary data parallelism inside the group; across groups
    only a distillation term and, every `codistill_sync_every` steps, a copy of the peers' parameters are shared
    (Anil et al. 2018; Sodhani et al. 2021). Group `g` runs with seed `seed + g`, writes to `output_dir/group_<g>`
    and, with `push_to_hub`, pushes to `<hub_model_id>-group-<g>`.

    Parameters that control codistillation:
        codistill (`bool`, *optional*, defaults to `False`):
            Train `num_groups` codistilled models. With `False` the trainer behaves exactly as `Trainer`.
        num_groups (`int`, *optional*, defaults to `2`):
            Number of models (groups) G. The number of launched processes must be a multiple of it.
        codistill_alpha (`float`, *optional*, defaults to `1.0`):
            Weight of the distillation term. Zhang et al. (2018) and Sodhani et al. (2021) use 1.0; `0` trains
            independent models (the no-sharing control).
        codistill_loss (`str`, *optional*, defaults to `"kl"`):
            Distance between a model's predictions and its peers': `"kl"` (KL divergence to the peer's softened
            distribution, scaled by T²), `"ce"` (soft cross-entropy, same gradient as `"kl"`) or `"mse"` (mean
            squared error between logits, for regression-like heads).
        codistill_temperature (`float`, *optional*, defaults to `1.0`):
            Softmax temperature T of `"kl"` and `"ce"`. Higher values transfer more of the peers' "dark knowledge".
        codistill_sync_every (`int`, *optional*, defaults to `50`):
            k, the number of optimizer steps between two exchanges of peer parameters. Anil et al. exchanged every 50
            updates; Sodhani et al. found 0.5x-4x of 2500 updates equally good on ImageNet. 50 keeps the cross-group
            traffic at 1/50 of a model per step (about 1% of an all-reduce, which moves ~2 models per step) while
            keeping peers fresh in the short runs of fine-tuning. Raise it for long runs on slow links.
        codistill_burn_in_steps (`int`, *optional*, defaults to `0`):
            Steps with alpha = 0 at the start of training (Anil et al.: early distillation can hurt).
        codistill_alpha_warmup_steps (`int`, *optional*, defaults to `0`):
            Steps over which alpha ramps linearly from 0 to `codistill_alpha` after the burn-in.
        codistill_shared_init (`bool`, *optional*):
            Start every group from group 0's weights. Left unset, groups share the initialisation when the model was
            loaded with `from_pretrained` and start from different random weights (seed + group index) when it was
            built from a config or by `model_init`.
        codistill_log_param_distance (`bool`, *optional*, defaults to `True`):
            Log each model's L2 distance from its initial parameters (Sodhani et al.'s Fig. 1c diagnostic of
            over-regularization). Keeps one copy of the initial parameters in CPU memory.
    """

    codistill: bool = field(
        default=False,
        metadata={"help": "Train `num_groups` codistilled models instead of one all-reduce model."},
    )
    num_groups: int = field(
        default=2,
        metadata={"help": "Number of codistilled models (groups). The number of processes must be a multiple of it."},
    )
    codistill_alpha: float = field(default=1.0, metadata={"help": "Weight of the distillation term (>= 0)."})
    codistill_loss: str = field(
        default="kl",
        metadata={"help": "Distillation distance.", "choices": list(DISTILLATION_LOSSES)},
    )
    codistill_temperature: float = field(
        default=1.0, metadata={"help": "Softmax temperature of the `kl` and `ce` distillation losses (> 0)."}
    )
    codistill_sync_every: int = field(
        default=50,
        metadata={"help": "Optimizer steps between two exchanges of peer parameters (k >= 1)."},
    )
    codistill_burn_in_steps: int = field(
        default=0, metadata={"help": "Steps at the start of training with alpha = 0."}
    )
    codistill_alpha_warmup_steps: int = field(
        default=0, metadata={"help": "Steps over which alpha ramps linearly up after the burn-in."}
    )
    codistill_shared_init: bool | None = field(
        default=None,
        metadata={
            "help": "Start every group from group 0's weights. Unset: shared for pre-trained models, different "
            "random initialisations for models built from a config."
        },
    )
    codistill_log_param_distance: bool = field(
        default=True,
        metadata={"help": "Log each model's L2 distance from its initial parameters."},
    )

    def __post_init__(self):
        self._check_codistill_arguments()
        # The groups must exist before `TrainingArguments` sets up accelerate, which would otherwise join every
        # launched process into one data-parallel world.
        if self.codistill and launched_world_size() > 1:
            if not torch.cuda.is_available():
                # Without it accelerate treats a CPU-only launch as W unrelated processes and no group gets DDP.
                self.use_cpu = True
            if get_topology() is None:
                init_groups(self.num_groups, backend="gloo" if self.use_cpu else self.ddp_backend)
        super().__post_init__()

    def _check_codistill_arguments(self) -> None:
        if self.codistill_loss not in DISTILLATION_LOSSES:
            raise ValueError(
                f"`codistill_loss` must be one of {', '.join(DISTILLATION_LOSSES)}, got {self.codistill_loss!r}."
            )
        if self.codistill_alpha < 0:
            raise ValueError(f"`codistill_alpha` must be >= 0 (0 trains independent models), got {self.codistill_alpha}.")
        if self.codistill_temperature <= 0:
            raise ValueError(f"`codistill_temperature` must be > 0, got {self.codistill_temperature}.")
        if self.codistill_sync_every < 1:
            raise ValueError(
                f"`codistill_sync_every` must be >= 1 optimizer step, got {self.codistill_sync_every}."
            )
        for name in ("codistill_burn_in_steps", "codistill_alpha_warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
        if not self.codistill:
            return
        if self.num_groups < 2:
            raise ValueError(
                f"`num_groups` must be >= 2 with `codistill=True` (got {self.num_groups}); "
                "for a single model, drop `--codistill`."
            )
        world_size = launched_world_size()
        if world_size > 1 and world_size % self.num_groups != 0:
            raise ValueError(
                f"{world_size} launched processes cannot be split into `num_groups={self.num_groups}` equal groups: "
                f"launch a multiple of {self.num_groups} processes or pick a `num_groups` that divides {world_size}."
            )

    @property
    def topology(self) -> GroupTopology | None:
        """The groups this process belongs to, or `None` when not launched on several processes."""
        return get_topology() if self.codistill else None

    @property
    def group_index(self) -> int:
        topology = self.topology
        return topology.group_index if topology is not None else 0

    @property
    def group_seed(self) -> int:
        """The seed of this process's group: recipes seed model creation with it so groups start apart."""
        return self.seed + self.group_index
