"""Fused decode + normalise + DSA (Triton), forward and backward.

For output sample ``m`` (a tile ``t`` of stored image ``n``) and pixel ``p``::

    D(c, r)   bilinear upsample (align_corners=False) of the tile to H x W     (decode)
    X(c, r)   (D - mean_c) / std_c                                             (normalise)
    Y(c, r)   alpha X + beta mean_ch(X) + shift + kmean * mu_m                  (colour ops)
    out(c, p) sum over the 4 corners r of A p: bilinear weight * Y(c, r),       (flip + geometric
              zero outside the image; 0 inside the cutout box                    + cutout)

with ``A`` the per-sample pixel affine of :meth:`dasm.dsa.DSAParams.pixel_affine` and
``mu_m`` the mean of ``X`` over the whole decoded image (a pre-pass). Both resamplings are
composed exactly (nothing is approximated). The backward gathers instead of scattering, so it is
deterministic without atomics: kernel 1 collects ``dL/dY`` for each pixel from the output pixels
whose sample point lies within one pixel (a window around ``A^-1 r``), kernel 2 collects the tile
gradient through the colour ops, normalisation and the upsample; repeated tiles in ``sel`` are
summed by ``index_put_(accumulate=True)``.
"""
import functools

import torch
import triton
import triton.language as tl

from dasm.formation import tile_shape

WINDOW = 3  # backward gathers output pixels within +-3 of A^-1 r (DSA needs +-1.5)
MAX_EXTENT = WINDOW - 0.5


@triton.jit
def _decoded(stored_ptr, base_n, ch_off, cmask, qy, qx, ti, tj, H, W, TH, TW, scale_h, scale_w,
             F: tl.constexpr):
    """Decoded value D at pixels (qy, qx) [1, BLOCK], for the channel offsets ch_off [CHP, 1];
    the padded channels (``cmask`` false) load nothing (they would read past the last image)."""
    if F == 1:
        return tl.load(stored_ptr + base_n + ch_off + qy * W + qx, mask=cmask, other=0.0)
    sr = tl.maximum((qy.to(tl.float32) + 0.5) * scale_h - 0.5, 0.0)
    sc = tl.maximum((qx.to(tl.float32) + 0.5) * scale_w - 0.5, 0.0)
    r0 = sr.to(tl.int32)
    c0 = sc.to(tl.int32)
    lr = sr - r0.to(tl.float32)
    lc = sc - c0.to(tl.float32)
    r1 = tl.minimum(r0 + 1, TH - 1)
    c1 = tl.minimum(c0 + 1, TW - 1)
    R0 = ti * TH + r0
    R1 = ti * TH + r1
    C0 = tj * TW + c0
    C1 = tj * TW + c1
    v00 = tl.load(stored_ptr + base_n + ch_off + R0 * W + C0, mask=cmask & (R0 < H) & (C0 < W),
                  other=0.5)
    v01 = tl.load(stored_ptr + base_n + ch_off + R0 * W + C1, mask=cmask & (R0 < H) & (C1 < W),
                  other=0.5)
    v10 = tl.load(stored_ptr + base_n + ch_off + R1 * W + C0, mask=cmask & (R1 < H) & (C0 < W),
                  other=0.5)
    v11 = tl.load(stored_ptr + base_n + ch_off + R1 * W + C1, mask=cmask & (R1 < H) & (C1 < W),
                  other=0.5)
    return (1 - lr) * ((1 - lc) * v00 + lc * v01) + lr * ((1 - lc) * v10 + lc * v11)


