"""Networks for matching and evaluation, in a registry by name.

``build_model(name, channels, num_classes, image_size, generator=..., **options)`` constructs a
model on the meta device and initialises it from an explicit ``torch.Generator`` with PyTorch's
default schemes (kaiming-uniform weights, uniform biases, unit norms), so the same seed gives the
same network without touching the global RNG.

=============  ==============================================================================
convnet        IDC's ConvNet: depth x [conv 3x3 -> norm -> act -> 2x2 pool], linear head;
               instance norm = GroupNorm with one group per channel (affine); the first conv
               pads by 3 on 28x28 inputs (as IDC). Options: depth (auto: :func:`auto_depth`),
               width, norm, pooling, act.
resnet18       CIFAR-style ResNet-18 (3x3 stem, BatchNorm).
resnet18-ap    the same with 2x2 average pooling in place of strided convolutions (IDC's
               ``resnet_ap``).
vgg11          a small VGG-11 (half width, BatchNorm, global average pool).
mlp            two hidden layers of 128 units.
=============  ==============================================================================
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .convnet_depth import auto_depth, block_planes, first_pad
from .errors import ConfigError

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    def deco(fn):
        MODELS[name] = fn
        return fn
    return deco


# ------------------------------------------------------------------------------ ConvNet
class ConvBlock(nn.Module):
    """conv 3x3 -> norm -> act -> pool. The instance-norm/ReLU tail runs through the fused
    :func:`dasm.ops.instance_norm_relu_pool` (twice differentiable)."""

    def __init__(self, cin: int, cout: int, padding: int, norm: str, act: str, pooling: str):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=padding)
        self.norm_kind, self.act_kind, self.pool_kind = norm, act, pooling
        if norm == "instance":
            self.norm = nn.GroupNorm(cout, cout, affine=True)
        elif norm == "batch":
            self.norm = nn.BatchNorm2d(cout)
        else:
            self.norm = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x)
        if self.norm_kind == "instance" and self.act_kind == "relu" and self.pool_kind != "max":
            return ops.instance_norm_relu_pool(z, self.norm.weight, self.norm.bias,
                                               pool=self.pool_kind == "avg", eps=self.norm.eps)
        if self.norm is not None:
            z = self.norm(z)
        z = {"relu": F.relu, "sigmoid": torch.sigmoid,
             "leakyrelu": lambda t: F.leaky_relu(t, 0.01)}[self.act_kind](z)
        if self.pool_kind == "avg":
            z = F.avg_pool2d(z, 2)
        elif self.pool_kind == "max":
            z = F.max_pool2d(z, 2)
        return z


class ConvNet(nn.Module):
    """IDC's ConvNet. Input ``[B, channels, H, W]`` normalised; output logits ``[B, classes]``.
    ``depth``: a count of blocks, or ``"auto"`` (:func:`auto_depth`)."""

    def __init__(self, channels: int, num_classes: int, image_size: tuple[int, int],
                 depth: int | str = "auto", width: int = 128, norm: str = "instance",
                 pooling: str = "avg", act: str = "relu"):
        super().__init__()
        depth = auto_depth(image_size, pooling) if depth == "auto" else depth
        h, w = block_planes(image_size, depth + 1, pooling)[-1]  # after the last block's pool
        if h < 1 or w < 1:
            raise ConfigError(f"config key 'model.depth': {depth} pooled blocks do not fit "
                              f"{image_size[0]}x{image_size[1]} images")
        pad0 = first_pad(image_size)
        self.features = nn.Sequential(*(
            ConvBlock(channels if d == 0 else width, width, pad0 if d == 0 else 1, norm, act,
                      pooling) for d in range(depth)))
        self.classifier = nn.Linear(width * h * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[B, F]`` (herding baseline)."""
        return self.features(x).flatten(1)


@register_model("convnet")
def _convnet(channels, num_classes, image_size, depth="auto", width=128, norm="instance",
             pooling="avg", act="relu"):
    return ConvNet(channels, num_classes, image_size, depth, width, norm, pooling, act)


# ------------------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, avg_pool: bool):
        super().__init__()
        self.pool = avg_pool and stride != 1
        s = 1 if avg_pool else stride
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=s, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=s, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        if self.pool:
            out = F.avg_pool2d(out, 2)
        out = self.bn2(self.conv2(out))
        sc = self.shortcut(x)
        if self.pool:
            sc = F.avg_pool2d(sc, 2)
        return F.relu(out + sc)


class ResNet18(nn.Module):
    def __init__(self, channels, num_classes, image_size, avg_pool=False, width=64):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        layers, cin = [], width
        for i, mult in enumerate((1, 2, 4, 8)):
            for j in range(2):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock(cin, width * mult, stride, avg_pool))
                cin = width * mult
        self.layers = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def embed(self, x):
        return F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1)

    def forward(self, x):
        return self.classifier(self.embed(x))


