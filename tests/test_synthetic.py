"""Synthetic set: mix init placement, save/load, corrupt files."""
import json

import pytest
import torch

from dasm.errors import RunDirError
from dasm.synthetic import SyntheticSet, init_mix


def test_mix_init_places_real_images_by_design():
    C, n, f = 2, 3, 2
    # real image k of class c is the constant (c * 100 + k) / 1000
    values = torch.tensor([[c * 100 + k for k in range(n * f * f)] for c in range(C)]) / 1000.0
    real = values.view(C, n * f * f, 1, 1, 1).expand(C, n * f * f, 1, 28, 28)
    out = init_mix(real, f)
    assert out.shape == (C, n, 1, 28, 28)
    for c in range(C):
        for m in range(n):
            for t in range(f * f):
                i, j = divmod(t, f)
                tile = out[c, m, 0, 14 * i:14 * i + 14, 14 * j:14 * j + 14]
                assert torch.all(tile == values[c, t * n + m]), (c, m, t)


def test_mix_init_shrinks_nearest_and_crops_overhang():
    real = torch.arange(4 * 49.0).view(1, 4, 1, 7, 7)  # n = 1, f = 2, tiles 4x4 on a 7x7 image
    out = init_mix(real, 2)
    small = torch.nn.functional.interpolate(real[0, 3:4], size=(4, 4), mode="nearest")
    torch.testing.assert_close(out[0, 0, 0, 4:, 4:], small[0, 0, :3, :3])


def test_save_load_round_trip(tmp_path):
    images = torch.rand(3, 4, 1, 8, 8)
    s = SyntheticSet(images, 2, [1, 3], "digits", ["a", "b", "c"], (0.5,), (0.25,),
                     {"method": "dasm", "seed": "3"})
    s.save(tmp_path / "s.safetensors")
    t = SyntheticSet.load(tmp_path / "s.safetensors")
    assert torch.equal(t.images, images)
    assert (t.factor, t.segment_sizes, t.dataset, t.classes, t.mean, t.std) == \
        (2, [1, 3], "digits", ["a", "b", "c"], (0.5,), (0.25,))
    assert t.extra["method"] == "dasm" and t.extra["seed"] == "3"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        meta = f.metadata()
        assert f.get_tensor("segment").tolist() == [0, 1, 1, 1] * 3
        assert f.get_tensor("labels").tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert json.loads(meta["image_size"]) == [8, 8] and meta["version"]


def test_decoded_labels_and_count():
    s = SyntheticSet(torch.rand(2, 3, 1, 8, 8), 2, [3])
    x, y = s.decoded()
    assert x.shape == (24, 1, 8, 8) and y.tolist() == [0] * 12 + [1] * 12


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign"])
def test_corrupt_files_are_clear_errors(tmp_path, damage):
    path = tmp_path / "synthetic.safetensors"
    SyntheticSet(torch.rand(2, 2, 1, 4, 4), 1, [2]).save(path)
    raw = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"not a safetensors file at all")
    elif damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    else:
        from safetensors.torch import save_file
        save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(RunDirError, match="corrupt|not a dasm synthetic set"):
        SyntheticSet.load(path)
