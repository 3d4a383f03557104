"""Top-1 agreement between several models as an `evaluate` module shipped with hf_codistill (loads offline by path).

Prediction churn (Anil et al. 2018) is 1 - agreement.
"""

import datasets
import numpy as np

from hf_codistill.metrics import shipped
from hf_codistill.peer_metrics import top1_agreement


class Agreement(shipped.ShippedMetric):
    DESCRIPTION = "Agreement: the fraction of positions where two models' top-1 predictions match, per pair and mean."
    INPUTS = """
Args:
    predictions (`list[list[int]]`): one row per evaluated position, holding the top-1 class id of every model
        (e.g. `np.stack([preds_model_0, preds_model_1], axis=1)`).
    labels (`list[int]`, *optional*): one label per row; rows labelled -100 (padding, unmasked tokens) do not count.
        A keyword of `compute` (evaluate would drop one named `references` when it is not a feature).
Returns:
    agreement_<i>_<j> (`float`) for every pair i < j, and agreement_mean (`float`).
"""
    FEATURES = {"predictions": datasets.Sequence(datasets.Value("int64"))}

    def _compute(self, predictions, labels=None):
        per_model = np.asarray(predictions, dtype=np.int64).T
        return top1_agreement(list(per_model), shipped.counted(labels))
