"""The built-in data sets: scikit-learn's 8x8 handwritten digits (1797 images, 10 classes)."""
from __future__ import annotations

from typing import NamedTuple

import torch

from .common import DEMO_EXTRA, MissingDependency

__all__ = ["Data", "load_digits"]


class Data(NamedTuple):
    """A train/test split: float32 features ``[N, d]`` and int64 labels ``[N]``."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def n_classes(self) -> int:
        return int(self.y_train.max()) + 1


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> Data:
    """The digits, split stratified (``test_fraction`` held out, split by ``seed``), features
    standardised with the training split's mean and standard deviation."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise MissingDependency(f"the digits data set needs scikit-learn: {DEMO_EXTRA}") from e
    x, y = sk_load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed,
                                              stratify=y)
    mean, std = x_tr.mean(0), x_tr.std(0)
    std[std == 0] = 1.0

    def features(a):
        return torch.as_tensor((a - mean) / std, dtype=torch.float32)

    def labels(a):
        return torch.as_tensor(a, dtype=torch.long)

    return Data("sklearn digits", features(x_tr), labels(y_tr), features(x_te), labels(y_te))
