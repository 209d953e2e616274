"""The synthetic set: storage, initialisation, decoding, segments, save/load.

Stored images are class-major ``[C, n, ch, H, W]`` float32 in [0, 1] (``n`` = IPC). With
multi-formation factor ``f`` each stored image holds ``f x f`` tiles and decodes to ``f^2``
training images (IDC). Segments split every class's ``n`` slots into consecutive runs
(``segment_sizes``), distilled one after another by DASM; segment ``k`` of every class is
``images[:, start_k:start_k + size_k]`` and is stored at its own factor ``f_k``.

``synthetic.safetensors`` holds ``images [C*n, ch, H, W]``, ``labels [C*n]`` and
``segment [C*n]`` plus string metadata (see :data:`META_KEYS`); ``factor`` is one integer when
every segment shares it (all files written before per-segment factors) or a JSON list. A set with
soft labels (:mod:`dasm.teacher`) also holds ``soft_labels [C * decoded_per_class, C]``: a
teacher's logits on the decoded images, in :meth:`SyntheticSet.decoded`'s order, with
``soft_temperature`` and ``teacher`` (its identity) in the metadata.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import io, ops
from .errors import RunDirError
from .formation import tile_shape

FORMAT = "dasm-synthetic"
FORMAT_VERSION = 1
META_KEYS = ("format", "format_version", "dataset", "classes", "channels", "image_size", "factor",
             "mean", "std", "ipc", "segments", "version")


@dataclass
class SyntheticSet:
    images: torch.Tensor  # [C, n, ch, H, W] float32 in [0, 1]
    factor: int | list[int]  # one for every segment, or one per segment
    segment_sizes: list[int]
    dataset: str = ""
    classes: list[str] = field(default_factory=list)
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)  # e.g. config digest, method
    soft: torch.Tensor | None = None  # [C * decoded_per_class, C] teacher logits, or None

    def __post_init__(self):
        if self.images.dim() != 5:
            raise ValueError(f"SyntheticSet images must be [C, n, ch, H, W], got "
                             f"{tuple(self.images.shape)}")
        if sum(self.segment_sizes) != self.images.shape[1]:
            raise ValueError(f"segment sizes {self.segment_sizes} do not add up to "
                             f"{self.images.shape[1]} images per class")
        if isinstance(self.factor, list):
            if len(self.factor) != len(self.segment_sizes) or min(self.factor) < 1:
                raise ValueError(f"factors {self.factor} do not fit segments "
                                 f"{self.segment_sizes}")
            if len(set(self.factor)) == 1:
                self.factor = self.factor[0]
        if self.soft is not None:
            problem = soft_problem(self.soft, self.num_classes, self.decoded_per_class, self.extra)
            if problem:
                raise ValueError(problem)

    @property
    def factors(self) -> list[int]:
        """The factor of every segment."""
        if isinstance(self.factor, list):
            return list(self.factor)
        return [self.factor] * len(self.segment_sizes)

    # ------------------------------------------------------------------ shape
    @property
    def num_classes(self) -> int:
        return self.images.shape[0]

    @property
    def ipc(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.images.shape[-2:])

    @property
    def decoded_per_class(self) -> int:
        return sum(n * f * f for n, f in zip(self.segment_sizes, self.factors))

    # ----------------------------------------------------------------- decode
    def decoded(self, normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """All training images ``[C * decoded_per_class, ch, H, W]`` (class-major; within a
        class segment by segment) and labels."""
        C = self.images.shape[0]
        mean = std = None
        if normalize:
            mean = torch.tensor(self.mean, dtype=torch.float32, device=self.images.device)
            std = torch.tensor(self.std, dtype=torch.float32, device=self.images.device)
        x = decode_segments(self.images, self.segment_sizes, self.factors, mean, std)
        labels = torch.arange(C, device=x.device).repeat_interleave(self.decoded_per_class)
        return x.reshape(-1, *x.shape[2:]), labels

    # -------------------------------------------------------------- save/load
    def metadata(self, version: str) -> dict[str, str]:
        meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "dataset": self.dataset,
                "classes": json.dumps(self.classes), "channels": str(self.images.shape[2]),
                "image_size": json.dumps(list(self.image_size)), "factor": json.dumps(self.factor),
                "mean": json.dumps(list(self.mean)), "std": json.dumps(list(self.std)),
                "ipc": str(self.ipc), "segments": json.dumps(self.segment_sizes),
                "version": version}
        meta.update({k: str(v) for k, v in self.extra.items()})
        return meta

    def save(self, path: str | Path) -> None:
        """Write ``synthetic.safetensors`` atomically."""
        from .version import __version__

        C, n = self.images.shape[:2]
        tensors = {
            "images": self.images.detach().clamp(0, 1).reshape(C * n, *self.images.shape[2:])
            .float().cpu().contiguous(),
            "labels": torch.arange(C).repeat_interleave(n),
            "segment": torch.repeat_interleave(torch.arange(len(self.segment_sizes)),
                                               torch.tensor(self.segment_sizes)).repeat(C),
        }
        if self.soft is not None:
            tensors["soft_labels"] = self.soft.detach().float().cpu().contiguous()
        io.save_safetensors(tensors, path, self.metadata(__version__))

    @classmethod
    def load(cls, path: str | Path) -> "SyntheticSet":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise RunDirError(f"synthetic set not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises several types for damaged files
            raise RunDirError(f"corrupt synthetic set {path}: {e}") from None
        missing = [k for k in META_KEYS if k not in meta] + \
            [k for k in ("images", "labels", "segment") if k not in tensors]
        if meta.get("format") != FORMAT or missing:
            raise RunDirError(f"{path} is not a dasm synthetic set (missing: "
                              f"{', '.join(missing) or 'format tag'})")
        try:
            classes = json.loads(meta["classes"])
            segments = [int(s) for s in json.loads(meta["segments"])]
            ipc, factor = int(meta["ipc"]), json.loads(meta["factor"])
            if not (isinstance(factor, int) or isinstance(factor, list) and all(
                    isinstance(f, int) for f in factor)):
                raise ValueError(f"factor {meta['factor']!r} is not an integer or a list of them")
            images = tensors["images"]
            C = len(classes)
            if images.dim() != 4 or images.shape[0] != C * ipc or sum(segments) != ipc:
                raise ValueError(f"images {tuple(images.shape)} for {C} classes x {ipc} IPC, "
                                 f"segments {segments}")
            problem = stored_problem(images, int(meta["channels"]),
                                     tuple(json.loads(meta["image_size"])))
            if problem:
                raise ValueError(problem)
            labels = tensors["labels"]
            if not torch.equal(labels, torch.arange(C).repeat_interleave(ipc)):
                raise ValueError("labels are not class-major")
            extra = {k: v for k, v in meta.items() if k not in META_KEYS}
            soft = tensors.get("soft_labels")
            if soft is not None and soft.dtype != torch.float32:
                raise ValueError(f"soft_labels are {soft.dtype}, expected float32 logits")
            return cls(images.reshape(C, ipc, *images.shape[1:]).float(), factor, segments,
                       meta["dataset"], classes, tuple(json.loads(meta["mean"])),
                       tuple(json.loads(meta["std"])), extra, soft)
        except (ValueError, KeyError, RuntimeError, json.JSONDecodeError) as e:
            raise RunDirError(f"corrupt synthetic set {path}: {e}") from None


    def check_fits(self, ds, path) -> None:
        """A RunDirError naming ``path`` unless this set fits dataset ``ds``: its name, class
        count, channels and image size."""
        if self.dataset and self.dataset != ds.name:
            raise RunDirError(f"{path} was distilled from {self.dataset}, config says {ds.name}")
        have = (self.num_classes, self.images.shape[2], self.image_size)
        want = (ds.num_classes, ds.channels, tuple(ds.image_size))
        if have != want:
            raise RunDirError(f"{path} ({have[0]} classes, {have[1]} channels, {have[2]}) does "
                              f"not fit {ds.name} ({want[0]} classes, {want[1]} channels, "
                              f"{want[2]})")


def soft_problem(soft: torch.Tensor, classes: int, per_class: int, meta: dict) -> str | None:
    """What is wrong with a set's soft labels (teacher logits of its decoded images), or None."""
    if tuple(soft.shape) != (classes * per_class, classes):
        return (f"soft_labels are {tuple(soft.shape)}, expected ({classes * per_class}, "
                f"{classes}): one row of logits per decoded image")
    if not torch.isfinite(soft).all():
        return "its soft_labels hold NaN or infinity"
    missing = [k for k in ("soft_temperature", "teacher") if k not in meta]
    if missing:
        return f"soft_labels without {', '.join(missing)} in the metadata"
    return None


