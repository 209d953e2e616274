"""ConvNet block tail in Triton: instance norm (affine) + ReLU (+ 2x2 average pool), with its
backward and the backward of that backward with respect to the input, one program per
``(sample, channel)`` plane held in registers (planes up to :data:`MAX_PLANE` values).

Per plane of ``M = H W`` values ``x``: ``x^ = (x - mean) rstd``, ``a = w x^ + b``,
``y = relu(a)``, ``out = avgpool2x2(y)`` (floor: an odd last row/column gets no output).

Backward, for ``g = dL/dout``: ``h = relu'(a) unpool(g)`` (``g / 4`` on each of the 4 inputs),
``k = w h``, ``dz = rstd (k - mean(k) - x^ mean(k x^))``, ``dw = sum h x^``, ``db = sum h``.

Backward of the backward, for ``u = dL'/dz`` (the derivative of relu' is zero almost
everywhere): with ``A(v) = v - mean(v) - x^ mean(v x^)`` (self-adjoint), ``v = rstd A(u)``;
``dL'/dg = pool(relu'(a) w v)``, ``dL'/dw = sum h v``, and with ``m2 = mean(k x^)``,
``U = sum u x^``, ``S = sum u (k - mean(k))``, ``G = -rstd (u m2 + U k / M)``:
``dL'/dz = rstd A(G) - (S - U m2) rstd^2 x^ / M``.

Same contract as the extension (:mod:`dasm._ext`): ``forward(z, w, b, pool, eps) -> (out,
mean, rstd)``, ``backward(g, z, mean, rstd, w, b, pool) -> (dz, dw, db)``,
``double_backward(u, g, z, mean, rstd, w, b, pool) -> (dg, dz, dw)``; ``mean``/``rstd`` are
``[N, C]`` float32. The autograd wiring is :mod:`dasm.fused_block`.
"""
import torch
import triton
import triton.language as tl

MAX_PLANE = 16384  # values per (sample, channel) plane a program holds


