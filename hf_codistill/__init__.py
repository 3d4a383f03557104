"""hf_codistill: codistillation (Anil et al. 2018; Sodhani et al. 2021) for the Hugging Face `Trainer`."""

from .checkpointing import get_last_checkpoint
from .config import CodistillTrainingArguments
from .losses import distillation_loss
from .metrics import metric_path
from .one_process import OneProcessCodistillTrainer  # registers itself as the trainer of a list of models
from .peer_metrics import ensemble_logits, peer_compute_metrics, top1_agreement
from .topology import GroupTopology, get_topology, init_groups
from .trainer import CodistillTrainer

__all__ = [
    "CodistillTrainer",
    "CodistillTrainingArguments",
    "GroupTopology",
    "OneProcessCodistillTrainer",
    "distillation_loss",
    "ensemble_logits",
    "get_last_checkpoint",
    "get_topology",
    "init_groups",
    "metric_path",
    "peer_compute_metrics",
    "top1_agreement",
]
__version__ = "0.1.0"
