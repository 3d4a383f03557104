"""Accuracy of the mean-probability ensemble of several models, as an `evaluate` module shipped with hf_codistill."""

import datasets
import numpy as np
import torch

from hf_codistill.metrics import shipped
from hf_codistill.peer_metrics import ensemble_logits


class EnsembleAccuracy(shipped.ShippedMetric):
    DESCRIPTION = "Ensemble accuracy: the accuracy of the argmax of the models' mean softmax probabilities."
    INPUTS = """
Args:
    predictions (`list[list[list[float]]]`): one entry per example holding every model's logits, shape
        (num_models, num_classes) (e.g. `np.stack([logits_model_0, logits_model_1], axis=1)`).
    references (`list[int]`): labels; -100 does not count.
Returns:
    ensemble_accuracy (`float`)
"""
    FEATURES = {
        "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
        "references": datasets.Value("int64"),
    }

    def _compute(self, predictions, references):
        per_model = torch.as_tensor(np.asarray(predictions, dtype=np.float32)).transpose(0, 1)
        ensemble = ensemble_logits(list(per_model)).argmax(-1).numpy()
        references = np.asarray(references)
        return {"ensemble_accuracy": float((ensemble == references)[shipped.counted(references)].mean())}
