"""Training arguments for codistillation: the `TrainingArguments` of a `CodistillTrainer`."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field, fields
from datetime import timedelta

import torch
from transformers import TrainingArguments
from transformers.utils import logging

from .checkpointing import group_dir
from .docstrings import help_from_docstring, parse_parameters
from .regularization import WEIGHT_DECAY_SCHEDULES, parse_milestones
from .sharding import check_sharding_arguments
from .topology import GroupTopology, get_topology, init_groups, launched_world_size

logger = logging.get_logger(__name__)

DISTILLATION_LOSSES = ("kl", "ce", "mse")
PEER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8}
# The docstring sections of `CodistillTrainingArguments` whose options act only on codistilled groups, and those whose
# options also serve the all-reduce baseline. `CODISTILL_ONLY_OPTIONS` is derived from them below the class.
_PEER_STORE_SECTION = "Parameters that let groups be launched apart"
_CODISTILL_ONLY_SECTIONS = ("Parameters that control codistillation", "Parameters that control the peer exchange",
                            _PEER_STORE_SECTION)
_BASELINE_SECTIONS = ("Parameters that account for codistillation's regularisation",)


def launched_without_devices(codistill: bool) -> bool:
    """Whether a launcher started this process among others on a machine without a device that accelerate can run
    data parallelism on, so that `use_cpu` is needed for one gloo world. A `WORLD_SIZE` left in the environment
    without the launcher's `LOCAL_RANK` is not a launch (codistillation then says how to launch)."""
    launched = launched_world_size() > 1 and (codistill or "LOCAL_RANK" in os.environ)
    return launched and not _has_multi_process_device()


def _has_multi_process_device() -> bool:
    """Whether accelerate can run data parallelism over devices here (not MPS, which takes one process)."""
    from accelerate import utils

    checks = ("is_xpu_available", "is_npu_available", "is_mlu_available", "is_musa_available", "is_hpu_available",
              "is_sdaa_available", "is_neuron_available", "is_torch_xla_available")
    return torch.cuda.is_available() or any(getattr(utils, check, lambda: False)() for check in checks)