@triton.jit
def _source(sel_ptr, m, mean_ptr, std_ptr, H, W, CH: tl.constexpr, CHP: tl.constexpr,
            F: tl.constexpr):
    """Where output sample m decodes from (base offset of its stored image, tile row and column)
    and its channels' indices, mask and normalisation ([CHP, 1] each)."""
    sel = tl.load(sel_ptr + m)
    t = sel % (F * F)
    cidx = tl.arange(0, CHP)[:, None]
    cmask = cidx < CH
    mean = tl.load(mean_ptr + cidx, mask=cmask, other=0.0)
    inv_std = 1.0 / tl.load(std_ptr + cidx, mask=cmask, other=1.0)
    return (sel // (F * F)) * CH * H * W, t // F, t % F, cidx, cmask, mean, inv_std


@triton.jit
def _affine(prm, offset: tl.constexpr):
    """Six coefficients of a 2 x 3 affine stored at prm + offset."""
    return (tl.load(prm + offset), tl.load(prm + offset + 1), tl.load(prm + offset + 2),
            tl.load(prm + offset + 3), tl.load(prm + offset + 4), tl.load(prm + offset + 5))


@triton.jit
def _mean_kernel(stored_ptr, sel_ptr, mean_ptr, std_ptr, mu_ptr, H, W, TH, TW, scale_h, scale_w,
                 CH: tl.constexpr, CHP: tl.constexpr, F: tl.constexpr, BLOCK: tl.constexpr):
    """mu_m = mean over channels and pixels of the normalised decoded image."""
    m = tl.program_id(0)
    base_n, ti, tj, cidx, cmask, mean, inv_std = _source(sel_ptr, m, mean_ptr, std_ptr, H, W, CH,
                                                         CHP, F)
    acc = tl.zeros([CHP, BLOCK], tl.float32)
    for p0 in range(0, H * W, BLOCK):
        pix = p0 + tl.arange(0, BLOCK)[None, :]
        pm = pix < H * W
        qy = tl.where(pm, pix // W, 0)
        qx = tl.where(pm, pix % W, 0)
        d = _decoded(stored_ptr, base_n, cidx * H * W, cmask, qy, qx, ti, tj, H, W, TH, TW,
                     scale_h, scale_w, F)
        acc += tl.where(cmask & pm, (d - mean) * inv_std, 0.0)
    tl.store(mu_ptr + m, tl.sum(tl.sum(acc, axis=1), axis=0) / (CH * H * W))


@triton.jit
def _forward_kernel(stored_ptr, sel_ptr, prm_ptr, box_ptr, mean_ptr, std_ptr, mu_ptr, out_ptr,
                    H, W, TH, TW, scale_h, scale_w, CH: tl.constexpr, CHP: tl.constexpr,
                    F: tl.constexpr, COLOR: tl.constexpr, BLOCK: tl.constexpr):
    m = tl.program_id(0)
    pix = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)[None, :]
    pmask = pix < H * W
    oy = pix // W
    ox = pix % W
    prm = prm_ptr + m * 16
    a00, a01, a02, a10, a11, a12 = _affine(prm, 0)
    sx = a00 * ox.to(tl.float32) + a01 * oy.to(tl.float32) + a02
    sy = a10 * ox.to(tl.float32) + a11 * oy.to(tl.float32) + a12
    x0 = tl.floor(sx)
    y0 = tl.floor(sy)
    base_n, ti, tj, cidx, cmask, mean, inv_std = _source(sel_ptr, m, mean_ptr, std_ptr, H, W, CH,
                                                         CHP, F)
    acc = tl.zeros([CHP, BLOCK], tl.float32)
    if COLOR:
        alpha = tl.load(prm + 12)
        beta = tl.load(prm + 13)
        shift = tl.load(prm + 14) + tl.load(prm + 15) * tl.load(mu_ptr + m)
    for dy in tl.static_range(2):
        for dx in tl.static_range(2):
            qx = x0 + dx
            qy = y0 + dy
            w = (1.0 - tl.abs(sx - qx)) * (1.0 - tl.abs(sy - qy))
            inb = (qx >= 0) & (qx < W) & (qy >= 0) & (qy < H) & pmask
            qxi = tl.where(inb, qx, 0.0).to(tl.int32)
            qyi = tl.where(inb, qy, 0.0).to(tl.int32)
            d = _decoded(stored_ptr, base_n, cidx * H * W, cmask, qyi, qxi, ti, tj, H, W, TH,
                         TW, scale_h, scale_w, F)
            x = tl.where(cmask, (d - mean) * inv_std, 0.0)
            if COLOR:
                x = alpha * x + beta * (tl.sum(x, axis=0)[None, :] / CH) + shift
            acc += tl.where(inb, w, 0.0) * x
    r0 = tl.load(box_ptr + m * 4)
    c0 = tl.load(box_ptr + m * 4 + 1)
    r1 = tl.load(box_ptr + m * 4 + 2)
    c1 = tl.load(box_ptr + m * 4 + 3)
    cut = (oy >= r0) & (oy < r1) & (ox >= c0) & (ox < c1)
    out = tl.where(cut, 0.0, acc)
    tl.store(out_ptr + m.to(tl.int64) * CH * H * W + cidx * H * W + pix, out, mask=cmask & pmask)


@triton.jit
def _grad_y_kernel(gout_ptr, prm_ptr, box_ptr, gy_ptr, H, W, CH: tl.constexpr,
                   CHP: tl.constexpr, WIN: tl.constexpr, BLOCK: tl.constexpr):
    """dL/dY(c, r): sum of g(c, p) * w(p -> r) over output pixels p near A^-1 r."""
    m = tl.program_id(0)
    pix = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)[None, :]
    pmask = pix < H * W
    ry = (pix // W).to(tl.float32)
    rx = (pix % W).to(tl.float32)
    prm = prm_ptr + m * 16
    a00, a01, a02, a10, a11, a12 = _affine(prm, 0)
    i00, i01, i02, i10, i11, i12 = _affine(prm, 6)
    cx = tl.floor(i00 * rx + i01 * ry + i02 + 0.5)
    cy = tl.floor(i10 * rx + i11 * ry + i12 + 0.5)
    b0 = tl.load(box_ptr + m * 4)
    b1 = tl.load(box_ptr + m * 4 + 1)
    b2 = tl.load(box_ptr + m * 4 + 2)
    b3 = tl.load(box_ptr + m * 4 + 3)
    cidx = tl.arange(0, CHP)[:, None]
    cmask = cidx < CH
    gbase = gout_ptr + m.to(tl.int64) * CH * H * W + cidx * H * W
    acc = tl.zeros([CHP, BLOCK], tl.float32)
    for ky in tl.static_range(2 * WIN + 1):
        for kx in tl.static_range(2 * WIN + 1):
            px = cx + (kx - WIN)
            py = cy + (ky - WIN)
            sx = a00 * px + a01 * py + a02
            sy = a10 * px + a11 * py + a12
            w = tl.maximum(1.0 - tl.abs(sx - rx), 0.0) * tl.maximum(1.0 - tl.abs(sy - ry), 0.0)
            pxi = px.to(tl.int32)
            pyi = py.to(tl.int32)
            cut = (pyi >= b0) & (pyi < b2) & (pxi >= b1) & (pxi < b3)
            ok = (px >= 0) & (px < W) & (py >= 0) & (py < H) & pmask & (~cut) & (w > 0)
            off = tl.where(ok, pyi * W + pxi, 0)
            g = tl.load(gbase + off, mask=cmask & ok, other=0.0)
            acc += g * w
    tl.store(gy_ptr + m.to(tl.int64) * CH * H * W + cidx * H * W + pix, acc, mask=cmask & pmask)


@triton.jit
def _upsample_weight(dst, src, scale, T, N):
    """Weight with which output row (or column) ``dst`` < N of the bilinear upsample
    (align_corners=False) reads tile row ``src`` of T; the same arithmetic as the forward."""
    s = tl.maximum((dst.to(tl.float32) + 0.5) * scale - 0.5, 0.0)
    i0 = s.to(tl.int32)
    lam = s - i0.to(tl.float32)
    i1 = tl.minimum(i0 + 1, T - 1)
    w = tl.where(i0 == src, 1.0 - lam, 0.0) + tl.where(i1 == src, lam, 0.0)
    return tl.where(dst < N, w, 0.0)


@triton.jit
def _grad_tile_kernel(gy_ptr, sel_ptr, prm_ptr, gsum_ptr, std_ptr, gt_ptr, H, W, TH, TW,
                      scale_h, scale_w, CH: tl.constexpr, CHP: tl.constexpr, F: tl.constexpr,
                      COLOR: tl.constexpr, RW: tl.constexpr, BLOCK: tl.constexpr):
    """Tile gradient: dL/dY through the colour ops, normalisation and the upsample."""
    m = tl.program_id(0)
    tp = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)[None, :]
    tmask = tp < TH * TW
    a = tp // TW
    b = tp % TW
    cidx = tl.arange(0, CHP)[:, None]
    cmask = cidx < CH
    inv_std = 1.0 / tl.load(std_ptr + cidx, mask=cmask, other=1.0)
    gbase = gy_ptr + m.to(tl.int64) * CH * H * W + cidx * H * W
    if COLOR:
        prm = prm_ptr + m * 16
        alpha = tl.load(prm + 12)
        beta = tl.load(prm + 13)
        const = tl.load(prm + 15) * tl.load(gsum_ptr + m) / (CH * H * W)
    acc = tl.zeros([CHP, BLOCK], tl.float32)
    if F == 1:
        g = tl.load(gbase + a * W + b, mask=cmask & tmask, other=0.0)
        if COLOR:
            g = alpha * g + beta * (tl.sum(g, axis=0)[None, :] / CH) + const
        acc = g * inv_std
    else:
        # output rows r whose upsample reads tile row a start near (a - 0.5) / scale - 0.5
        r_start = tl.maximum(((a.to(tl.float32) - 0.5) / scale_h - 0.5).to(tl.int32) - 1, 0)
        c_start = tl.maximum(((b.to(tl.float32) - 0.5) / scale_w - 0.5).to(tl.int32) - 1, 0)
        for i in tl.static_range(RW):
            r = r_start + i
            wr = _upsample_weight(r, a, scale_h, TH, H)
            for j in tl.static_range(RW):
                q = c_start + j
                w = wr * _upsample_weight(q, b, scale_w, TW, W)
                ok = tmask & (w != 0.0)
                g = tl.load(gbase + tl.where(ok, r * W + q, 0), mask=cmask & ok, other=0.0)
                if COLOR:
                    g = alpha * g + beta * (tl.sum(g, axis=0)[None, :] / CH) + \
                        tl.where(ok, const, 0.0)
                acc += w * g
        acc = acc * inv_std
    tl.store(gt_ptr + m.to(tl.int64) * CH * TH * TW + cidx * TH * TW + tp, acc,
             mask=cmask & tmask)


