"""Data: what every option loads into (dataset: `Dataset`, `DataError`), the options themselves
(datasets: a synthetic teacher, scikit-learn's digits, a user's file; per-run minibatch order)
and the corpora read from disk (corpora: CIFAR-10, text)."""

from symrun.data.dataset import DataError, Dataset
from symrun.data.datasets import BatchOrder, digest, for_task, load, source_file

__all__ = ["BatchOrder", "DataError", "Dataset", "digest", "for_task", "load", "source_file"]