def stored_problem(images: torch.Tensor, channels: int | None = None,
                   size: tuple[int, ...] | None = None) -> str | None:
    """What is wrong with stored synthetic images ``[..., ch, H, W]`` (a set's or a
    checkpoint's), or None: the one check every reader shares. They must be float32, finite,
    in [0, 1], and have ``channels`` and ``size`` where given."""
    if images.dtype != torch.float32:
        return f"images are {images.dtype}, expected float32 in [0, 1]"
    if not torch.isfinite(images).all():
        return "its images hold NaN or infinity"
    if images.numel() and not (images.min() >= 0 and images.max() <= 1):
        return (f"images lie in [{float(images.min()):g}, {float(images.max()):g}], expected "
                f"[0, 1]")
    if channels is not None and images.shape[-3] != channels:
        return f"images have {images.shape[-3]} channels, its metadata says {channels}"
    if size is not None and tuple(images.shape[-2:]) != tuple(size):
        return f"images are {tuple(images.shape[-2:])}, its metadata says {tuple(size)}"
    return None


# ----------------------------------------------------------------------- decoding
@torch.no_grad()
def decode_segments(stored: torch.Tensor, sizes: list[int], factors: list[int], mean=None,
                    std=None) -> torch.Tensor:
    """Decoded images ``[C, sum_k n_k f_k^2, ch, H, W]`` of class-major ``stored [C, n, ...]``
    whose consecutive segments of ``sizes`` are stored at ``factors`` (optionally normalised)."""
    C = stored.shape[0]
    parts, start = [], 0
    for n, f in zip(sizes, factors):
        flat = stored[:, start:start + n].reshape(C * n, *stored.shape[2:])
        parts.append(ops.decode_augment(flat, f, None, None, mean, std)
                     .reshape(C, n * f * f, *stored.shape[2:]))
        start += n
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def frozen_view(stored: torch.Tensor, sizes: list[int], factors: list[int]):
    """The frozen earlier segments ``stored [C, sum(sizes), ...]`` as the matcher reads them:
    ``(images, factor)``: the stored images and their factor when every segment shares one, else
    the decoded images at factor 1 (decoding first, then augmenting, is the same mathematics
    as the fused decode + augment)."""
    if len(set(factors)) == 1:
        return stored, factors[0]
    return decode_segments(stored, sizes, factors), 1


