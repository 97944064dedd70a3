"""What every data option loads into: a `Dataset` of arrays, and the one-line `DataError`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


class DataError(ValueError):
    """Data that cannot be used as given; the message is one clear line."""


@dataclass
class Dataset:
    """Arrays as float64 numpy (targets int64 for classification); moved to torch by the engine."""

    x: np.ndarray                      # (n, d); float32 for cifar10 images, token ids for text
    y: np.ndarray                      # (n, o) float for regression, (n,) int for classification,
                                       # (n, T) int for text (the next character at every position)
    task: str                          # "regression" | "classification"
    x_test: Optional[np.ndarray] = None
    y_test: Optional[np.ndarray] = None
    n_classes: Optional[int] = None

    @property
    def in_dim(self) -> int:
        return self.x.shape[1]

    @property
    def out_dim(self) -> int:
        return self.n_classes if self.task == "classification" else self.y.shape[1]