@register_model("resnet18")
def _resnet18(channels, num_classes, image_size, width=64, **_):
    return ResNet18(channels, num_classes, image_size, avg_pool=False, width=width)


@register_model("resnet18-ap")
def _resnet18_ap(channels, num_classes, image_size, width=64, **_):
    return ResNet18(channels, num_classes, image_size, avg_pool=True, width=width)


# ---------------------------------------------------------------------------------- VGG
class VGG11(nn.Module):
    PLAN = (1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M")

    def __init__(self, channels, num_classes, image_size, width=32):
        super().__init__()
        layers, cin, h = [], channels, min(image_size)
        for v in self.PLAN:
            if v == "M":
                if h >= 2:  # small inputs skip the last pools
                    layers.append(nn.MaxPool2d(2))
                    h //= 2
                continue
            layers += [nn.Conv2d(cin, width * v, 3, padding=1), nn.BatchNorm2d(width * v), nn.ReLU()]
            cin = width * v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def embed(self, x):
        return F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)

    def forward(self, x):
        return self.classifier(self.embed(x))


@register_model("vgg11")
def _vgg11(channels, num_classes, image_size, width=32, **_):
    return VGG11(channels, num_classes, image_size, width=width)


# ---------------------------------------------------------------------------------- MLP
class MLP(nn.Module):
    def __init__(self, channels, num_classes, image_size, width=128):
        super().__init__()
        d = channels * image_size[0] * image_size[1]
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(d, width), nn.ReLU(),
                                  nn.Linear(width, width), nn.ReLU())
        self.classifier = nn.Linear(width, num_classes)

    def embed(self, x):
        return self.body(x)

    def forward(self, x):
        return self.classifier(self.body(x))


@register_model("mlp")
def _mlp(channels, num_classes, image_size, width=128, **_):
    return MLP(channels, num_classes, image_size, width=width)


# ------------------------------------------------------------------------------- build
@torch.no_grad()
def init_parameters(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """PyTorch's default initialisation, drawn from ``generator`` (CPU) and copied in."""
    def uniform_(t: torch.Tensor, bound: float):
        t.copy_((torch.rand(t.shape, generator=generator) * 2 - 1) * bound)

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            # kaiming_uniform_(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            uniform_(m.weight, 1.0 / math.sqrt(fan_in))
            if m.bias is not None:
                uniform_(m.bias, 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0)
        elif isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)):
            if m.weight is not None:
                m.weight.fill_(1.0)
                m.bias.zero_()
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
                m.num_batches_tracked.zero_()
    return model


def has_batch_norm(model: nn.Module) -> bool:
    """Whether ``model`` normalises over the batch (its samples are not independent)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def registered(name: str) -> Callable[..., nn.Module]:
    """The registry's constructor of model ``name`` (ConfigError naming the known ones)."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r} (known: {', '.join(sorted(MODELS))})")
    return MODELS[name]


def model_skeleton(name: str, channels: int, num_classes: int, image_size: tuple[int, int],
                   **options) -> nn.Module:
    """The registry's model on the meta device: shapes only, no memory, no random numbers."""
    with torch.device("meta"):
        return registered(name)(channels, num_classes, tuple(image_size), **options)


def build_model(name: str, channels: int, num_classes: int, image_size: tuple[int, int],
                generator: torch.Generator, device: torch.device | str = "cpu",
                **options) -> nn.Module:
    """A freshly initialised model from the registry (see the module docstring)."""
    model = model_skeleton(name, channels, num_classes, image_size, **options)
    model = model.to_empty(device="cpu")
    init_parameters(model, generator)
    return model.to(device)


CONVNET_KEYS = ("depth", "width", "norm", "pooling", "act")  # model.*: ConvNet's options


def model_options(model_cfg) -> tuple[str, dict]:
    """(registry name, options) of a ``ModelConfig``. Only ConvNet takes the ConvNet options;
    another model with one of them set off its default raises ConfigError (it would ignore it)."""
    if model_cfg.name == "convnet":
        return "convnet", {k: getattr(model_cfg, k) for k in CONVNET_KEYS}
    registered(model_cfg.name)  # an unknown name first: it says more than a key would
    default = type(model_cfg)()
    for key in CONVNET_KEYS:
        if getattr(model_cfg, key) != getattr(default, key):
            raise ConfigError(f"config key 'model.{key}' applies to model.name=convnet only "
                              f"({model_cfg.name!r} would ignore it); leave it at "
                              f"{getattr(default, key)!r}")
    return model_cfg.name, {}
