"""The ConvNet's depth: ``model.depth: auto`` keeps every block's normalised plane at 4x4 or more
(results/digits-depth.json: on 8x8 digits a third block normalised 2x2 and the image step
climbed the matching loss it descends)."""
import pytest
import torch

from dasm.config import Config
from dasm.convnet_depth import MIN_NORM_PLANE, block_planes
from dasm.models import ConvNet
from dasm.rules import resolve


def _normalised_planes(model: ConvNet, image_size) -> list[tuple[int, int]]:
    """``(h, w)`` each block's norm sees, read off the network's activations (not its rule)."""
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[-2:])))
             for b in model.features]
    model(torch.zeros(1, 1, *image_size))
    for h in hooks:
        h.remove()
    return [(h + 2 * (b.conv.padding[0]) - 2, w + 2 * (b.conv.padding[0]) - 2)
            for (h, w), b in zip(seen, model.features)]


@pytest.mark.parametrize("size, blocks", [(8, 2), (12, 2), (16, 3), (28, 3), (32, 3)])
def test_auto_depth_normalises_no_plane_under_4x4(size, blocks):
    cfg = resolve(Config(), "digits" if size == 8 else "imagefolder:x", (size, size), False)
    assert cfg.model.depth == blocks  # the saved config says what ran
    model = ConvNet(1, 10, (size, size), depth="auto", width=4)
    planes = _normalised_planes(model, (size, size))
    assert len(planes) == blocks
    assert min(h * w for h, w in planes) >= MIN_NORM_PLANE
    assert planes == block_planes((size, size), blocks)


def test_an_explicit_depth_is_used_as_given():
    """Depth 3 on 8x8 is what ran before the rule, and what a user who asks for it gets: its
    last block normalises a 2x2 plane (the rule is not a no-op there)."""
    model = ConvNet(1, 10, (8, 8), depth=3, width=4)
    assert _normalised_planes(model, (8, 8))[-1] == (2, 2)
    assert resolve(Config().replace(**{"model.depth": 3}), "digits", (8, 8), False).model.depth == 3
