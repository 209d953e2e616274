"""How much of a matching step one graph may hold: classes per chunk of trainable images (graph
with double backward) and frozen images per graph-free chunk, inside ``match.memory_budget_mb``,
from the matching network's conv activations per image."""
from __future__ import annotations

import torch
import torch.nn as nn

from . import ops
from .models import model_skeleton


def conv_floats_per_image(model_name: str, model_opts: dict, channels: int, classes: int,
                          image_size: tuple[int, int]) -> int:
    """Conv output floats per image of the matching network: one image through an uninitialised
    copy on the CPU (shapes only; the meta device would cost its ~150 MB of kernels' imports)."""
    outs = []
    net = model_skeleton(model_name, channels, classes, image_size, **model_opts)
    net = net.to_empty(device="cpu")
    for mod in net.modules():
        if isinstance(mod, nn.Conv2d):
            mod.register_forward_hook(lambda _m, _i, o: outs.append(o[0]))
    with ops.override(instance_norm_relu_pool="reference"), torch.no_grad():
        net(torch.zeros(1, channels, *image_size))
    return sum(o.numel() for o in outs)


def classes_per_chunk(m, classes: int, device: torch.device, batch: int,
                      floats_per_image: int) -> int:
    """Classes per graph chunk of ``batch`` images each: ``match.class_chunk`` when set, else
    what ``match.memory_budget_mb`` holds at ~12 live float32 copies (double backward)."""
    if m.class_chunk:
        return min(m.class_chunk, classes)
    if device.type == "cpu":
        # measured (benchmarks/bench_matching_cpu.py): one class per graph is fastest on the
        # CPU; ten live graphs cost 1.8x in page faults and cache misses
        return 1
    per_class = batch * floats_per_image * 4 * 12
    return max(1, min(classes, int(m.memory_budget_mb * 2 ** 20 // max(per_class, 1))))


def frozen_images_per_chunk(m, floats_per_image: int) -> int:
    """Frozen images per graph-free chunk, counted across classes: ``match.frozen_chunk``, and
    no more than ``match.memory_budget_mb`` holds at ~4 live float32 copies of every activation
    of an image (forward kept for the backward, its gradients; no graph)."""
    per_image = floats_per_image * 4 * 4  # bytes
    return max(1, min(m.frozen_chunk, int(m.memory_budget_mb * 2 ** 20 // max(per_image, 1))))
