"""Differentiable siamese augmentation (DSA): parameters as tensors, reference ops, CutMix.

Parameters are drawn from an explicit ``torch.Generator`` (never the global RNG) into a
:class:`DSAParams`, one row per sample. *Siamese* mode draws one row per group (a class) and
expands it to every sample of the group, so the real and synthetic batches of a class share it;
*per-sample* mode draws a row per sample. As in IDC's ``DiffAug``, a call applies flip, the three
colour ops, **one** geometric op (crop, scale or rotate; chosen per group, or once per batch in
per-sample mode) and cutout, in that order, on normalised images.

The reference ops below follow the DSA formulas literally and are the specification of the fused
kernels; :meth:`DSAParams.pixel_affine` and :meth:`DSAParams.colour_coefficients` give the same
transform in composed form (one affine resampling, one per-pixel colour map).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

from .errors import ConfigError

# DSA / IDC constants.
FLIP_P = 0.5
BRIGHTNESS = 1.0
SATURATION = 2.0
CONTRAST = 0.5
CROP_RATIO = 0.125
CUTOUT_RATIO = 0.5
SCALE_RATIO = 1.2
ROTATE_DEG = 15.0

GEO_NONE, GEO_CROP, GEO_SCALE, GEO_ROTATE = 0, 1, 2, 3
GEOMETRIC = {"crop": GEO_CROP, "scale": GEO_SCALE, "rotate": GEO_ROTATE}
ORDER = ("color", "crop", "cutout", "flip", "scale", "rotate")


@dataclass(frozen=True)
class Strategy:
    """Which DSA ops are on. Parsed from IDC's underscore notation, e.g. ``color_crop_cutout``."""

    flip: bool = False
    color: bool = False
    cutout: bool = False
    geometric: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str, key: str = "augment") -> "Strategy":
        if text is None or text.strip().lower() in ("", "none"):
            return cls()
        ops = text.strip().lower().split("_")
        unknown = [o for o in ops if o not in ORDER]
        if unknown:
            raise ConfigError(f"config key '{key}': unknown DSA op {unknown[0]!r} in {text!r} "
                              f"(known: {', '.join(ORDER)})")
        geo = tuple(o for o in ("crop", "scale", "rotate") if o in ops)
        return cls("flip" in ops, "color" in ops, "cutout" in ops, geo)

    def without(self, *ops: str) -> "Strategy":
        return Strategy(self.flip and "flip" not in ops, self.color and "color" not in ops,
                        self.cutout and "cutout" not in ops,
                        tuple(g for g in self.geometric if g not in ops))

    @property
    def enabled(self) -> bool:
        return self.flip or self.color or self.cutout or bool(self.geometric)

    def __str__(self) -> str:
        on = {"flip": self.flip, "color": self.color, "cutout": self.cutout,
              **{g: True for g in self.geometric}}
        return "_".join(o for o in ORDER if on.get(o)) or "none"


def crop_shift(size: int) -> int:
    return int(size * CROP_RATIO + 0.5)


def cutout_size(size: int) -> int:
    return int(size * CUTOUT_RATIO + 0.5)


