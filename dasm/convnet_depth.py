"""How deep IDC's ConvNet goes on a given image size: the planes its blocks normalise, and the
depth ``model.depth: auto`` picks (read by :mod:`dasm.models` and :mod:`dasm.rules`)."""
from __future__ import annotations

IDC_DEPTH = 3  # IDC's ConvNet: three blocks
MIN_NORM_PLANE = 16  # values per channel a block normalises under depth auto (a 4x4 plane)


def first_pad(image_size: tuple[int, int]) -> int:
    """Padding of the first conv: 3 on 28x28 inputs (as IDC), else 1."""
    return 3 if tuple(image_size) == (28, 28) else 1


def block_planes(image_size: tuple[int, int], depth: int, pooling: str = "avg") -> list[tuple]:
    """``(h, w)`` of the plane each of ``depth`` ConvNet blocks convolves and normalises."""
    pad0 = first_pad(image_size)
    h, w = image_size[0] + 2 * pad0 - 2, image_size[1] + 2 * pad0 - 2
    planes = []
    for _ in range(depth):
        planes.append((h, w))
        if pooling != "none":
            h, w = h // 2, w // 2
    return planes


def auto_depth(image_size: tuple[int, int], pooling: str = "avg") -> int:
    """``model.depth: auto``: IDC's three blocks, less those whose plane would hold fewer than
    :data:`MIN_NORM_PLANE` values to normalise: 3 on 28x28 and 32x32 (planes 32, 16, 8), 2 on
    8x8 (8, 4; a third block would normalise 2x2). An instance norm of a 2x2 plane makes the
    matching loss so curved in the images that the image step climbs it
    (results/digits-depth.json)."""
    planes = block_planes(image_size, IDC_DEPTH, pooling)
    return max(1, sum(1 for h, w in planes if h * w >= MIN_NORM_PLANE))
