"""Multi-formation geometry (IDC): a stored ``H x W`` image holds ``f x f`` row-major tiles of
size ``ceil(H/f) x ceil(W/f)``, each decoded to a full ``H x W`` training image. A leaf module,
shared by the reference decode, the Triton kernel and the synthetic set's init."""
from __future__ import annotations


def tile_shape(size: tuple[int, int], factor: int) -> tuple[int, int]:
    """``(ceil(H / f), ceil(W / f))`` of ``size = (H, W)``."""
    return -(-size[0] // factor), -(-size[1] // factor)
