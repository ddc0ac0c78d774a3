"""Datasets for the training CLI, loaded whole into memory, never downloaded.

* ``digits``: the 8x8 handwritten digits shipped inside scikit-learn (1797 images; a fixed
  80/20 split), upsampled to the model's input size. No files needed.
* ``fashion-mnist`` / ``mnist``: IDX files (``train-images-idx3-ubyte[.gz]`` ...) in
  ``data_dir``; Fashion-MNIST defaults to where Debian's ``dataset-fashion-mnist`` installs them.
* ``cifar10`` / ``cifar100``: the python-pickle batches (``cifar-10-batches-py/data_batch_1`` ...,
  ``cifar-100-python/train``) in ``data_dir``.
* ``synthetic``: class-dependent random patterns for smoke tests.

Images are kept at pixel scale (uint8, or float32 in [0, 255]) as ``[N, C, H, W]``;
``to_model_input`` maps a batch to the official ``(x - 127.5) / 128`` and the model's size.
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DATASET_NAMES = ("digits", "fashion-mnist", "mnist", "cifar10", "cifar100", "synthetic")
# Debian's dataset-fashion-mnist package (`make data`) installs the IDX files here.
DEFAULT_DATA_DIRS = {
    "fashion-mnist": "/usr/share/datasets/fashion-mnist",
    "mnist": "/usr/share/datasets/mnist",
    "cifar10": "data/cifar10",
    "cifar100": "data/cifar100",
}
NATIVE_SIZE = {"digits": 8, "fashion-mnist": 28, "mnist": 28, "cifar10": 32, "cifar100": 32}
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DatasetNotFoundError(FileNotFoundError):
    """Raised when a dataset's files are absent; the message names the files expected."""


