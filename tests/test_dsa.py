"""DSA ops against their formulas; siamese and per-sample draws; the composed form."""
import math

import pytest
import torch

from dasm import dsa
from dasm.dsa import Strategy
from dasm.errors import ConfigError


def test_strategy_parse_and_errors():
    st = Strategy.parse("color_crop_cutout_flip_scale_rotate")
    assert st.flip and st.color and st.cutout and st.geometric == ("crop", "scale", "rotate")
    assert str(st.without("cutout", "flip")) == "color_crop_scale_rotate"
    assert not Strategy.parse("none").enabled
    with pytest.raises(ConfigError, match="unknown DSA op 'blur'"):
        Strategy.parse("color_blur")


def test_colour_ops_formulas():
    x = torch.tensor([[[[1.0, 2.0]], [[3.0, 6.0]]]])  # [1, 2 channels, 1, 2]
    torch.testing.assert_close(dsa.brightness(x, torch.tensor([0.25])), x + 0.25)
    s = torch.tensor([0.5])
    mc = x.mean(dim=1, keepdim=True)  # per-pixel channel mean: [2, 4]
    torch.testing.assert_close(dsa.saturation(x, s), (x - mc) * 0.5 + mc)
    assert dsa.saturation(x, s)[0, 0, 0, 0].item() == pytest.approx((1 - 2) * 0.5 + 2)
    c = torch.tensor([1.5])
    m = x.mean().item()  # the image mean, 3
    assert m == 3.0
    assert dsa.contrast(x, c)[0, 1, 0, 1].item() == pytest.approx((6 - m) * 1.5 + m)


def test_crop_shifts_with_zero_fill():
    x = torch.arange(9.0).view(1, 1, 3, 3) + 1
    out = dsa.crop(x, torch.tensor([[1, -1]]))  # out[i, j] = x[i + 1, j - 1]
    want = torch.tensor([[0.0, 4, 5], [0, 7, 8], [0, 0, 0]])
    torch.testing.assert_close(out[0, 0], want)


def test_cutout_square_and_sizes():
    assert dsa.cutout_size(28) == 14 and dsa.crop_shift(28) == 4
    p = dsa.draw(Strategy(cutout=True), 1, (4, 4), torch.Generator().manual_seed(0))
    p.cut_center[:] = torch.tensor([[1, 3]])  # size 2: rows [0, 2), cols [2, 4)
    out = dsa.cutout(torch.ones(1, 1, 4, 4), p)
    want = torch.ones(4, 4)
    want[0:2, 2:4] = 0
    torch.testing.assert_close(out[0, 0], want)


def test_flip_rotate_scale():
    x = torch.randn(2, 1, 5, 5)
    torch.testing.assert_close(dsa.flip(x, torch.tensor([True, False])),
                               torch.stack([x[0].flip(2), x[1]]))
    rot = dsa.rotate(x, torch.tensor([math.pi / 2, 0.0]))
    torch.testing.assert_close(rot[0], torch.rot90(x[0], 1, dims=(1, 2)), atol=1e-5, rtol=0)
    torch.testing.assert_close(rot[1], x[1], atol=1e-5, rtol=0)
    # scale 2 in x: output column x samples input column ((2x+1)/W - 1) * 2 ... at the centre row
    sc = dsa.scale(torch.arange(5.0).view(1, 1, 1, 5).expand(1, 1, 5, 5).contiguous(),
                       torch.tensor([[0.5, 1.0]]))
    # sx = 0.5 zooms in: output pixel 0 samples input position ((0.5 * (1/5 - 1)) + 1) * 5/2 - 1/2
    src = ((0.5 * (1 / 5 - 1)) + 1) * 5 / 2 - 0.5
    assert sc[0, 0, 2, 0].item() == pytest.approx(src, abs=1e-5)


