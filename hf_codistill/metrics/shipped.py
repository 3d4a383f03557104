"""What the `evaluate` metric modules shipped with hf_codistill share.

Each module, `<name>/<name>.py` (loaded by path: `evaluate.load(metric_path(name))`), subclasses `ShippedMetric` with
its description, inputs and features, and computes. `evaluate.load` copies that one file into its cache, so the
modules import this one from the installed package, absolutely and as a module (`from hf_codistill.metrics import
shipped`): `evaluate` takes the first `evaluate.Metric` subclass in the module file's namespace as its metric, which
must be the module's own class, not this base.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

IGNORE_INDEX = -100  # the label of positions that do not count (padding, unmasked tokens), as in transformers


class ShippedMetric(evaluate.Metric):
    """An offline `evaluate` metric. Subclasses set `DESCRIPTION` (what it measures), `INPUTS` (the arguments of
    `compute` and what it returns, as a docstring section), `FEATURES` (the features of its inputs) and `_compute`."""

    DESCRIPTION: str = ""
    INPUTS: str = ""
    FEATURES: dict = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # What `@evaluate.utils.file_utils.add_start_docstrings(DESCRIPTION, INPUTS)` writes.
        cls.__doc__ = cls.DESCRIPTION + cls.INPUTS + (cls.__doc__ or "")

    def _info(self):
        return evaluate.MetricInfo(description=self.DESCRIPTION, citation="", inputs_description=self.INPUTS,
                                   features=datasets.Features(self.FEATURES))


def counted(labels) -> np.ndarray | None:
    """Which positions count: labels other than `IGNORE_INDEX`; None without labels (all count)."""
    return None if labels is None else np.asarray(labels) != IGNORE_INDEX
