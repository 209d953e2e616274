"""Explicit seeding: every random stream is a ``torch.Generator`` derived from the run seed."""
from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *tags) -> int:
    """A stable 63-bit seed from ``seed`` and tags (e.g. ``("eval", repeat)``)."""
    text = ":".join([str(seed), *map(str, tags)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def generator(seed: int, *tags) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and ``tags``."""
    return torch.Generator().manual_seed(derive_seed(seed, *tags) if tags else seed)
