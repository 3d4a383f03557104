"""Real data sets that install offline, shaped like their Hub counterparts (`image` and `label` columns).

Nothing here downloads: each loader reads files that a package put on disk, so recipes, tests and benchmarks run on
machines without Hub access.
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                        "Ankle boot"]


def _image_dataset(images: np.ndarray, labels: np.ndarray, names: list[str]) -> Dataset:
    features = Features({"image": Image(), "label": ClassLabel(names=names)})
    return Dataset.from_dict(
        {"image": list(images), "label": labels.tolist()},
        features=features,
    )


def load_digits_dataset(test_size: int = 297) -> DatasetDict:
    """scikit-learn's bundled 1,797 handwritten digits (8x8 grayscale), as `image`/`label` with a held-out split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    full = _image_dataset(images, digits.target, [str(d) for d in range(10)])
    return DatasetDict({"train": full.select(range(len(full) - test_size)),
                        "validation": full.select(range(len(full) - test_size, len(full)))})


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        _, dtype, ndim = struct.unpack(">HBB", f.read(4))
        shape = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(shape)


def fashion_mnist_available(directory: str = FASHION_MNIST_DIR) -> bool:
    return os.path.isfile(os.path.join(directory, "train-images-idx3-ubyte.gz"))


def load_fashion_mnist(directory: str = FASHION_MNIST_DIR) -> DatasetDict:
    """Fashion-MNIST (70k 28x28 grayscale) from Debian's `dataset-fashion-mnist` package (IDX files)."""
    if not fashion_mnist_available(directory):
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {directory}: install Debian's `dataset-fashion-mnist` package "
            "(`apt-get install dataset-fashion-mnist`) or use `--dataset_name digits`."
        )
    splits = {}
    for split, prefix in (("train", "train"), ("validation", "t10k")):
        images = _read_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"))
        labels = _read_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"))
        splits[split] = _image_dataset(images, labels, FASHION_MNIST_LABELS)
    return DatasetDict(splits)


BUILTIN_IMAGE_DATASETS = {"digits": load_digits_dataset, "fashion_mnist": load_fashion_mnist}