@dataclass
class ImageDataset:
    """One split in memory: ``images [N, C, H, W]`` (uint8, or float32 at pixel scale 0..255),
    ``labels [N]`` int64."""

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int

    def __post_init__(self):
        if self.images.dim() != 4 or self.labels.dim() != 1 or self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(f"{self.name}/{self.split}: images must be [N, C, H, W] and labels [N]; "
                             f"got {tuple(self.images.shape)} and {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]


def load_dataset(name: str, split: str, data_dir=None, *, synthetic_size: int = 512,
                 synthetic_image_size: int = 16, synthetic_classes: int = 10,
                 synthetic_channels: int = 3, seed: int = 0) -> ImageDataset:
    """Load ``split`` ("train" or "test") of dataset ``name`` (one of ``DATASET_NAMES``).

    ``data_dir`` is used by the file-based sets (default ``DEFAULT_DATA_DIRS[name]``).
    ``synthetic_*`` and ``seed`` shape the synthetic set (the test split uses other samples of
    the same class patterns).
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"dataset must be one of {DATASET_NAMES}, got {name!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name == "digits":
        return _load_digits(split)
    if name == "synthetic":
        return make_synthetic(split, size=synthetic_size, image_size=synthetic_image_size,
                              num_classes=synthetic_classes, channels=synthetic_channels, seed=seed)
    directory = os.fspath(data_dir) if data_dir is not None else DEFAULT_DATA_DIRS[name]
    if name in ("fashion-mnist", "mnist"):
        return _load_idx_split(name, split, directory)
    return _load_cifar(name, split, directory)


# ----------------------------------------------------------------------------- digits
def _load_digits(split: str) -> ImageDataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("the 'digits' dataset needs scikit-learn (pip install scikit-learn)") from exc
    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) * (255.0 / 16.0)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    # A fixed split (independent of the training seed) so that every run tests on the same 20 %.
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(20171103))
    n_test = len(labels) // 5
    index = order[n_test:] if split == "train" else order[:n_test]
    return ImageDataset("digits", split, images[index].contiguous(), labels[index].contiguous(), 10)


# ----------------------------------------------------------------------------- IDX (MNIST-like)
def _find_file(directory: str, stem: str):
    for candidate in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    return None


def read_idx(path: str) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into a numpy array of its shape."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic)")
    type_code, ndim = data[2], data[3]
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if type_code not in dtypes:
        raise ValueError(f"{path}: unknown IDX element type 0x{type_code:02x}")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    array = np.frombuffer(data, dtype=dtypes[type_code], offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {array.size} values")
    return array.reshape(shape)


def _load_idx_split(name: str, split: str, directory: str) -> ImageDataset:
    image_stem, label_stem = _IDX_FILES[split]
    image_path, label_path = _find_file(directory, image_stem), _find_file(directory, label_stem)
    if image_path is None or label_path is None:
        hint = " (install Debian's dataset-fashion-mnist: `make data`)" if name == "fashion-mnist" else ""
        raise DatasetNotFoundError(
            f"{name} {split} split not found in {directory!r}: expected {image_stem}[.gz] and "
            f"{label_stem}[.gz] (IDX format); pass --data-dir{hint}"
        )
    images = read_idx(image_path)
    labels = read_idx(label_path)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{name}: unexpected IDX shapes {images.shape} and {labels.shape}")
    return ImageDataset(name, split, torch.from_numpy(images.copy()).unsqueeze(1),
                        torch.from_numpy(labels.astype(np.int64)), 10)


# ----------------------------------------------------------------------------- CIFAR
def _cifar_layout(name: str):
    if name == "cifar10":
        return "cifar-10-batches-py", {"train": [f"data_batch_{i}" for i in range(1, 6)],
                                       "test": ["test_batch"]}, b"labels", 10
    return "cifar-100-python", {"train": ["train"], "test": ["test"]}, b"fine_labels", 100


def _load_cifar(name: str, split: str, directory: str) -> ImageDataset:
    folder, files, label_key, num_classes = _cifar_layout(name)
    # Accept the folder that holds the batches or the one above it.
    roots = [os.path.join(directory, folder), directory]
    root = next((r for r in roots if all(os.path.isfile(os.path.join(r, f)) for f in files[split])), None)
    if root is None:
        raise DatasetNotFoundError(
            f"{name} {split} split not found: expected {', '.join(files[split])} (python pickle "
            f"batches) in {roots[0]!r} or {roots[1]!r}; pass --data-dir"
        )
    images, labels = [], []
    for filename in files[split]:
        with open(os.path.join(root, filename), "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{filename}: expected data of shape [N, 3072], got {data.shape}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    return ImageDataset(name, split, torch.from_numpy(np.concatenate(images)),
                        torch.from_numpy(np.concatenate(labels)), num_classes)


# ----------------------------------------------------------------------------- synthetic
def make_synthetic(split: str, *, size: int = 512, image_size: int = 16, num_classes: int = 10,
                   channels: int = 3, seed: int = 0) -> ImageDataset:
    """Images = a smooth random pattern per class + noise, at pixel scale; learnable quickly."""
    patterns_gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, channels, 4, 4, generator=patterns_gen)
    patterns = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear",
                             align_corners=False)
    sample_gen = torch.Generator().manual_seed(seed * 2 + (1 if split == "test" else 2))
    labels = torch.randint(0, num_classes, (size,), generator=sample_gen)
    noise = torch.rand(size, channels, image_size, image_size, generator=sample_gen)
    images = (0.7 * patterns[labels] + 0.3 * noise) * 255.0
    return ImageDataset("synthetic", split, images.float(), labels, num_classes)


# ----------------------------------------------------------------------------- batches
def to_model_input(images: torch.Tensor, image_size: int, *, device=None,
                   dtype=torch.float32) -> torch.Tensor:
    """Pixel-scale images -> the official input scaling ``(x - 127.5) / 128``, resized (bilinear)
    to ``image_size`` when they differ."""
    x = images.to(device=device, dtype=dtype, non_blocking=True)
    x = (x - 127.5) / 128.0
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x


def augment_crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random ``padding``-pixel translation (zero padded crop) and horizontal flip per image, drawn
    from ``generator`` (so a resumed run repeats it exactly)."""
    n, _, h, w = x.shape
    shifts = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    padded = F.pad(x, (padding, padding, padding, padding))
    out = torch.empty_like(x)
    for i in range(n):
        dy, dx = int(shifts[i, 0]), int(shifts[i, 1])
        crop = padded[i, :, dy:dy + h, dx:dx + w]
        out[i] = crop.flip(-1) if flips[i] else crop
    return out


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch: a function of (seed, epoch) only, so every rank and every
    resumed run draws the same order."""
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(num_samples, generator=generator)


def batch_indices(num_samples: int, batch_size: int, seed: int, iteration: int,
                  rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """Indices of the samples that ``rank`` trains on at ``iteration`` (0-based).

    The global batch (``batch_size`` samples, the last incomplete batch of each epoch dropped) is
    split into ``world_size`` equal contiguous shards, shard ``rank`` returned.
    """
    if batch_size % world_size != 0:
        raise ValueError(f"batch_size {batch_size} must be divisible by the world size {world_size}")
    per_epoch = num_samples // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} is larger than the dataset ({num_samples} samples)")
    epoch, position = divmod(int(iteration), per_epoch)
    order = epoch_permutation(num_samples, seed, epoch)
    batch = order[position * batch_size:(position + 1) * batch_size]
    shard = batch_size // world_size
    return batch[rank * shard:(rank + 1) * shard]