# ------------------------------------------------------------------------ inits
def init_mix(real: torch.Tensor, factor: int) -> torch.Tensor:
    """IDC's "mix" init. ``real [C, n * f^2, ch, H, W]`` float in [0, 1] -> ``[C, n, ch, H, W]``:
    tile ``t`` (row-major) of stored image ``m`` is real image ``t * n + m``, shrunk to the tile
    size (nearest) and cropped where the tile overhangs the image."""
    C, total, ch, H, W = real.shape
    f2 = factor * factor
    if total % f2:
        raise ValueError(f"init_mix needs a multiple of {f2} real images per class, got {total}")
    n = total // f2
    th, tw = tile_shape((H, W), factor)
    out = torch.full((C, n, ch, H, W), 0.5, dtype=torch.float32, device=real.device)
    for t in range(f2):
        i, j = divmod(t, factor)
        part = real[:, t * n:(t + 1) * n].reshape(C * n, ch, H, W).float()
        small = F.interpolate(part, size=(th, tw), mode="nearest").reshape(C, n, ch, th, tw)
        h0, w0 = i * th, j * tw
        h1, w1 = min(h0 + th, H), min(w0 + tw, W)
        out[:, :, :, h0:h1, w0:w1] = small[..., :h1 - h0, :w1 - w0]
    return out


def init_noise(C: int, n: int, ch: int, size: tuple[int, int],
               generator: torch.Generator) -> torch.Tensor:
    """IDC's noise init: N(0, 1) / 4 + 0.5, clipped to [0, 1]."""
    return (torch.randn(C, n, ch, *size, generator=generator) / 4 + 0.5).clamp(0, 1)


def real_needed(init: str, n: int, factor: int) -> int:
    """Real images per class an init consumes."""
    return {"mix": n * factor * factor, "real": n, "noise": 0}[init]


def initialise(init: str, real: torch.Tensor | None, C: int, n: int, ch: int,
               size: tuple[int, int], factor: int, generator: torch.Generator) -> torch.Tensor:
    """``[C, n, ch, H, W]`` from ``real [C, real_needed, ch, H, W]`` (float in [0, 1])."""
    if init == "mix":
        return init_mix(real, factor)
    if init == "real":
        return real.float().clone()
    return init_noise(C, n, ch, size, generator)


def save_grid(images: torch.Tensor, path: str | Path, per_class: int = 10) -> None:
    """PNG grid of stored images ``[C, n, ch, H, W]``: a row per class, up to ``per_class``."""
    from torchvision.utils import make_grid
    from PIL import Image

    C, n = images.shape[:2]
    k = min(n, per_class)
    x = images[:, :k].detach().clamp(0, 1).reshape(C * k, *images.shape[2:]).cpu()
    grid = make_grid(x, nrow=k, padding=1, pad_value=1.0)
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    if arr.shape[2] == 1:
        arr = arr[:, :, 0]
    img = Image.fromarray(arr).resize((arr.shape[1] * 2, arr.shape[0] * 2), Image.NEAREST)
    io.write_with(path, lambda p: img.save(p, format="PNG"))