def warps_for(block: int) -> int:
    """Warps for a program holding ``block`` values: about 32 values per thread, so a large
    plane spreads over more threads instead of spilling registers (4 warps up to 4,096 values,
    then doubling to 16 at 16,384)."""
    return max(4, min(16, block // 1024))


@triton.jit
def _backward_state(g_ptr, z_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, plane, C, M, W, Hp, Wp,
                    POOL: tl.constexpr, BLOCK: tl.constexpr):
    """One plane's ``x^``, ``h = relu'(a) unpool(g)`` and ``k = w h`` (and what they came from)."""
    base = plane.to(tl.int64) * M
    idx = tl.arange(0, BLOCK)
    mask = idx < M
    x = tl.load(z_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
    i = idx // W
    j = idx % W
    if POOL:
        pooled = (i < 2 * Hp) & (j < 2 * Wp) & mask
        q = (i // 2) * Wp + (j // 2)
    else:
        pooled = mask
        q = idx
    mean = tl.load(mean_ptr + plane)
    rstd = tl.load(rstd_ptr + plane)
    w = tl.load(w_ptr + plane % C).to(tl.float32)
    b = tl.load(b_ptr + plane % C).to(tl.float32)
    xh = tl.where(mask, (x - mean) * rstd, 0.0)
    g = tl.load(g_ptr + plane.to(tl.int64) * Hp * Wp + q, mask=pooled, other=0.0).to(tl.float32)
    if POOL:
        g = g * 0.25
    h = tl.where((xh * w + b > 0.0) & pooled, g, 0.0)
    return base, idx, mask, mean, rstd, w, b, xh, h, w * h


@triton.jit
def _forward(z_ptr, w_ptr, b_ptr, out_ptr, mean_ptr, rstd_ptr, C, M, W, Hp, Wp, eps,
             POOL: tl.constexpr, BLOCK: tl.constexpr, BLOCK_OUT: tl.constexpr):
    plane = tl.program_id(0)
    c = plane % C
    base = plane.to(tl.int64) * M
    idx = tl.arange(0, BLOCK)
    mask = idx < M
    x = tl.load(z_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / M
    d = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / M + eps)
    tl.store(mean_ptr + plane, mean)
    tl.store(rstd_ptr + plane, rstd)
    w = tl.load(w_ptr + c).to(tl.float32)
    b = tl.load(b_ptr + c).to(tl.float32)
    if POOL:
        q = tl.arange(0, BLOCK_OUT)
        qmask = q < Hp * Wp
        top = (q // Wp) * 2 * W + (q % Wp) * 2  # the 2x2 block's first input
        acc = tl.zeros([BLOCK_OUT], dtype=tl.float32)
        for off in tl.static_range(4):
            v = tl.load(z_ptr + base + top + (off // 2) * W + (off % 2), mask=qmask,
                        other=0.0).to(tl.float32)
            acc += tl.maximum((v - mean) * rstd * w + b, 0.0)
        tl.store(out_ptr + plane.to(tl.int64) * Hp * Wp + q, acc * 0.25, mask=qmask)
    else:
        tl.store(out_ptr + base + idx, tl.maximum(d * rstd * w + b, 0.0), mask=mask)


@triton.jit
def _backward(g_ptr, z_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, dz_ptr, dw_ptr, db_ptr,
              C, M, W, Hp, Wp, POOL: tl.constexpr, BLOCK: tl.constexpr):
    plane = tl.program_id(0)
    base, idx, mask, mean, rstd, w, b, xh, h, k = _backward_state(
        g_ptr, z_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, plane, C, M, W, Hp, Wp, POOL, BLOCK)
    kbar = tl.sum(k, axis=0) / M
    m2 = tl.sum(k * xh, axis=0) / M
    tl.store(dz_ptr + base + idx, rstd * (k - kbar - xh * m2), mask=mask)
    tl.store(dw_ptr + plane, tl.sum(h * xh, axis=0))
    tl.store(db_ptr + plane, tl.sum(h, axis=0))


@triton.jit
def _double_backward(u_ptr, g_ptr, z_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, dg_ptr, dz_ptr,
                     dw_ptr, C, M, W, Hp, Wp, POOL: tl.constexpr, BLOCK: tl.constexpr,
                     BLOCK_OUT: tl.constexpr):
    plane = tl.program_id(0)
    base, idx, mask, mean, rstd, w, b, xh, h, k = _backward_state(
        g_ptr, z_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, plane, C, M, W, Hp, Wp, POOL, BLOCK)
    u = tl.load(u_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
    kbar = tl.sum(k, axis=0) / M
    m2 = tl.sum(k * xh, axis=0) / M
    ubar = tl.sum(u, axis=0) / M
    U = tl.sum(u * xh, axis=0)
    v = tl.where(mask, rstd * (u - ubar - xh * (U / M)), 0.0)
    tl.store(dw_ptr + plane, tl.sum(h * v, axis=0))
    S = tl.sum(u * (k - kbar), axis=0)
    G = tl.where(mask, -rstd * (u * m2 + U * k / M), 0.0)
    gbar = tl.sum(G, axis=0) / M
    gx = tl.sum(G * xh, axis=0) / M
    dz = rstd * (G - gbar - xh * gx) - (S - U * m2) * rstd * rstd * xh / M
    tl.store(dz_ptr + base + idx, dz, mask=mask)
    # dL'/dg: the adjoint of the unpooling, recomputed at the inputs of each output
    ubar_xh = U / M
    if POOL:
        o = tl.arange(0, BLOCK_OUT)
        omask = o < Hp * Wp
        top = (o // Wp) * 2 * W + (o % Wp) * 2
        acc = tl.zeros([BLOCK_OUT], dtype=tl.float32)
        for off in tl.static_range(4):
            at = top + (off // 2) * W + (off % 2)
            xo = tl.load(z_ptr + base + at, mask=omask, other=0.0).to(tl.float32)
            uo = tl.load(u_ptr + base + at, mask=omask, other=0.0).to(tl.float32)
            xho = (xo - mean) * rstd
            vo = rstd * (uo - ubar - xho * ubar_xh)
            acc += tl.where(xho * w + b > 0.0, w * vo, 0.0)
        tl.store(dg_ptr + plane.to(tl.int64) * Hp * Wp + o, acc * 0.25, mask=omask)
    else:
        tl.store(dg_ptr + base + idx, tl.where(xh * w + b > 0.0, w * v, 0.0), mask=mask)


def _geometry(z: torch.Tensor, pool: bool):
    N, C, H, W = z.shape
    M = H * W
    if M > MAX_PLANE:
        raise ValueError(f"instance_norm_relu_pool (triton): planes of {M} values exceed "
                         f"{MAX_PLANE}; use another backend")
    Hp, Wp = (H // 2, W // 2) if pool else (H, W)
    block = max(16, triton.next_power_of_2(M))
    block_out = max(16, triton.next_power_of_2(Hp * Wp))
    return N, C, H, W, M, Hp, Wp, block, block_out, warps_for(block)


def forward(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pool: bool, eps: float):
    z = z.contiguous()
    N, C, H, W, M, Hp, Wp, block, block_out, warps = _geometry(z, pool)
    out = torch.empty(N, C, Hp, Wp, device=z.device, dtype=z.dtype)
    mean = torch.empty(N, C, device=z.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    _forward[(N * C,)](z, weight.contiguous(), bias.contiguous(), out, mean, rstd, C, M, W, Hp,
                       Wp, float(eps), POOL=bool(pool), BLOCK=block, BLOCK_OUT=block_out,
                       num_warps=warps)
    return out, mean, rstd


def backward(g, z, mean, rstd, weight, bias, pool: bool):
    z, g = z.contiguous(), g.contiguous()
    N, C, H, W, M, Hp, Wp, block, _, warps = _geometry(z, pool)
    dz = torch.empty_like(z)
    dw = torch.empty(N, C, device=z.device, dtype=torch.float32)
    db = torch.empty_like(dw)
    _backward[(N * C,)](g, z, mean, rstd, weight.contiguous(), bias.contiguous(), dz, dw, db,
                        C, M, W, Hp, Wp, POOL=bool(pool), BLOCK=block, num_warps=warps)
    return dz, dw.sum(0).to(weight.dtype), db.sum(0).to(bias.dtype)


def double_backward(u, g, z, mean, rstd, weight, bias, pool: bool):
    u, z, g = u.contiguous(), z.contiguous(), g.contiguous()
    N, C, H, W, M, Hp, Wp, block, block_out, warps = _geometry(z, pool)
    dg = torch.empty_like(g)
    dz = torch.empty_like(z)
    dw = torch.empty(N, C, device=z.device, dtype=torch.float32)
    _double_backward[(N * C,)](u, g, z, mean, rstd, weight.contiguous(), bias.contiguous(), dg,
                               dz, dw, C, M, W, Hp, Wp, POOL=bool(pool), BLOCK=block,
                               BLOCK_OUT=block_out, num_warps=warps)
    return dg, dz, dw.sum(0).to(weight.dtype)
