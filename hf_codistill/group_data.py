"""What each group reads when its training set is a stream.

A data set is reshuffled per group (seed + group index), but a stream has no order to reshuffle: left alone, every
group would read the same examples in the same order. Each group reads its own 1/G of a `datasets.IterableDataset`
instead, as G x n data-parallel workers would.
"""

from __future__ import annotations

import datasets
import torch
from datasets.distributed import split_dataset_by_node
from transformers.utils import logging

logger = logging.get_logger(__name__)


def group_stream(dataset, group: int, num_groups: int):
    """Group `group`'s part of a `datasets.IterableDataset`; any other data set as it is (a torch `IterableDataset`
    with a warning: it cannot be split here)."""
    if isinstance(dataset, datasets.IterableDataset):
        return split_dataset_by_node(dataset, rank=group, world_size=num_groups)
    if isinstance(dataset, torch.utils.data.IterableDataset):
        logger.warning(
            "The training set is a torch `IterableDataset`: every group will read the same stream. Give each group "
            "its own part (e.g. by `trainer.group_index`), or pass a `datasets.IterableDataset`, which "
            "CodistillTrainer splits between groups."
        )
    return dataset
