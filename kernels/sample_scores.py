"""Per-sample cross-entropy loss, EL2N and margin of logits in one pass (Triton).

One program handles ``BLOCK_N`` rows and walks the classes in tiles of ``BLOCK_K`` with an online
softmax: running max ``m``, ``s = sum exp(x - m)`` and, over the classes other than the label,
``so = sum exp(x - m)`` and ``qo = sum exp(2 (x - m))``, the label's logit and the best other
logit. EL2N is ``sqrt((1 - p_y)^2 + sum_{j != y} p_j^2) = sqrt(so^2 + qo) / s``, free of the
cancellation of ``1 - p_y`` for confident samples. Offsets are int64; nothing synchronises with
the host.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _sample_scores_kernel(logits_ptr, labels_ptr, out_ptr, N, K, stride_n,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    y = tl.load(labels_ptr + rows, mask=rmask, other=0)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    so = tl.zeros([BLOCK_N], tl.float32)
    qo = tl.zeros([BLOCK_N], tl.float32)
    xy = tl.zeros([BLOCK_N], tl.float32)
    other = tl.full([BLOCK_N], float("-inf"), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < K
        x = tl.load(logits_ptr + rows[:, None] * stride_n + cols[None, :],
                    mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        x = tl.where(cmask[None, :], x, float("-inf"))  # padded classes never win or count
        is_y = cols[None, :] == y[:, None]
        xy += tl.sum(tl.where(is_y, x, 0.0), axis=1)
        other = tl.maximum(other, tl.max(tl.where(is_y, float("-inf"), x), axis=1))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(x - m_new[:, None])
        eo = tl.where(is_y, 0.0, e)
        s = s * alpha + tl.sum(e, axis=1)
        so = so * alpha + tl.sum(eo, axis=1)
        qo = qo * alpha * alpha + tl.sum(eo * eo, axis=1)
        m = m_new
    lse = m + tl.log(s)
    loss = lse - xy
    el2n = tl.sqrt(so * so + qo) / s
    tl.store(out_ptr + rows, loss, mask=rmask)
    tl.store(out_ptr + N + rows, el2n, mask=rmask)
    tl.store(out_ptr + 2 * N + rows, xy - other, mask=rmask)


def sample_scores(logits: torch.Tensor, labels: torch.Tensor):
    """logits ``[N, K]`` fp32/bf16/fp16, labels ``[N]`` int -> (loss, el2n, margin) ``[N]`` fp32."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"sample_scores: logits [N, K] and labels [N], got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    N, K = logits.shape
    out = torch.empty(3, N, dtype=torch.float32, device=logits.device)
    if N == 0:
        return out[0], out[1], out[2]
    block_k = min(triton.next_power_of_2(K), 1024)
    block_n = max(1, min(256, 4096 // block_k))
    grid = (triton.cdiv(N, block_n),)
    _sample_scores_kernel[grid](logits, labels.to(torch.int64).contiguous(), out, N, K,
                                logits.stride(0), BLOCK_N=block_n, BLOCK_K=block_k)
    return out[0], out[1], out[2]