@functools.lru_cache(maxsize=4)
def _identity_row(device: torch.device) -> torch.Tensor:
    """``[16]`` parameters of no augmentation (A = A^-1 = identity, colour alpha 1), made once
    per device (a host constant copied to a GPU on every call would wait for it)."""
    row = torch.zeros(16)
    row[[0, 4, 6, 10, 12]] = 1.0
    return row.to(device)


def _pack(params, M, device):
    """Per-sample parameters: [M, 16] float32 (A, A^-1, colour) and [M, 4] int32 cutout box,
    computed where ``params`` live (best: the CPU, as drawn) and copied to ``device`` once."""
    if params is None or not params.strategy.enabled:
        prm = _identity_row(torch.device(device)).expand(M, 16).clone()
        box = torch.zeros(M, 4, dtype=torch.int32, device=device)
        return prm, box, False
    A = params.pixel_affine()  # [M, 2, 3], on the parameters' device
    a, b, c, d = (A[:, i, j].double() for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)))
    det = a * d - b * c
    inv = torch.stack([torch.stack([d, -b], 1), torch.stack([-c, a], 1)], 1) / det.view(-1, 1, 1)
    tinv = -(inv @ A[:, :, 2:].double())
    Ainv = torch.cat([inv, tinv], dim=2).float()
    # checked where the parameters live on the host (no synchronisation); a device assert would
    # kill the CUDA context, so parameters on a GPU (the matcher's device draws) are not checked:
    # dsa.draw's ranges bound the extent by 1.23 (scale 1.2, rotation 15 degrees)
    if Ainv.device.type == "cpu" and float(Ainv[:, :, :2].abs().sum(2).max()) > MAX_EXTENT:
        raise ValueError(f"decode_augment (triton): a geometric transform shrinks by more than "
                         f"{MAX_EXTENT}x; use the reference backend")
    lo, hi = params.cutout_box()
    prm = torch.cat([A.reshape(M, 6), Ainv.reshape(M, 6), params.colour_coefficients()],
                    dim=1).float()
    box = torch.cat([lo, hi], dim=1).to(torch.int32)
    return (prm.to(device).contiguous(), box.to(device).contiguous(),
            bool(params.strategy.color))