@help_from_docstring
@dataclass
class CodistillTrainingArguments(TrainingArguments):
    r"""
    [`TrainingArguments`] for [`CodistillTrainer`].

    With `codistill=True`, the W launched processes are split into `num_groups` groups of W / `num_groups`
    contiguous ranks. Each group trains its own model with ordinary data parallelism inside the group; across groups
    only a distillation term and, every `codistill_sync_every` steps, a copy of the peers' parameters are shared
    (Anil et al. 2018; Sodhani et al. 2021). Group `g` runs with seed `seed + g`, writes to `output_dir/group_<g>`
    and, with `push_to_hub`, pushes to `<hub_model_id>-group-<g>`.

    Each entry below is also the option's `--help` text. The options under "Parameters that control codistillation"
    (other than `codistill` itself) and "Parameters that control the peer exchange" act only with `codistill=True`.

    Parameters that control codistillation:
        codistill (`bool`, *optional*, defaults to `False`):
            Train `num_groups` codistilled models. With `False` the trainer behaves exactly as `Trainer` (one
            all-reduce model).
        num_groups (`int`, *optional*, defaults to `2`):
            Number of models (groups) G. The number of launched processes must be a multiple of it.
        codistill_alpha (`float`, *optional*, defaults to `1.0`):
            Weight of the distillation term (>= 0). Zhang et al. (2018) and Sodhani et al. (2021) use 1.0; `0` trains
            independent models (the no-sharing control).
        codistill_loss (`str`, *optional*, defaults to `"kl"`):
            Distance between a model's predictions and its peers': `"kl"` (KL divergence to the peer's softened
            distribution, scaled by T²), `"ce"` (soft cross-entropy, same gradient as `"kl"`) or `"mse"` (mean
            squared error between logits, for regression-like heads).
        codistill_temperature (`float`, *optional*, defaults to `1.0`):
            Softmax temperature T (> 0) of `"kl"` and `"ce"`. Higher values transfer more of the peers' "dark
            knowledge".
        codistill_sync_every (`int`, *optional*, defaults to `50`):
            Optimizer steps between two exchanges of peer parameters, k (>= 1). Anil et al. exchanged every 50
            updates; Sodhani et al. found 0.5x-4x of 2500 updates equally good on ImageNet. 50 keeps the cross-group
            traffic at 1/50 of a model per step (about 1% of an all-reduce, which moves ~2 models per step) while
            keeping peers fresh in the short runs of fine-tuning. Raise it for long runs on slow links.
        codistill_burn_in_steps (`int`, *optional*, defaults to `0`):
            Steps with alpha = 0 at the start of training (Anil et al.: early distillation can hurt).
        codistill_alpha_warmup_steps (`int`, *optional*, defaults to `0`):
            Steps over which alpha ramps linearly from 0 to `codistill_alpha` after the burn-in.
        codistill_shared_init (`bool`, *optional*):
            Start every group from group 0's weights. Unset: groups share the initialisation when the model was
            loaded with `from_pretrained`, and start from different random weights (seed + group index) when it was
            built from a config or by `model_init`. "Loaded" is read from the model's `name_or_path`, which a model
            built with `from_config` inherits from a config loaded with `AutoConfig.from_pretrained`: set the option
            explicitly there (the recipes clear that path for models trained from scratch). On the command line it
            takes a value: `--codistill_shared_init true` or `false`.
        codistill_shared_batch (`bool`, *optional*, defaults to `False`):
            With a list of models in one process: every model trains on the same batch each step (as in Deep Mutual
            Learning) instead of its own shuffling order (seed + model index), which is what launched groups see.
        codistill_peer_metrics (`bool`, *optional*, defaults to `True`):
            At every evaluation, also score the ensemble of all G current models (mean of their probabilities) with
            `compute_metrics`, its loss, and the models' top-1 agreement (`eval_ensemble_*`, `eval_agreement_*`;
            Anil et al.'s churn is 1 - agreement). Costs one parameter exchange into temporary copies and G-1 peer
            forwards per evaluation batch; the stale peers used in training are not touched.

    Parameters that account for codistillation's regularisation (they apply with or without `codistill`, so that an
    all-reduce baseline can use the same schedule and diagnostic):
        codistill_log_param_distance (`bool`, *optional*):
            Log each model's L2 distance from its initial parameters as `param_distance_from_init` (Sodhani et al.'s
            Fig. 1c diagnostic of over-regularization). Keeps one copy of the initial parameters in CPU memory and in
            each checkpoint. Unset: on with `codistill`, off without; set it to compare an all-reduce run. On the
            command line it takes a value: `--codistill_log_param_distance true`.
        codistill_weight_decay_schedule (`str`, *optional*, defaults to `"constant"`):
            `"constant"`, `"step"` (weight decay / 10 at the first milestone, 0 at the second: Sodhani et al.'s fix,
            ResNet-50 1e-4 -> 1e-5 -> 0, which closed a ~2% top-1 gap to all-reduce) or `"follow_lr"` (weight decay
            scaled by lr_t / peak lr after the warm-up, for linear and cosine schedules). Logged as `weight_decay`.
        codistill_weight_decay_milestones (`str`, *optional*, defaults to `"0.5,0.75"`):
            The two `"step"` milestones as fractions of the training steps. Sodhani et al. tie them to the LR decays
            (moved a little later); with a linear or cosine LR, pick where the LR has fallen most.

    Parameters that control the peer exchange:
        codistill_sharded_exchange (`bool`, *optional*, defaults to `True`):
            With groups of n > 1 ranks, rank r fetches only shard r (1/n) of each peer model from the other groups
            and the group all-gathers the shards over its own, usually faster, links: (G-1) x P bytes cross group
            boundaries per group and exchange instead of n x (G-1) x P. The peers are identical either way; `False`
            fetches whole models on every rank (no intra-group traffic).
        codistill_overlap_exchange (`bool`, *optional*, defaults to `False`):
            Run the cross-group part of each exchange in the background while the next step trains, and apply it at
            that step's end: the peers then lag one step more (exchanged at step s, used from step s+2). Worth it
            when links between groups are slow.
        codistill_peer_dtype (`str`, *optional*):
            Precision of the stale peer copies and of the exchange that refreshes them: `"bfloat16"` or `"float16"`
            halve both the peers' memory and the bytes crossing group boundaries (`benchmarks/README.md` measures
            the effect on accuracy). `"int8"` holds and sends each peer's weight matrices as int8 with a scale per
            row, a quarter of float32, dequantised one layer at a time in the peer's forward (whole models exchanged
            by the collective exchange; not with adapters, FSDP2 or a peer store). Unset: the model's own precision.
            Floating-point inputs (pixel values) are cast to a floating peer precision for the peers' forward; the
            models themselves train, save and evaluate in full precision.
        codistill_position_fraction (`float`, *optional*, defaults to `1.0`):
            Language models: score the distillation term at ceil(fraction x positions) positions of the batch, drawn
            at random every step, labelled ones first (unlabelled ones among them do not count); the peers' output
            head runs only there (with `codistill_shared_batch` the peers run whole and only the loss is sampled). A
            count fixed by the batch's shape needs no host sync. Causal LMs label every position, so their term costs
            a full-vocabulary softmax per token and the peer's head about a third of its forward (GPT-2); 0.25 cuts
            both by 4x, with an unbiased but noisier estimate of the term. Masked LMs already score only their masked
            tokens; a fraction a little above the masking rate (0.2 for 15%) scores nearly all of them without the
            host sync that gathering them costs on a GPU. 1.0: every position of a causal LM, every masked token of a
            masked LM. Any model with a label per token (token classification too) is sampled; classifiers with one
            label per example ignore it.
        codistill_num_peers (`int`, *optional*):
            m, how many peers each group distils from: the next m groups on a ring (g+1 ... g+m mod G). A group then
            holds and fetches only those m models, so peer memory and exchange bytes scale with m instead of G - 1
            (many groups). Evaluation still scores the ensemble and agreement of all G models. Unset: all G - 1.

    Parameters that let groups be launched apart (each its own launch; they meet only through a peer store):
        codistill_peer_store (`str`, *optional*):
            A directory on a shared file system, or an fsspec URL (`s3://...`, `gs://...`, `hf://...`), where each
            group publishes its model every `codistill_sync_every` steps and reads its peers' newest versions
            (`hf_codistill.peer_store`). Each launch is then one group: its processes are the group's ranks, and it
            never waits for the others, so a group may fail, restart, lag or run elsewhere. Peers are as stale as
            the store makes them. Unset: one launch holds every group and peers are exchanged collectively.
        codistill_group_index (`int`, *optional*):
            Which group this launch is (0 ... num_groups - 1), with `codistill_peer_store`. Unset: the Slurm array
            task (`SLURM_ARRAY_TASK_ID` - `SLURM_ARRAY_TASK_MIN`), so that a job array runs one group per task.
        codistill_peer_max_age_steps (`int`, *optional*):
            With a peer store: a peer whose newest version is more than this many steps behind this group leaves the
            distillation term (and the evaluation's ensemble) until it publishes a newer one. Unset: no step bound.
        codistill_peer_max_age_seconds (`float`, *optional*):
            With a peer store: the same bound in seconds since the peer published its newest version; the bound to
            set when groups run at different speeds or may die. Unset: no time bound.
        codistill_peer_wait_seconds (`float`, *optional*, defaults to `300.0`):
            With a peer store and a shared initialisation: how long groups other than 0 wait for group 0's initial
            weights before failing. Nothing else ever waits for a peer.
        codistill_peer_store_keep (`int`, *optional*, defaults to `2`):
            With a peer store: how many of its newest versions each group keeps there (older ones are deleted).
    """

    # Each field's `help` is its entry in the docstring above (`help_from_docstring`).
    codistill: bool = False
    num_groups: int = 2
    codistill_alpha: float = 1.0
    codistill_loss: str = field(default="kl", metadata={"choices": list(DISTILLATION_LOSSES)})
    codistill_temperature: float = 1.0
    codistill_sync_every: int = 50
    codistill_burn_in_steps: int = 0
    codistill_alpha_warmup_steps: int = 0
    codistill_shared_init: bool | None = None
    codistill_shared_batch: bool = False
    codistill_peer_metrics: bool = True
    codistill_log_param_distance: bool | None = None
    codistill_weight_decay_schedule: str = field(
        default="constant", metadata={"choices": list(WEIGHT_DECAY_SCHEDULES)}
    )
    codistill_weight_decay_milestones: str = "0.5,0.75"
    codistill_sharded_exchange: bool = True
    codistill_overlap_exchange: bool = False
    codistill_peer_dtype: str | None = field(default=None, metadata={"choices": list(PEER_DTYPES)})
    codistill_position_fraction: float = 1.0
    codistill_num_peers: int | None = None
    codistill_peer_store: str | None = None
    codistill_group_index: int | None = None
    codistill_peer_max_age_steps: int | None = None
    codistill_peer_max_age_seconds: float | None = None
    codistill_peer_wait_seconds: float = 300.0
    codistill_peer_store_keep: int = 2

    def __post_init__(self):
        self._check_codistill_arguments()
        self._warn_about_options_without_effect()
        if launched_without_devices(self.codistill):
            # Without it accelerate treats a CPU-only launch as W unrelated processes: no group gets DDP, and
            # without `codistill` the all-reduce baseline becomes W separate runs writing to one `output_dir`.
            self.use_cpu = True
        # The groups must exist before `TrainingArguments` sets up accelerate, which would otherwise join every
        # launched process into one data-parallel world.
        if self.codistill and not self.codistill_peer_store and launched_world_size() > 1 and get_topology() is None:
            init_groups(self.num_groups, backend="gloo" if self.use_cpu else self.ddp_backend,
                        timeout=timedelta(seconds=self.ddp_timeout))
        super().__post_init__()

    def _warn_about_options_without_effect(self) -> None:
        if not self.codistill:
            defaults = {f.name: f.default for f in fields(self) if f.name in CODISTILL_ONLY_OPTIONS}
            defaults_too = {"num_groups": 1}  # one group: what a run without codistillation is
            ignored = [name for name in CODISTILL_ONLY_OPTIONS
                       if getattr(self, name) not in (defaults[name], defaults_too.get(name, defaults[name]))]
            if ignored:
                logger.warning(
                    f"{', '.join(f'`{name}`' for name in ignored)} only act on codistilled models and are ignored "
                    "without `codistill=True` (`--codistill`): this trains one all-reduce model."
                )
        store_only = _PEER_STORE_SECTION_OPTIONS[1:]  # the store itself turns the others on
        defaults = {f.name: f.default for f in fields(self) if f.name in store_only}
        ignored = [name for name in store_only if getattr(self, name) != defaults[name]]
        if self.codistill and not self.codistill_peer_store and ignored:
            logger.warning(
                f"{', '.join(f'`{name}`' for name in ignored)} only act on groups launched apart, which "
                "`codistill_peer_store` (`--codistill_peer_store DIR`) sets up; they are ignored without it."
            )
        scheduler = getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type)
        if self.codistill_weight_decay_schedule == "follow_lr" and scheduler in ("constant", "constant_with_warmup"):
            logger.warning(
                f"`codistill_weight_decay_schedule='follow_lr'` scales weight decay like the learning rate, which "
                f"`lr_scheduler_type={scheduler!r}` keeps constant: pick a decaying schedule (linear, cosine) or "
                "`codistill_weight_decay_schedule='step'`."
            )
        if self.codistill_weight_decay_schedule != "constant" and self.weight_decay == 0:
            logger.warning(
                f"`codistill_weight_decay_schedule={self.codistill_weight_decay_schedule!r}` scales weight decay, but "
                "`weight_decay` is 0 (Trainer's default): set `--weight_decay` to the starting value for it to act."
            )

    def _check_codistill_arguments(self) -> None:
        if self.codistill_loss not in DISTILLATION_LOSSES:
            raise ValueError(
                f"`codistill_loss` must be one of {', '.join(DISTILLATION_LOSSES)}, got {self.codistill_loss!r}."
            )
        if not self.codistill_alpha >= 0:  # NaN too
            raise ValueError(
                f"`codistill_alpha` must be >= 0 (0 trains independent models), got {self.codistill_alpha}."
            )
        if not self.codistill_temperature > 0:
            raise ValueError(f"`codistill_temperature` must be > 0, got {self.codistill_temperature}.")
        if self.codistill_sync_every < 1:
            raise ValueError(
                f"`codistill_sync_every` must be >= 1 optimizer step, got {self.codistill_sync_every}."
            )
        if self.codistill_weight_decay_schedule not in WEIGHT_DECAY_SCHEDULES:
            raise ValueError(
                f"`codistill_weight_decay_schedule` must be one of {', '.join(WEIGHT_DECAY_SCHEDULES)}, got "
                f"{self.codistill_weight_decay_schedule!r}."
            )
        parse_milestones(self.codistill_weight_decay_milestones)
        if self.codistill_peer_dtype is not None and self.codistill_peer_dtype not in PEER_DTYPES:
            raise ValueError(
                f"`codistill_peer_dtype` must be one of {', '.join(PEER_DTYPES)} (or unset for the model's own "
                f"precision), got {self.codistill_peer_dtype!r}."
            )
        if self.codistill_peer_dtype == "int8" and self.codistill_peer_store:
            raise ValueError(
                "`codistill_peer_dtype='int8'` quantises peers that the collective exchange refreshes; with "
                "`codistill_peer_store` use `bfloat16` (halves the store's bytes) or leave it unset."
            )
        if not 0 < self.codistill_position_fraction <= 1:
            raise ValueError(
                f"`codistill_position_fraction` must be in (0, 1] (1 scores every position), got "
                f"{self.codistill_position_fraction}."
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
        check_sharding_arguments(self, launched_world_size())
        if self.codistill_num_peers is not None and not 1 <= self.codistill_num_peers < self.num_groups:
            raise ValueError(
                f"`codistill_num_peers` must be between 1 and num_groups - 1 = {self.num_groups - 1} (each group "
                f"distils from the next m other groups), got {self.codistill_num_peers}; leave it unset for all."
            )
        if self.codistill_peer_store:
            self._check_peer_store_arguments()
            return
        world_size = launched_world_size()
        if world_size > 1 and world_size % self.num_groups != 0:
            raise ValueError(
                f"{world_size} launched processes cannot be split into `num_groups={self.num_groups}` equal groups: "
                f"launch a multiple of {self.num_groups} processes or pick a `num_groups` that divides {world_size}."
            )

    def _check_peer_store_arguments(self) -> None:
        if self.codistill_group_index is None:
            task = os.environ.get("SLURM_ARRAY_TASK_ID")
            if task is None:
                raise ValueError(
                    "`codistill_peer_store` makes each launch one group: say which with `--codistill_group_index g` "
                    f"(0 ... {self.num_groups - 1}), or launch it as a Slurm job array (one group per array task)."
                )
            self.codistill_group_index = int(task) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
        if not 0 <= self.codistill_group_index < self.num_groups:
            raise ValueError(
                f"`codistill_group_index` must be between 0 and num_groups - 1 = {self.num_groups - 1}, got "
                f"{self.codistill_group_index}."
            )
        for name in ("codistill_peer_max_age_steps", "codistill_peer_max_age_seconds"):
            if getattr(self, name) is not None and not getattr(self, name) >= 0:
                raise ValueError(f"`{name}` must be >= 0 (or unset for no bound), got {getattr(self, name)}.")
        if self.codistill_peer_store_keep < 1:
            raise ValueError(f"`codistill_peer_store_keep` must be >= 1, got {self.codistill_peer_store_keep}.")
        if self.codistill_overlap_exchange:
            raise ValueError(
                "`codistill_overlap_exchange` overlaps a collective exchange; with `codistill_peer_store`, groups "
                "never wait for each other anyway. Drop one of the two."
            )

    @property
    def topology(self) -> GroupTopology | None:
        """The groups this process belongs to, or `None` when not launched on several processes."""
        return get_topology() if self.codistill else None

    def for_group(self, group: int, reports: bool = True) -> CodistillTrainingArguments:
        """The arguments as group `group`'s `Trainer` sees them: its own seed, output folder and Hub repository
        (`reports=False`: no `report_to` integrations, for the groups world rank 0 reports for)."""
        view = copy.copy(self)
        view.seed = self.seed + group
        if self.data_seed is not None:
            view.data_seed = self.data_seed + group
        view.output_dir = group_dir(self.output_dir, group)
        # Rotation waits until every group has written the newer checkpoint (`CodistillEngine.save_checkpoint`).
        view.save_total_limit = None
        if self.push_to_hub:
            base = self.hub_model_id or os.path.basename(os.path.abspath(self.output_dir))
            view.hub_model_id = f"{base}-group-{group}"
        if not reports:
            view.report_to = []
        return view

    @property
    def should_save(self) -> bool:
        """Trainer's rule, per group: with `save_on_each_node`, the group's first process on each node saves.

        `LOCAL_RANK` counts the processes of every group on a node, so Trainer's `local_process_index == 0` would
        leave a group that does not start a node without any process that saves.
        """
        topology = self.topology
        if topology is None or not self.save_on_each_node:
            return super().should_save
        node_start = topology.world_rank - int(os.environ.get("LOCAL_RANK", 0))
        group_start = topology.group_index * topology.group_size
        return topology.world_rank == max(node_start, group_start)

    @property
    def peer_torch_dtype(self) -> torch.dtype | None:
        """`codistill_peer_dtype` as a `torch.dtype`; None keeps the model's precision."""
        return PEER_DTYPES[self.codistill_peer_dtype] if self.codistill_peer_dtype is not None else None

    @property
    def logs_param_distance(self) -> bool:
        if self.codistill_log_param_distance is None:
            return self.codistill
        return self.codistill_log_param_distance

    @property
    def group_index(self) -> int:
        if self.codistill and self.codistill_peer_store:
            return self.codistill_group_index
        topology = self.topology
        return topology.group_index if topology is not None else 0

    @property
    def group_seed(self) -> int:
        """The seed of this process's group: recipes seed model creation with it so groups start apart."""
        return self.seed + self.group_index


def _codistill_only_options() -> tuple[str, ...]:
    """The options that act only with `codistill=True`, in field order: those documented in a codistill-only section
    of the docstring, less the switch `codistill` itself."""
    documented = parse_parameters(CodistillTrainingArguments.__doc__)
    unknown = {entry.section for entry in documented.values()} - {*_CODISTILL_ONLY_SECTIONS, *_BASELINE_SECTIONS}
    if unknown:
        raise ValueError(f"Say whether the options of docstring sections {sorted(unknown)} act only with `codistill`.")
    return tuple(f.name for f in fields(CodistillTrainingArguments) if f.name != "codistill"
                 and f.name in documented and documented[f.name].section in _CODISTILL_ONLY_SECTIONS)


# Options that only act on codistilled groups: `__post_init__` warns when one is set without `codistill`.
CODISTILL_ONLY_OPTIONS = _codistill_only_options()
# The options of groups launched apart, in field order (`codistill_peer_store` first).
_PEER_STORE_SECTION_OPTIONS = tuple(
    name for name, entry in parse_parameters(CodistillTrainingArguments.__doc__).items()
    if entry.section == _PEER_STORE_SECTION
)
