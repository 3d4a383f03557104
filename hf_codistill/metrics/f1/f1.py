"""F1 as an `evaluate` module shipped with hf_codistill, so it loads offline by path; numpy only.

Same arguments, defaults and values as the Hub's `f1` (scikit-learn's `f1_score`): with `average="macro"` the
unweighted mean of the per-class F1 scores over the classes that occur in the references or the predictions.
"""

import datasets
import numpy as np

from hf_codistill.metrics import shipped

AVERAGES = ("binary", "micro", "macro", "weighted", None)


class F1(shipped.ShippedMetric):
    DESCRIPTION = ("F1: the harmonic mean of precision and recall, 2·TP / (2·TP + FP + FN), per class; averaged over "
                   "the classes as `average` says.")
    INPUTS = """
Args:
    predictions (`list[int]`): predicted labels.
    references (`list[int]`): ground-truth labels.
    labels (`list[int]`, *optional*): the classes to score (and their order with `average=None`); by default every
        class found in the references or the predictions, sorted.
    pos_label (`int`, defaults to 1): the class scored with `average="binary"`.
    average (`str` or `None`, defaults to `"binary"`): `"binary"` (the F1 of `pos_label`; two classes at most),
        `"micro"` (from the counts summed over the classes), `"macro"` (the mean of the classes' F1), `"weighted"`
        (their mean weighted by each class's number of references), or `None` (every class's F1).
    sample_weight (`list[float]`, *optional*): per-example weights.
Returns:
    f1 (`float`, or an array of one per class with `average=None`). A class with no reference and no prediction
    scores 0, as in scikit-learn.
"""
    FEATURES = {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}

    def _compute(self, predictions, references, labels=None, pos_label=1, average="binary", sample_weight=None):
        if average not in AVERAGES:
            raise ValueError(f"`average` is {average!r}; give one of {', '.join(map(repr, AVERAGES))}.")
        return {"f1": f1_score(predictions, references, labels, pos_label, average, sample_weight)}


def f1_score(predictions, references, labels=None, pos_label=1, average="binary", sample_weight=None):
    predictions, references = np.asarray(predictions), np.asarray(references)
    weights = np.ones(len(references)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    present = np.union1d(predictions, references)
    if average == "binary":
        if len(present) > 2:
            raise ValueError(f"`average='binary'` scores two classes, but the data has {len(present)}: pass "
                             "`average='macro'` (or 'micro', 'weighted', None) for several classes.")
        labels = [pos_label]
    elif labels is None:
        labels = present
    labels = np.asarray(labels)
    true_positive = np.array([weights[(predictions == c) & (references == c)].sum() for c in labels])
    predicted = np.array([weights[predictions == c].sum() for c in labels])
    support = np.array([weights[references == c].sum() for c in labels])
    if average == "micro":
        return _ratio(2 * true_positive.sum(), predicted.sum() + support.sum())
    per_class = np.array([_ratio(2 * tp, p + s) for tp, p, s in zip(true_positive, predicted, support)])
    if average is None:
        return per_class
    if average == "weighted":
        return _ratio(float((per_class * support).sum()), support.sum())
    return float(per_class.mean()) if len(per_class) else 0.0  # "macro", and "binary" (one class)


def _ratio(numerator, denominator) -> float:
    return float(numerator / denominator) if denominator > 0 else 0.0