class _DecodeAugment(torch.autograd.Function):
    @staticmethod
    def forward(ctx, stored, sel, factor, prm, box, color, mean, std):
        N, CH, H, W = stored.shape
        M = sel.shape[0]
        TH, TW = tile_shape((H, W), factor)
        geo = dict(H=H, W=W, TH=TH, TW=TW, scale_h=TH / H, scale_w=TW / W)
        CHP = triton.next_power_of_2(CH)
        block = max(16, min(256, triton.next_power_of_2(H * W)))
        mu = torch.zeros(M, device=stored.device, dtype=torch.float32)
        if color:
            _mean_kernel[(M,)](stored, sel, mean, std, mu, **geo, CH=CH, CHP=CHP, F=factor,
                               BLOCK=block)
        out = torch.empty(M, CH, H, W, device=stored.device, dtype=torch.float32)
        _forward_kernel[(M, triton.cdiv(H * W, block))](
            stored, sel, prm, box, mean, std, mu, out, **geo, CH=CH, CHP=CHP, F=factor,
            COLOR=color, BLOCK=block)
        ctx.save_for_backward(sel, prm, box, std)
        ctx.meta = (N, CH, H, W, factor, color, geo, CHP, block)
        return out

    @staticmethod
    def backward(ctx, gout):
        if not ctx.needs_input_grad[0]:
            return (None,) * 8
        sel, prm, box, std = ctx.saved_tensors
        N, CH, H, W, factor, color, geo, CHP, block = ctx.meta
        M = sel.shape[0]
        gout = gout.float().contiguous()
        gy = torch.empty_like(gout)
        _grad_y_kernel[(M, triton.cdiv(H * W, block))](gout, prm, box, gy, H, W, CH=CH, CHP=CHP,
                                                       WIN=WINDOW, BLOCK=block)
        gsum = gy.sum(dim=(1, 2, 3)) if color else gy.new_zeros(M)
        TH, TW = geo["TH"], geo["TW"]
        gt = torch.empty(M, CH, TH, TW, device=gout.device, dtype=torch.float32)
        tblock = max(16, min(256, triton.next_power_of_2(TH * TW)))
        _grad_tile_kernel[(M, triton.cdiv(TH * TW, tblock))](
            gy, sel, prm, gsum, std, gt, **geo, CH=CH, CHP=CHP, F=factor, COLOR=color,
            RW=2 * factor + 4, BLOCK=tblock)
        f2 = factor * factor
        tiles = torch.zeros(N * f2, CH, TH, TW, device=gout.device, dtype=torch.float32)
        tiles.index_put_((sel,), gt, accumulate=True)
        grad = tiles.view(N, factor, factor, CH, TH, TW).permute(0, 3, 1, 4, 2, 5)
        grad = grad.reshape(N, CH, factor * TH, factor * TW)[:, :, :H, :W]
        return grad.contiguous(), None, None, None, None, None, None, None


def decode_augment(stored, factor=1, sel=None, params=None, mean=None, std=None):
    """See :func:`dasm.ops.decode_augment`."""
    N, CH, H, W = stored.shape
    device = stored.device
    if sel is None:
        sel = torch.arange(N * factor * factor, device=device)
    sel = sel.to(device=device, dtype=torch.int64).contiguous()
    mean = torch.zeros(CH, device=device) if mean is None else mean.float().contiguous()
    std = torch.ones(CH, device=device) if std is None else std.float().contiguous()
    prm, box, color = _pack(params, sel.shape[0], device)
    return _DecodeAugment.apply(stored.float().contiguous(), sel, int(factor), prm, box, color,
                                mean, std)
