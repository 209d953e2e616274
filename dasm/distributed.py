"""Scale-out with torch.distributed (launched by torchrun); a no-op in a single process.

What is sharded, and how ranks stay identical:

* every rank holds the whole dataset and synthetic set and draws every random number (all
  classes, all batches) from the same seeded generator, so draws agree without communication;
* matching: class ``c`` belongs to rank ``c % world``; a rank computes only its classes'
  gradients and image updates, and the segment's images are summed across ranks at its end
  (each class is non-zero on exactly one rank, so the sum is exact);
* network updates (matching network, scorer, full-data network): each rank takes a slice of
  every batch, the loss is scaled to the full batch, gradients are all-reduced (summed);
* scoring: each rank scores a slice of the real set, ``all_gather`` joins them;
* rank 0 alone writes outputs. A failing rank fails the run: torchrun stops the others, and a
  collective that waits longer than ``dist.timeout_s`` raises on the ranks still alive.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist



@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, c: int) -> bool:
        return c % self.world == self.rank

    def owned(self, num_classes: int) -> list[int]:
        return [c for c in range(num_classes) if self.owns(c)]

    def shard(self, n: int) -> slice:
        """This rank's contiguous slice of ``n`` items (sizes differ by at most one)."""
        base, extra = divmod(n, self.world)
        lo = self.rank * base + min(self.rank, extra)
        return slice(lo, lo + base + (1 if self.rank < extra else 0))

    # ------------------------------------------------------------- collectives
    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_reduce_grads(self, model: torch.nn.Module) -> None:
        """Sum the parameter gradients over ranks (losses are pre-scaled to the full batch)."""
        if not self.active:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            off = 0
            for g in grads:
                g.copy_(flat[off:off + g.numel()].view_as(g))
                off += g.numel()

    def gather_slices(self, part: torch.Tensor, n: int) -> torch.Tensor:
        """Join every rank's :meth:`shard` of an ``n``-row tensor, in rank order (on
        ``part``'s device)."""
        if not self.active:
            return part
        sizes = [Context(r, self.world).shard(n) for r in range(self.world)]
        width = max(s.stop - s.start for s in sizes)
        padded = part.new_zeros((width, *part.shape[1:]), device=_comm_device())
        padded[:part.shape[0]] = part
        out = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(out, padded)
        return torch.cat([o[:s.stop - s.start] for o, s in zip(out, sizes)]).to(part.device)

    def join_classes(self, t: torch.Tensor) -> torch.Tensor:
        """Class-major ``t [C, ...]`` with every class taken from the rank that owns it."""
        if not self.active:
            return t
        mask = torch.tensor([self.owns(c) for c in range(t.shape[0])], device=t.device)
        joined = (t * mask.view(-1, *([1] * (t.dim() - 1)))).to(_comm_device())
        dist.all_reduce(joined, op=dist.ReduceOp.SUM)
        return joined.to(t.device)

    def any_failed(self, failed: bool) -> bool:
        """Whether any rank reports a failure (every rank must call this)."""
        if not self.active:
            return failed
        flag = torch.tensor([int(failed)], dtype=torch.int64, device=_comm_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


_ctx = Context()


def context() -> Context:
    return _ctx


def _comm_device() -> torch.device:
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_from_env(backend: str = "auto", timeout_s: int = 600) -> Context:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1), once per process."""
    global _ctx
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _ctx
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    _ctx = Context(rank, world, local)
    return _ctx


def shutdown() -> None:
    """Leave the process group after a successful run (every rank must call this).

    A process that exits while holding a gloo group can abort ("terminate called without an
    active exception") as its communication threads are torn down; the barrier makes sure no
    rank leaves while another still talks to it. After a failure, do not call this: the ranks
    still alive would wait in the barrier until the timeout.
    """
    global _ctx
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _ctx = Context()


def device_for(ctx: Context, device: str) -> torch.device:
    """The rank's device: ``cuda:<local rank>`` under a multi-GPU launch."""
    if device == "cuda" and ctx.active:
        return torch.device("cuda", ctx.local_rank)
    return torch.device(device)