@dataclass
class DSAParams:
    """One DSA draw per sample (``M`` rows). Identity values where an op is off."""

    flip: torch.Tensor  # [M] bool
    brightness: torch.Tensor  # [M] float32, added
    saturation: torch.Tensor  # [M] float32, factor
    contrast: torch.Tensor  # [M] float32, factor
    geo: torch.Tensor  # [M] int64: 0 none, 1 crop, 2 scale, 3 rotate
    shift: torch.Tensor  # [M, 2] int64 crop translation (rows, cols)
    scale: torch.Tensor  # [M, 2] float32 (sx, sy) of the scale op
    angle: torch.Tensor  # [M] float32 radians of the rotate op
    cut_center: torch.Tensor  # [M, 2] int64 cutout centre (row, col)
    strategy: Strategy
    size: tuple[int, int]  # (H, W) the parameters were drawn for

    _TENSORS = ("flip", "brightness", "saturation", "contrast", "geo", "shift", "scale", "angle",
                "cut_center")

    def __len__(self) -> int:
        return self.flip.shape[0]

    def index(self, idx: torch.Tensor) -> "DSAParams":
        """Rows ``idx`` (e.g. each sample's group in siamese mode)."""
        return replace(self, **{n: getattr(self, n)[idx] for n in self._TENSORS})

    def to(self, device) -> "DSAParams":
        return replace(self, **{n: getattr(self, n).to(device) for n in self._TENSORS})

    # ------------------------------------------------------------ composed form
    def cutout_box(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[M, 2]`` first row/col and ``[M, 2]`` end row/col (exclusive) of the cutout square,
        clipped to the image; empty boxes when cutout is off."""
        H, W = self.size
        if not self.strategy.cutout:
            z = torch.zeros_like(self.cut_center)
            return z, z
        (ch, cw), c = (cutout_size(H), cutout_size(W)), self.cut_center
        lo = torch.stack([c[:, 0] - ch // 2, c[:, 1] - cw // 2], dim=1)  # no host constants
        hi = torch.stack([(lo[:, 0] + ch).clamp(max=H), (lo[:, 1] + cw).clamp(max=W)], dim=1)
        return lo.clamp(min=0), hi

    def pixel_affine(self) -> torch.Tensor:
        """``[M, 2, 3]`` float32 map from an output pixel (col x, row y, 1) to the source pixel
        position in the (colour-transformed) input: the composition of flip and the geometric op,
        with ``grid_sample``'s align_corners=False convention. Bilinear sampling at that
        position with zeros outside reproduces :func:`apply_reference`'s geometry.
        Built from elementwise ops only (no host synchronisation on a GPU)."""
        H, W = self.size
        dev, f64 = self.flip.device, torch.float64
        to_norm, to_pix, flip = _affine_constants(H, W, dev)
        one, zero = torch.ones_like(self.angle, dtype=f64), torch.zeros_like(self.angle, dtype=f64)
        is_scale, is_rot = self.geo == GEO_SCALE, self.geo == GEO_ROTATE
        cos, sin = torch.cos(self.angle.to(f64)), torch.sin(self.angle.to(f64))
        t00 = torch.where(is_scale, self.scale[:, 0].to(f64), torch.where(is_rot, cos, one))
        t11 = torch.where(is_scale, self.scale[:, 1].to(f64), torch.where(is_rot, cos, one))
        t01 = torch.where(is_rot, -sin, zero)
        t10 = torch.where(is_rot, sin, zero)
        theta = torch.stack([torch.stack([t00, t01, zero], 1), torch.stack([t10, t11, zero], 1),
                             torch.stack([zero, zero, one], 1)], 1)
        A = to_pix @ theta @ to_norm  # pixel -> pixel for scale / rotate (identity otherwise)
        crop = torch.stack([torch.stack([one, zero, self.shift[:, 1].to(f64)], 1),
                            torch.stack([zero, one, self.shift[:, 0].to(f64)], 1),
                            torch.stack([zero, zero, one], 1)], 1)
        A = torch.where((self.geo == GEO_CROP).view(-1, 1, 1), crop, A)
        A = torch.where(self.flip.view(-1, 1, 1), flip @ A, A)  # flip is applied first
        return A[:, :2, :].float()

    def colour_coefficients(self) -> torch.Tensor:
        """``[M, 4]`` float32 (alpha, beta, shift, mean_weight) such that the colour ops map a
        normalised image ``x`` to ``alpha * x + beta * mean_c(x) + shift + mean_weight * mean(x)``
        (mean_c over channels per pixel, mean over the whole image)."""
        if not self.strategy.color:
            one, zero = torch.ones_like(self.brightness), torch.zeros_like(self.brightness)
            return torch.stack([one, zero, zero, zero], dim=1)
        s, k, b = self.saturation, self.contrast, self.brightness
        return torch.stack([k * s, k * (1 - s), b, 1 - k], dim=1)


@functools.lru_cache(maxsize=16)
def _affine_constants(H: int, W: int, device: torch.device):
    """``3 x 3`` float64 pixel -> normalised and normalised -> pixel maps (``u = (2x + 1)/W -
    1``) and the horizontal flip, made once per size and device (a host constant copied to a
    GPU every call would wait for it)."""
    f64 = dict(dtype=torch.float64, device=device)
    to_norm = torch.tensor([[2.0 / W, 0, 1.0 / W - 1], [0, 2.0 / H, 1.0 / H - 1], [0, 0, 1]],
                           **f64)
    to_pix = torch.tensor([[W / 2.0, 0, (W - 1) / 2.0], [0, H / 2.0, (H - 1) / 2.0], [0, 0, 1]],
                          **f64)
    flip = torch.tensor([[-1.0, 0, W - 1], [0, 1, 0], [0, 0, 1]], **f64)
    return to_norm, to_pix, flip


@functools.lru_cache(maxsize=16)
def _geometric_codes(geometric: tuple[str, ...], device: torch.device) -> torch.Tensor:
    """``[k]`` int64 codes of the geometric ops on, made once per device."""
    return torch.tensor([GEOMETRIC[o] for o in geometric], device=device)


def draw(strategy: Strategy, n: int, size: tuple[int, int], generator: torch.Generator,
         shared_geometric: bool = False, device=None) -> DSAParams:
    """Draw ``n`` rows of DSA parameters on ``generator``'s device (a CPU generator gives the
    CPU's stream as before; a GPU one, no host work), then move them to ``device``.

    ``shared_geometric``: one geometric op for all rows (IDC's per-call choice in per-sample
    mode); otherwise each row picks its own.
    """
    H, W = size
    g = generator
    dev = g.device
    kw = dict(device=dev)
    flip = torch.rand(n, generator=g, **kw) < FLIP_P if strategy.flip \
        else torch.zeros(n, dtype=torch.bool, **kw)
    if strategy.color:
        brightness = (torch.rand(n, generator=g, **kw) - 0.5) * BRIGHTNESS
        saturation = torch.rand(n, generator=g, **kw) * SATURATION
        contrast = torch.rand(n, generator=g, **kw) + CONTRAST
    else:
        brightness, saturation, contrast = (torch.zeros(n, **kw), torch.ones(n, **kw),
                                            torch.ones(n, **kw))
    geo = torch.zeros(n, dtype=torch.int64, **kw)
    if strategy.geometric:
        codes = _geometric_codes(strategy.geometric, dev)
        pick = torch.randint(len(codes), (1 if shared_geometric else n,), generator=g, **kw)
        geo = codes[pick].expand(n).clone()
    sh, sw = crop_shift(H), crop_shift(W)
    shift = torch.stack([torch.randint(-sh, sh + 1, (n,), generator=g, **kw),
                         torch.randint(-sw, sw + 1, (n,), generator=g, **kw)], dim=1) \
        if "crop" in strategy.geometric else torch.zeros(n, 2, dtype=torch.int64, **kw)
    lo = 1.0 / SCALE_RATIO
    scale = torch.rand(n, 2, generator=g, **kw) * (SCALE_RATIO - lo) + lo \
        if "scale" in strategy.geometric else torch.ones(n, 2, **kw)
    angle = (torch.rand(n, generator=g, **kw) - 0.5) * 2 * ROTATE_DEG / 180 * math.pi \
        if "rotate" in strategy.geometric else torch.zeros(n, **kw)
    if strategy.cutout:
        ch, cw = cutout_size(H), cutout_size(W)
        cut = torch.stack([torch.randint(0, H + (1 - ch % 2), (n,), generator=g, **kw),
                           torch.randint(0, W + (1 - cw % 2), (n,), generator=g, **kw)], dim=1)
    else:
        cut = torch.zeros(n, 2, dtype=torch.int64, **kw)
    p = DSAParams(flip, brightness.float(), saturation.float(), contrast.float(), geo, shift,
                  scale.float(), angle.float(), cut, strategy, (H, W))
    return p.to(device) if device is not None else p


def draw_siamese(strategy: Strategy, group_sizes: list[int] | torch.Tensor, size, generator,
                 device=None) -> DSAParams:
    """One draw per group, expanded to the group's samples (concatenated in group order)."""
    counts = torch.as_tensor(group_sizes, dtype=torch.int64)
    p = draw(strategy, len(counts), size, generator)
    p = p.index(torch.repeat_interleave(torch.arange(len(counts)), counts))
    return p if device is None else p.to(device)


# --------------------------------------------------------------- reference ops
def _col(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def flip(x: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """Horizontal flip of the rows where ``flags``."""
    return torch.where(_col(flags), x.flip(3), x)


def brightness(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return x + _col(b)


def saturation(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    m = x.mean(dim=1, keepdim=True)
    return (x - m) * _col(s) + m


def contrast(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - m) * _col(c) + m


def crop(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """out[i, j] = x[i + shift_row, j + shift_col], zero outside (DSA's padded crop)."""
    M, C, H, W = x.shape
    rows = torch.arange(H, device=x.device).view(1, H) + shift[:, :1]
    cols = torch.arange(W, device=x.device).view(1, W) + shift[:, 1:]
    valid = ((rows >= 0) & (rows < H)).view(M, 1, H, 1) & ((cols >= 0) & (cols < W)).view(M, 1, 1, W)
    r = rows.clamp(0, H - 1).view(M, 1, H, 1).expand(M, C, H, W)
    c = cols.clamp(0, W - 1).view(M, 1, 1, W).expand(M, C, H, W)
    gathered = x.gather(2, r).gather(3, c)
    return gathered * valid


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def scale(x: torch.Tensor, sxy: torch.Tensor) -> torch.Tensor:
    theta = torch.zeros(x.shape[0], 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0], theta[:, 1, 1] = sxy[:, 0], sxy[:, 1]
    return _affine(x, theta)


def rotate(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(angle).to(x.dtype), torch.sin(angle).to(x.dtype)
    theta = torch.stack([torch.stack([c, -s, torch.zeros_like(c)], 1),
                         torch.stack([s, c, torch.zeros_like(c)], 1)], 1)
    return _affine(x, theta)


def cutout(x: torch.Tensor, params: DSAParams) -> torch.Tensor:
    lo, hi = params.cutout_box()
    H, W = x.shape[-2:]
    r = torch.arange(H, device=x.device).view(1, H)
    c = torch.arange(W, device=x.device).view(1, W)
    in_r = (r >= lo[:, :1]) & (r < hi[:, :1])
    in_c = (c >= lo[:, 1:]) & (c < hi[:, 1:])
    keep = ~(in_r.unsqueeze(2) & in_c.unsqueeze(1))
    return x * keep.unsqueeze(1).to(x.dtype)


def apply_reference(x: torch.Tensor, p: DSAParams) -> torch.Tensor:
    """DSA on normalised images ``[M, ch, H, W]``: flip, colour, one geometric op, cutout."""
    st = p.strategy
    if tuple(x.shape[-2:]) != tuple(p.size):
        raise ValueError(f"DSA parameters drawn for {p.size}, images are {tuple(x.shape[-2:])}")
    if st.flip:
        x = flip(x, p.flip)
    if st.color:
        x = contrast(saturation(brightness(x, p.brightness), p.saturation), p.contrast)
    if st.geometric:
        out = x
        # on the CPU, skip the ops no row uses (a per-batch choice uses one of three)
        present = set(p.geo.unique().tolist()) if p.geo.device.type == "cpu" else None
        for name, code in GEOMETRIC.items():
            if name in st.geometric and (present is None or code in present):
                op = {"crop": lambda v: crop(v, p.shift), "scale": lambda v: scale(v, p.scale),
                      "rotate": lambda v: rotate(v, p.angle)}[name]
                out = torch.where(_col(p.geo == code), op(x), out)
        x = out
    if st.cutout:
        x = cutout(x, p)
    return x


# ----------------------------------------------------------------------- CutMix
def cutmix(x: torch.Tensor, generator: torch.Generator):
    """CutMix (IDC's ``rand_bbox``, beta 1: the mixing ratio is uniform): paste a box from a
    permuted batch.

    Returns ``(mixed, perm, lam)``: the loss is ``lam * CE(y) + (1 - lam) * CE(y[perm])``.
    """
    M, _, H, W = x.shape
    lam = torch.rand((), generator=generator).item()
    perm = torch.randperm(M, generator=generator).to(x.device)
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(H * cut), int(W * cut)
    cy = int(torch.randint(H, (), generator=generator))
    cx = int(torch.randint(W, (), generator=generator))
    y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, H)
    x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, W)
    mixed = x.clone()
    mixed[:, :, y1:y2, x1:x2] = x[perm, :, y1:y2, x1:x2]
    lam = 1.0 - (y2 - y1) * (x2 - x1) / (H * W)
    return mixed, perm, lam


def _check_fields():  # keep _TENSORS in sync with the dataclass
    names = {f.name for f in fields(DSAParams)} - {"strategy", "size"}
    assert names == set(DSAParams._TENSORS), names


_check_fields()
