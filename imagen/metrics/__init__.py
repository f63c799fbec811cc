"""Evaluation metrics: codebook usage, retrieval, captions, the shapes judge, NER."""

from torchmetrics import MeanMetric


def loss_mean() -> MeanMetric:
    """A weighted mean of an evaluation loss that keeps a nan (a diverged batch) instead of dropping it, as
    torchmetrics' default does with a warning. (Its `nan_strategy="disable"` would drop the weights instead.)"""
    return MeanMetric(nan_strategy=float("nan"))
