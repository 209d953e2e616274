"""Every random choice of one matching step, drawn before any gradient so that both engines
(batched and IDC's loop) consume the same ones: real indices from each class's pool, the
synthetic and frozen selections, and one siamese DSA draw per class.

On the CPU the draws come from the run's generator (the stream CPU runs have always had). On a
GPU they come from a generator on the device, seeded from the run's generator at each segment's
start, and every index tensor is made there: a step then does no host work and copies nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import dsa as dsa_ops
from .plan import synthetic_batch


@dataclass
class StepDraws:
    """Every random choice of one matching step, drawn before any gradient (engine-independent)."""

    real: torch.Tensor  # [C, Br] indices into the dataset's training images
    syn: torch.Tensor  # [C, Bt] decoded indices into the class's trainable images
    frozen: torch.Tensor | None  # [C, Bf] decoded indices into the class's frozen images
    dsa: dsa_ops.DSAParams  # [C] one siamese draw per class
    factor: int = 1  # of the trainable images (their decoded index space)
    frozen_factor: int = 1  # of the frozen images as passed to the step


class StepDrawer:
    """Draws :class:`StepDraws` for ``C`` classes from the ``match`` settings ``m``, the siamese
    DSA ``strategy`` and the run's ``generator``; ``on_device`` (a CUDA ``device``) draws them on
    the device (:meth:`reseed` once per segment)."""

    def __init__(self, m, C: int, strategy, image_size: tuple[int, int],
                 generator: torch.Generator, device: torch.device):
        self.m, self.C, self.strategy, self.image_size = m, C, strategy, image_size
        self.gen, self.device = generator, device
        self.on_device = device.type == "cuda"
        self.device_gen: torch.Generator | None = None
        self._pool_table: tuple | None = None  # (pools, [C, L] indices, [C, L] padding)

    def reseed(self, device=None) -> None:
        """With ``on_device``: a fresh generator on ``device`` (default: the drawer's) seeded
        from one draw of the run's generator; without, nothing (the run's generator untouched)."""
        if self.on_device:
            seed = int(torch.randint(2 ** 62, (), generator=self.gen))
            self.device_gen = torch.Generator(device=device or self.device).manual_seed(seed)

    def draw(self, pools: list[torch.Tensor], n_train: int, n_frozen: int, f: int,
             ff: int) -> StepDraws:
        """Real indices from each class's pool, synthetic and frozen selections, DSA draws:
        ``n_train`` trainable images per class at factor ``f`` and ``n_frozen`` frozen ones at
        factor ``ff``."""
        C, g = self.C, self.gen
        br = min(self.m.batch_real, min(len(p) for p in pools))
        if self.on_device:
            return self._draw_on_device(pools, br, n_train, n_frozen, f, ff)
        real = torch.stack([p[torch.randperm(len(p), generator=g)[:br]] for p in pools])
        bt, bf = synthetic_batch(self.m, n_train * f * f, n_frozen * ff * ff)
        syn = torch.stack([torch.randperm(n_train * f * f, generator=g)[:bt] for _ in range(C)])
        frozen = None
        if n_frozen:
            frozen = torch.stack([torch.randperm(n_frozen * ff * ff, generator=g)[:bf]
                                  for _ in range(C)])
        dsa = dsa_ops.draw(self.strategy, C, self.image_size, g)
        return StepDraws(real, syn, frozen, dsa, f, ff)

    def _draw_on_device(self, pools, br: int, n_train: int, n_frozen: int, f: int,
                        ff: int) -> StepDraws:
        """:meth:`draw` from ``device_gen``, every tensor made on its device: a uniform random
        subset in random order is the ``k`` smallest of i.i.d. uniform keys, so each index set
        is one ``rand`` and one ``topk`` for all classes (pools padded to ``[C, L]`` once per
        list of pools, the padding keyed past every real key)."""
        if self.device_gen is None:
            self.reseed()
        g, C = self.device_gen, self.C
        dev = g.device
        if self._pool_table is None or self._pool_table[0] is not pools:
            L = max(len(p) for p in pools)
            table = torch.zeros(C, L, dtype=torch.int64)
            pad = torch.ones(C, L, dtype=torch.bool)
            for c, p in enumerate(pools):
                table[c, :len(p)], pad[c, :len(p)] = p.cpu(), False
            self._pool_table = (pools, table.to(dev), pad.to(dev))
        _, table, pad = self._pool_table

        def first(keys: torch.Tensor, k: int) -> torch.Tensor:
            return keys.topk(k, dim=1, largest=False).indices

        keys = torch.rand(table.shape, generator=g, device=dev).masked_fill_(pad, 2.0)
        real = table.gather(1, first(keys, br))
        bt, bf = synthetic_batch(self.m, n_train * f * f, n_frozen * ff * ff)
        syn = first(torch.rand(C, n_train * f * f, generator=g, device=dev), bt)
        frozen = first(torch.rand(C, n_frozen * ff * ff, generator=g, device=dev), bf) \
            if n_frozen else None
        dsa = dsa_ops.draw(self.strategy, C, self.image_size, g)
        return StepDraws(real, syn, frozen, dsa, f, ff)