def bilinear_zeros(img: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Independent bilinear sampler with zero padding: img [ch, H, W], positions [H, W]."""
    ch, H, W = img.shape
    x0, y0 = xs.floor(), ys.floor()
    out = torch.zeros(ch, *xs.shape)
    for dx in (0, 1):
        for dy in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            w = (1 - (xs - xi).abs()) * (1 - (ys - yi).abs())
            ok = (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H)
            v = img[:, yi.clamp(0, H - 1).long(), xi.clamp(0, W - 1).long()]
            out += v * (w * ok)
    return out


@pytest.mark.parametrize("size", [(8, 8), (7, 9)])
def test_composed_form_equals_reference(size):
    """pixel_affine + colour_coefficients reproduce apply_reference (what the kernel fuses)."""
    H, W = size
    g = torch.Generator().manual_seed(1)
    st = Strategy.parse("color_crop_cutout_flip_scale_rotate")
    p = dsa.draw(st, 12, size, g)
    x = torch.randn(12, 3, H, W, generator=g)
    ref = dsa.apply_reference(x, p)
    A = p.pixel_affine()
    cc = p.colour_coefficients()
    lo, hi = p.cutout_box()
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32),
                            torch.arange(W, dtype=torch.float32), indexing="ij")
    for m in range(12):
        a, b, s, k = cc[m]
        y = a * x[m] + b * x[m].mean(0, keepdim=True) + s + k * x[m].mean()
        sx = A[m, 0, 0] * xx + A[m, 0, 1] * yy + A[m, 0, 2]
        sy = A[m, 1, 0] * xx + A[m, 1, 1] * yy + A[m, 1, 2]
        out = bilinear_zeros(y, sx, sy)
        cut = (yy >= lo[m, 0]) & (yy < hi[m, 0]) & (xx >= lo[m, 1]) & (xx < hi[m, 1])
        out = out * (~cut)
        torch.testing.assert_close(out, ref[m], atol=2e-5, rtol=1e-4)


def test_siamese_and_per_sample_draws():
    st = Strategy.parse("color_crop_cutout_flip_scale_rotate")
    g = torch.Generator().manual_seed(0)
    p = dsa.draw_siamese(st, [3, 4], (28, 28), g)
    for name in dsa.DSAParams._TENSORS:
        t = getattr(p, name)
        assert torch.equal(t[0], t[2]) and torch.equal(t[3], t[6])
    # real and synthetic images of a class take the same rows: same image -> same output
    img = torch.randn(1, 1, 28, 28)
    two = dsa.apply_reference(img.expand(2, -1, -1, -1), p.index(torch.tensor([0, 2])))
    torch.testing.assert_close(two[0], two[1])
    q = dsa.draw(st, 64, (28, 28), g)
    assert len(set(q.brightness.tolist())) == 64 and len(set(q.angle.tolist())) > 1


def test_same_generator_state_same_draw():
    st = Strategy.parse("color_crop_cutout")
    a = dsa.draw(st, 5, (28, 28), torch.Generator().manual_seed(7))
    b = dsa.draw(st, 5, (28, 28), torch.Generator().manual_seed(7))
    assert all(torch.equal(getattr(a, n), getattr(b, n)) for n in dsa.DSAParams._TENSORS)


def test_cutmix_box_and_lambda():
    """The pasted box comes from the permuted batch, is a rectangle, and lam is the share of
    pixels left in place."""
    x = torch.arange(4 * 64.0).view(4, 1, 8, 8)  # every pixel of every image differs
    mixed_any = False
    for seed in range(6):
        mixed, perm, lam = dsa.cutmix(x, torch.Generator().manual_seed(seed))
        assert 0.0 <= lam <= 1.0
        box = None
        for i in range(4):
            changed = mixed[i, 0] != x[i, 0]
            if perm[i] == i:
                assert not changed.any()
                continue
            box = changed if box is None else box
            assert torch.equal(changed, box)  # one box for the whole batch
            assert torch.equal(mixed[i, 0][changed], x[perm[i], 0][changed])
            assert changed.sum().item() == round((1 - lam) * 64)
            rows, cols = changed.any(1).nonzero(), changed.any(0).nonzero()
            assert changed.sum().item() == len(rows) * len(cols)  # a rectangle
            mixed_any |= bool(changed.any())
    assert mixed_any
