"""Accuracy as an `evaluate` module shipped with hf_codistill, so it loads offline by path."""

import datasets
import numpy as np

from hf_codistill.metrics import shipped


class Accuracy(shipped.ShippedMetric):
    DESCRIPTION = "Accuracy: the fraction of predictions equal to their reference label."
    INPUTS = """
Args:
    predictions (`list[int]`): predicted labels.
    references (`list[int]`): ground-truth labels.
    normalize (`bool`, defaults to `True`): return a fraction; `False` returns the number of correct predictions.
    sample_weight (`list[float]`, *optional*): per-example weights.
Returns:
    accuracy (`float`)
"""
    FEATURES = {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        correct = (np.asarray(predictions) == np.asarray(references)).astype(np.float64)
        if sample_weight is not None:
            correct = correct * np.asarray(sample_weight, dtype=np.float64)
            total = float(np.sum(sample_weight))
        else:
            total = float(len(correct))
        value = float(correct.sum())
        return {"accuracy": value / total if normalize else value}
