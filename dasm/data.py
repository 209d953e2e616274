"""Datasets as uint8 tensors in memory, with a per-class index and normalisation statistics.

:func:`load_dataset` returns a :class:`Dataset`: ``train_images`` ``[N, ch, H, W] uint8``,
``train_labels`` ``[N] int64`` (likewise ``test_*``), class names, and per-channel mean/std in
[0, 1] units; the files are read by :mod:`dasm.loaders`; seeded subsets and held-out splits here.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .errors import DataError
from .loaders import LOADERS, load_imagefolder


# Published normalisation statistics (those IDC uses); other sets get theirs from the train split.
STATS = {
    "fashion-mnist": ((0.2861,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "mnist5k": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}
ALIASES = {"fashion": "fashion-mnist", "fashion_mnist": "fashion-mnist", "fmnist": "fashion-mnist",
           "fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "cifar-100": "cifar100",
           "mnist-5k": "mnist5k", "mnist_5k": "mnist5k"}
MNIST_LIKE = {"mnist", "fashion-mnist", "mnist5k"}  # IDC: l1 metric, lr_img 1e-4
NO_FLIP = {"mnist", "mnist5k", "digits", "svhn"}  # evaluation drops flip for digits and SVHN


@dataclass
class Dataset:
    """A labelled image dataset held in memory as uint8."""

    name: str
    train_images: torch.Tensor  # [N, ch, H, W] uint8
    train_labels: torch.Tensor  # [N] int64 in [0, num_classes)
    test_images: torch.Tensor  # [M, ch, H, W] uint8
    test_labels: torch.Tensor  # [M] int64
    classes: list[str]
    mean: tuple[float, ...]  # per channel, [0, 1] units
    std: tuple[float, ...]
    _class_index: list[torch.Tensor] | None = field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return self.train_images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.train_images.shape[-2:])

    def class_index(self) -> list[torch.Tensor]:
        """Indices of the training images of each class, ``[n_c] int64`` each, ascending."""
        if self._class_index is None:
            order = torch.argsort(self.train_labels, stable=True)
            counts = torch.bincount(self.train_labels, minlength=self.num_classes).tolist()
            self._class_index = list(torch.split(order, counts))
        return self._class_index

    def mean_std(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``[ch]`` float32 tensors of the normalisation statistics."""
        return (torch.tensor(self.mean, dtype=torch.float32, device=device),
                torch.tensor(self.std, dtype=torch.float32, device=device))


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` per channel: ``x [N, ch, H, W]``, ``mean``/``std`` ``[ch]``."""
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., H, W]`` -> float32 in [0, 1] (float input is returned as float32)."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def canonical_name(name: str) -> str:
    if name.startswith("imagefolder:"):
        return name
    key = ALIASES.get(name.lower(), name.lower())
    if key not in LOADERS:
        raise DataError(f"unknown dataset {name!r} (known: {', '.join(sorted(LOADERS))}, "
                        f"imagefolder:/path)")
    return key


def load_dataset(name: str = "fashion-mnist", root: str | Path = "data", download: bool = False,
                 train_per_class: int = 0, holdout_per_class: int = 0, test_limit: int = 0,
                 split_seed: int = 0, channels: int = 0, image_size: int = 0) -> Dataset:
    """Load a dataset into memory.

    ``train_per_class`` keeps a seeded subset of the training images of each class;
    ``holdout_per_class`` moves that many training images per class into the test role (a
    validation split for choosing defaults without touching the test set); ``test_limit`` keeps
    the first images of the test split.
    """
    key = canonical_name(name)
    root = Path(root).expanduser()
    if key.startswith("imagefolder:"):
        folder = Path(key.split(":", 1)[1]).expanduser()
        if not folder.is_dir():
            raise DataError(f"imagefolder: folder {folder} does not exist")
        tx, ty, vx, vy, classes = load_imagefolder(folder, channels, image_size)
    else:
        if not root.exists() and key not in ("fashion-mnist", "mnist5k", "digits") and not download:
            raise DataError(f"data root {root} does not exist (dataset {key}; pass --download "
                            f"where a network exists)")
        tx, ty, vx, vy, classes = LOADERS[key](root, download)
    counts = torch.bincount(ty, minlength=len(classes))
    if (counts == 0).any():
        empty = [classes[i] for i in torch.nonzero(counts == 0).flatten().tolist()]
        raise DataError(f"{key}: class(es) {', '.join(empty)} have no training images")
    mean, std = STATS.get(key, (None, None))
    if mean is None:
        f = tx.float().div(255.0)
        mean = tuple(f.mean(dim=(0, 2, 3)).tolist())
        std = tuple(f.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    ds = Dataset(key, tx.contiguous(), ty, vx.contiguous(), vy, list(classes), mean, std)
    return subset(ds, train_per_class, holdout_per_class, test_limit, split_seed)


def subset(ds: Dataset, train_per_class: int = 0, holdout_per_class: int = 0,
           test_limit: int = 0, seed: int = 0) -> Dataset:
    """Seeded per-class subsets of a dataset (see :func:`load_dataset`)."""
    if not (train_per_class or holdout_per_class or test_limit):
        return ds
    g = torch.Generator().manual_seed(seed)
    keep, hold = [], []
    for c, idx in enumerate(ds.class_index()):
        idx = idx[torch.randperm(len(idx), generator=g)]
        if holdout_per_class:
            if len(idx) <= holdout_per_class:
                raise DataError(f"data.holdout_per_class={holdout_per_class} leaves no training "
                                f"image of class {ds.classes[c]!r} ({len(idx)} images)")
            hold.append(idx[:holdout_per_class])
            idx = idx[holdout_per_class:]
        keep.append(idx[:train_per_class] if train_per_class else idx)
    keep_idx = torch.cat(keep).sort().values
    out = replace(ds, train_images=ds.train_images[keep_idx], train_labels=ds.train_labels[keep_idx],
                  _class_index=None)
    if holdout_per_class:
        hold_idx = torch.cat(hold).sort().values
        out = replace(out, test_images=ds.train_images[hold_idx],
                      test_labels=ds.train_labels[hold_idx])
    if test_limit:
        out = replace(out, test_images=out.test_images[:test_limit],
                      test_labels=out.test_labels[:test_limit])
    return out


def dataset_from_config(data_cfg) -> Dataset:
    return load_dataset(data_cfg.name, data_cfg.root, data_cfg.download, data_cfg.train_per_class,
                        data_cfg.holdout_per_class, data_cfg.test_limit, data_cfg.split_seed,
                        data_cfg.channels, data_cfg.image_size)
