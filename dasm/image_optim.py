"""The image optimiser of gradient matching: SGD with momentum on the trainable images,
stepped as IDC steps it (per class, on one tensor), in closed form for all classes at once."""
from __future__ import annotations

import torch


def bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-class values ``v [C]`` shaped to broadcast over ``like [C, ...]``."""
    return v.to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))


def sequential_momentum_coefficients(C: int, mu: float):
    """``(pre, keep, carry, total)``, each ``[C]`` float64, of :class:`ImageOptimizer`'s
    closed form (lr 1 here; see there)."""
    powers = [mu ** k for k in range(C + 1)]
    upto = lambda hi: sum(powers[:hi + 1])  # noqa: E731  1 + mu + ... + mu^hi
    pre = [upto(c) - 1 for c in range(C)]  # mu + ... + mu^c
    keep = [powers[C - 1 - c] for c in range(C)]
    carry = [powers[c + 1] for c in range(C)]
    total = [upto(C - 1 - c) for c in range(C)]
    return tuple(torch.tensor(v, dtype=torch.float64) for v in (pre, keep, carry, total))


class ImageOptimizer:
    """SGD with momentum on the trainable images ``[C, n, ...]``, as IDC steps it.

    IDC calls ``torch.optim.SGD(lr, momentum=mu).step()`` after *each* class on the one image
    tensor: ``b <- mu b + g_c; x <- x - lr b``, where ``g_c`` touches class ``c``'s rows only and
    is taken at the current ``x``. For class ``c``'s rows that is ``c`` momentum-only steps,
    its own step, then ``C - 1 - c`` momentum-only steps, which sum in closed form:

    * its gradient is taken at ``x_pre = x - lr * pre_c * b``, ``pre_c = mu + ... + mu^c``;
    * afterwards ``b' = mu^C b + keep_c g`` with ``keep_c = mu^(C-1-c)``, and
      ``x' = x_pre - lr * total_c * (carry_c b + g)`` with ``carry_c = mu^(c+1)``,
      ``total_c = 1 + mu + ... + mu^(C-1-c)``.

    So all classes' gradients can be computed at once at ``x_pre`` (:meth:`lookahead`) and
    applied in one update (:meth:`step`): ``image_update: sequential``, exactly IDC.
    ``joint`` is one plain momentum step for all classes (``b' = mu b + g; x' = x - lr b'``).
    """

    def __init__(self, lr: float, mu: float, num_classes: int, sequential: bool, device=None):
        self.lr, self.mu, self.C, self.sequential = lr, mu, num_classes, sequential
        if sequential:  # ``[C]`` float64 on ``device`` (the host by default), copied there once
            self.pre, self.keep, self.carry, self.total = (
                v.to(device) for v in sequential_momentum_coefficients(num_classes, mu))

    def lookahead(self, images: torch.Tensor, momentum: torch.Tensor) -> torch.Tensor:
        """Where each class's gradient is taken (``x_pre``; ``images`` for ``joint``)."""
        if not self.sequential:
            return images
        return images - self.lr * bcast(self.pre, images) * momentum

    @torch.no_grad()
    def step(self, at: torch.Tensor, grad: torch.Tensor, images: torch.Tensor,
             momentum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images', momentum')`` from the gradient ``grad`` taken at ``at``."""
        if self.sequential:
            new_mom = self.mu ** self.C * momentum + bcast(self.keep, grad) * grad
            new_images = at - self.lr * bcast(self.total, grad) * (
                bcast(self.carry, grad) * momentum + grad)
        else:
            new_mom = self.mu * momentum + grad
            new_images = images - self.lr * new_mom
        return new_images, new_mom
