"""IDC gradient matching for one segment of the synthetic set.

One *outer iteration* starts a fresh network; each of its ``inner_steps`` is a matching step for
every class followed by ``n_data`` samples of network training on real data (CutMix, per-sample
DSA). A matching step, per class ``c``:

  real batch (64 of class c) and synthetic batch (decoded images of class c, <= 128 sampled;
  plus a sample of the frozen segments) share one DSA draw (siamese);
  g_real = d CE(real) / d W (detached), g_syn = d CE(syn) / d W (create_graph);
  loss_c = D(g_real, g_syn) over the matched parameters (conv weights by default);
  image SGD step (lr_img, momentum mom_img).

Two engines compute the same thing:

* ``loop``: IDC's literal per-class loop with ``torch.optim.SGD`` (the oracle);
* ``batched``: every class at once: one decode_augment for all classes, real and frozen gradients
  without graphs accumulated into flat ``[C, P]`` buffers (``ops.accumulate_class_grads``),
  trainable gradients with a graph per chunk of classes (sequential autograd or ``torch.func``
  vmap), one ``ops.grad_distance`` and one backward per chunk, one image update. IDC steps the
  image optimiser after each class on the shared image tensor, so its momentum moves every class
  C times per step; ``image_update: sequential`` reproduces that exactly in closed form (each
  class's gradient taken at the position IDC would take it), ``joint`` is one plain momentum step.

Frozen segments join the synthetic side as constants: their gradient ``g_f`` is computed without a
graph in chunks and mixed with the trainable gradient ``g_t`` as ``(n_t g_t + n_f g_f) / (n_t +
n_f)``, exactly the gradient of one batch holding both (the networks have no cross-sample
coupling; batch norm is refused).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import augment, ops
from .augment import Strategy
from .data import Dataset, to_float
from .distributed import context
from .errors import ConfigError
from .models import build_model, model_options, model_skeleton
from .train import mixed_loss


# ------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class MatchSettings:
    """Resolved numbers of a matching run (from ``Config.match`` after :func:`config.resolve`)."""

    metric: str
    lr_img: float
    mom_img: float
    image_update: str
    batch_real: int
    batch_syn: int
    match_bias: bool
    match_fc: bool
    strategy: Strategy
    net_strategy: Strategy
    n_data: int
    net_batch: int
    net_lr: float
    net_momentum: float
    net_weight_decay: float
    net_cutmix: float
    engine: str
    class_batching: str
    class_chunk: int
    memory_budget_mb: int
    frozen_per_class: int
    frozen_chunk: int

    @classmethod
    def from_config(cls, cfg) -> "MatchSettings":
        m = cfg.match
        return cls(m.metric, float(m.lr_img), m.mom_img, m.image_update, m.batch_real, m.batch_syn,
                   m.match_bias, m.match_fc, Strategy.parse(m.augment, "match.augment"),
                   Strategy.parse(m.net_augment, "match.net_augment"), m.n_data, m.net_batch,
                   m.net_lr, m.net_momentum, m.net_weight_decay, m.net_cutmix, m.engine,
                   m.class_batching, m.class_chunk, m.memory_budget_mb, m.frozen_per_class,
                   m.frozen_chunk)


def matched_parameters(model: nn.Module, bias: bool, fc: bool) -> list[str]:
    """IDC's choice: 4-D (conv) weights; 1-D (biases, norms) with ``bias``; 2-D (fc) with ``fc``."""
    keep = {4: True, 1: bias, 2: fc}
    return [n for n, p in model.named_parameters() if keep.get(p.dim(), False)]


@dataclass
class StepDraws:
    """Every random choice of one matching step, drawn before any gradient (engine-independent)."""

    real: torch.Tensor  # [C, Br] indices into the dataset's training images
    syn: torch.Tensor  # [C, Bt] decoded indices into the class's trainable images
    frozen: torch.Tensor | None  # [C, Bf] decoded indices into the class's frozen images
    dsa: augment.DSAParams  # [C] one siamese draw per class


# --------------------------------------------------------------------- image optimiser
def sequential_momentum_coefficients(C: int, mu: float):
    """Closed form of IDC's per-class SGD steps on one image tensor (lr 1 here).

    At class position ``c`` of a step, class ``c``'s images have already moved by the momentum
    of positions ``0..c-1``; returns ``(pre, keep, carry, total)`` per class, ``[C]`` float64:
    gradient taken at ``x - lr * pre * b``; afterwards ``b' = mu^C b + keep * g`` and
    ``x' = x_pre - lr * total * (carry * b + g)``.
    """
    powers = [mu ** k for k in range(C + 1)]
    upto = lambda hi: sum(powers[:hi + 1])  # noqa: E731  1 + mu + ... + mu^hi
    pre = [upto(c) - 1 for c in range(C)]  # mu + ... + mu^c
    keep = [powers[C - 1 - c] for c in range(C)]
    carry = [powers[c + 1] for c in range(C)]
    total = [upto(C - 1 - c) for c in range(C)]
    return tuple(torch.tensor(v, dtype=torch.float64) for v in (pre, keep, carry, total))


def check_engine(cfg) -> None:
    """The batched engine needs per-sample independence: no batch norm (raises ConfigError)."""
    if cfg.match.engine == "batched" and cfg.model.norm == "batch":
        raise ConfigError("config key 'model.norm': batch norm couples the samples of a batch; "
                          "the batched engine needs instance or no norm (or match.engine=loop)")


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))


# ------------------------------------------------------------------------------ matcher
class Matcher:
    """Distils one segment (see the module docstring). Inputs live on ``device``."""

    def __init__(self, cfg, dataset: Dataset, device: torch.device, generator: torch.Generator,
                 log: Callable[[dict], None] | None = None, progress: bool = False):
        self.cfg = cfg
        self.s = MatchSettings.from_config(cfg)
        self.ds = dataset
        self.device = torch.device(device)
        self.gen = generator
        self.log = log or (lambda record: None)
        self.progress = progress
        self.factor = cfg.synthetic.factor
        self.C = dataset.num_classes
        self.mean, self.std = dataset.mean_std(self.device)
        self.real_images = dataset.train_images.to(self.device)
        self.model_name, self.model_opts = model_options(cfg.model)
        check_engine(cfg)
        probe = model_skeleton(self.model_name, dataset.channels, self.C, dataset.image_size,
                               **self.model_opts)  # shapes only; the generator is not touched
        self.matched = matched_parameters(probe, self.s.match_bias, self.s.match_fc)
        if not self.matched:
            raise ConfigError("no parameters to match (model has no conv weights and "
                              "match.match_bias/match_fc are off)")
        params = dict(probe.named_parameters())
        self.layout = ops.GradLayout.from_shapes(self.matched, [params[n].shape for n in self.matched])
        self.lr_scale = 1.0  # set per segment by the scheduler (frozen-share compensation)
        self.ctx = context()
        self.own = torch.tensor(self.ctx.owned(self.C), dtype=torch.int64)  # this rank's classes
        self.own_mask = torch.zeros(self.C, dtype=torch.bool)
        self.own_mask[self.own] = True
        self.class_batching = self.s.class_batching
        if self.class_batching == "auto":
            # measured: vmap is ~2x slower than per-class autograd on CPU; on GPU it batches launches
            self.class_batching = "vmap" if self.device.type == "cuda" else "sequential"

    # ------------------------------------------------------------------ network
    def new_network(self) -> nn.Module:
        model = build_model(self.model_name, self.ds.channels, self.C, self.ds.image_size,
                            generator=self.gen, device=self.device, **self.model_opts)
        model.train()
        return model

    def _block_override(self):
        """The fused ext block does not run under vmap or second-order norm matching."""
        if (self.class_batching == "vmap" and self.s.engine == "batched") or self.s.match_bias:
            return ops.override(instance_norm_relu_pool="reference")
        return ops.override()

    # -------------------------------------------------------------------- draws
    def draw(self, pools: list[torch.Tensor], n_train: int, n_frozen: int) -> StepDraws:
        """Real indices from each class's pool, synthetic and frozen selections, DSA draws."""
        C, g, f2 = self.C, self.gen, self.factor ** 2
        br = min(self.s.batch_real, min(len(p) for p in pools))
        real = torch.stack([p[torch.randperm(len(p), generator=g)[:br]] for p in pools])
        dt = n_train * f2
        bt = min(self.s.batch_syn, dt)
        syn = torch.stack([torch.randperm(dt, generator=g)[:bt] for _ in range(C)])
        frozen = None
        if n_frozen:
            df = n_frozen * f2
            bf = df if self.s.frozen_per_class == 0 else min(self.s.frozen_per_class, df)
            frozen = torch.stack([torch.randperm(df, generator=g)[:bf] for _ in range(C)])
        dsa = augment.draw(self.s.strategy, C, self.ds.image_size, g)
        return StepDraws(real, syn, frozen, dsa)

    # ------------------------------------------------------------------- inputs
    def _real_batch(self, idx: torch.Tensor, dsa_rows: augment.DSAParams) -> torch.Tensor:
        x = to_float(self.real_images[idx.to(self.device)])
        return ops.decode_augment(x, 1, None, dsa_rows, self.mean, self.std)

    def _decoded(self, stored: torch.Tensor, sel: torch.Tensor, classes: torch.Tensor,
                 dsa: augment.DSAParams) -> torch.Tensor:
        """Decoded + augmented images of ``classes`` from class-major ``stored [C, n, ...]``:
        ``sel [len(classes), B]`` -> ``[len(classes) * B, ch, H, W]`` (class-major)."""
        n = stored.shape[1]
        flat = stored.reshape(-1, *stored.shape[2:])
        base = (classes.view(-1, 1) * (n * self.factor ** 2)).to(sel.device)
        return ops.decode_augment(flat, self.factor, (sel + base).reshape(-1).to(self.device),
                                  self._rows(dsa, classes, sel.shape[1]), self.mean, self.std)

    def _rows(self, dsa: augment.DSAParams, classes: torch.Tensor, per_class: int):
        return dsa.index(torch.repeat_interleave(classes.cpu(), per_class))

    # ------------------------------------------------------------- gradients
    def _labels(self, c: int, n: int) -> torch.Tensor:
        return torch.full((n,), c, dtype=torch.int64, device=self.device)

    def _class_grad(self, model, weights, x, c, create_graph):
        loss = F.cross_entropy(model(x), self._labels(c, x.shape[0]))
        return torch.autograd.grad(loss, weights, create_graph=create_graph)

    def _vmap_grads(self, model, x: torch.Tensor, classes: torch.Tensor) -> list[torch.Tensor]:
        """Per-class gradients ``[Cc, *shape]`` of the matched parameters, ``x [Cc, B, ...]``."""
        from torch.func import functional_call, grad, vmap

        named = dict(model.named_parameters())
        fixed = {n: p.detach() for n, p in named.items() if n not in self.matched}
        fixed.update(dict(model.named_buffers()))
        weights = {n: named[n].detach() for n in self.matched}

        def loss_fn(w, xb, yb):
            return F.cross_entropy(functional_call(model, {**w, **fixed}, (xb,)), yb)

        y = classes.to(self.device).view(-1, 1).expand(-1, x.shape[1])
        g = vmap(grad(loss_fn), in_dims=(None, 0, 0))(weights, x, y)
        return [g[n] for n in self.matched]

    def _accumulate(self, model, weights, buffer, x: torch.Tensor, classes: torch.Tensor,
                    scale: float) -> None:
        """``buffer[classes] += scale * grad`` without a graph; ``x [Cc, B, ...]``."""
        with torch.enable_grad():
            if self.class_batching == "vmap":
                grads = self._vmap_grads(model, x.detach(), classes)
                ops.accumulate_class_grads(buffer, grads, self.layout.offsets, classes, scale)
                return
            for j, c in enumerate(classes.tolist()):
                g = self._class_grad(model, weights, x[j].detach(), c, create_graph=False)
                ops.accumulate_class_grads(buffer, [t.unsqueeze(0) for t in g], self.layout.offsets,
                                           classes[j:j + 1].to(self.device), scale)

    def _chunk_classes(self, batch: int) -> int:
        """Classes per graph chunk: set, or chosen from ``memory_budget_mb``."""
        if self.s.class_chunk:
            return min(self.s.class_chunk, self.C)
        if self.device.type == "cpu":
            # measured (benchmarks/bench_matching_cpu.py): one class per graph is fastest on the
            # CPU; ten live graphs cost 1.8x in page faults and cache misses
            return 1
        per_image = sum(b.numel() for b in _activation_probe(self))  # floats per image per block
        per_class = batch * per_image * 4 * 12  # ~12 live copies through the double backward
        return max(1, min(self.C, int(self.s.memory_budget_mb * 2 ** 20 // max(per_class, 1))))

    # ------------------------------------------------------------------- steps
    def step(self, model: nn.Module, draws: StepDraws, images: torch.Tensor,
             momentum: torch.Tensor, frozen: torch.Tensor | None = None):
        """One matching step for every class.

        images: ``[C, n, ch, H, W]`` current trainable segment; momentum: same shape;
        frozen: ``[C, n_f, ch, H, W]`` or None. Returns ``(images, momentum, loss [C])``.
        """
        if self.s.engine == "loop":
            return self._step_loop(model, draws, images, momentum, frozen)
        return self._step_batched(model, draws, images, momentum, frozen)

    def _step_loop(self, model, draws, images, momentum, frozen):
        """IDC's literal loop: per class, frozen images join the synthetic batch (as constants)."""
        C = self.C
        leaf = images.detach().clone().requires_grad_(True)
        opt = torch.optim.SGD([leaf], lr=self.s.lr_img * self.lr_scale, momentum=self.s.mom_img)
        if self.s.mom_img > 0:
            opt.state[leaf]["momentum_buffer"] = momentum.detach().clone()
        weights = [dict(model.named_parameters())[n] for n in self.matched]
        losses = []
        joint = self.s.image_update == "joint"
        total = 0
        with self._block_override():
            for c in range(C):
                if not self.ctx.owns(c):  # another rank's class: IDC's momentum-only step here
                    losses.append(torch.zeros((), device=self.device))
                    if not joint:
                        leaf.grad = torch.zeros_like(leaf)
                        opt.step()
                    continue
                cls = torch.tensor([c])
                xr = self._real_batch(draws.real[c], self._rows(draws.dsa, cls, draws.real.shape[1]))
                gr = self._class_grad(model, weights, xr, c, create_graph=False)
                xs = self._decoded(leaf, draws.syn[c:c + 1], cls, draws.dsa)
                if draws.frozen is not None:
                    xf = self._decoded(frozen, draws.frozen[c:c + 1], cls, draws.dsa)
                    xs = torch.cat([xs, xf.detach()])
                gs = self._class_grad(model, weights, xs, c, create_graph=True)
                flat = lambda gg: torch.cat([t.reshape(1, -1) for t in gg], dim=1)  # noqa: E731
                loss = ops.grad_distance(flat(gr).detach(), flat(gs), self.layout, self.s.metric)[0]
                losses.append(loss.detach())
                if joint:
                    total = total + loss
                    continue
                opt.zero_grad()
                loss.backward(inputs=[leaf])
                opt.step()
            if joint:
                opt.zero_grad()
                total.backward(inputs=[leaf])
                opt.step()
        buf = opt.state[leaf].get("momentum_buffer") if self.s.mom_img > 0 else momentum
        return leaf.detach(), buf.detach() if buf is not None else momentum, torch.stack(losses)

    def _step_batched(self, model, draws, images, momentum, frozen):
        C, dev = self.C, self.device
        lr, mu = self.s.lr_img * self.lr_scale, self.s.mom_img
        sequential = self.s.image_update == "sequential"
        if sequential:
            pre, keep, carry, total = sequential_momentum_coefficients(C, mu)
            start = images - lr * _bcast(pre, images) * momentum
        else:
            start = images
        leaf = start.detach().requires_grad_(True)
        named = dict(model.named_parameters())
        weights = [named[n] for n in self.matched]
        for p in named.values():  # only the matched parameters need gradients while matching
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        own = self.own  # this rank's classes (all of them in a single process)
        own_dev = own.to(dev)
        try:
            with self._block_override():
                # real side: no graph, straight into the flat buffer
                gr = torch.zeros(C, self.layout.numel, device=dev)
                br = draws.real.shape[1]
                xr = self._real_batch(draws.real[own].reshape(-1), self._rows(draws.dsa, own, br))
                self._accumulate(model, weights, gr, xr.view(len(own), br, *xr.shape[1:]), own_dev,
                                 1.0)
                # frozen side: no graph, in chunks of frozen_chunk images per class
                n_t = draws.syn.shape[1]
                n_f = 0 if draws.frozen is None else draws.frozen.shape[1]
                gf = None
                if n_f:
                    gf = torch.zeros(C, self.layout.numel, device=dev)
                    step = self.s.frozen_chunk
                    for lo in range(0, n_f, step):
                        sel = draws.frozen[own, lo:lo + step]
                        with torch.no_grad():
                            xf = self._decoded(frozen, sel, own, draws.dsa)
                        self._accumulate(model, weights, gf,
                                         xf.view(len(own), sel.shape[1], *xf.shape[1:]), own_dev,
                                         sel.shape[1] / n_f)
                # trainable side: a graph per chunk of classes, one distance, one backward
                w_t, w_f = n_t / (n_t + n_f), n_f / (n_t + n_f)
                losses = torch.zeros(C, device=dev)
                chunk = self._chunk_classes(n_t + n_f)
                for lo in range(0, len(own), chunk):
                    cls = own[lo:lo + chunk]
                    rows = cls.to(dev)
                    xs = self._decoded(leaf, draws.syn[cls], cls, draws.dsa)
                    xs = xs.view(len(cls), n_t, *xs.shape[1:])
                    if self.class_batching == "vmap":
                        gs = torch.cat([g.reshape(len(cls), -1)
                                        for g in self._vmap_grads(model, xs, cls)], dim=1)
                    else:
                        gs = torch.stack([torch.cat([g.reshape(-1) for g in
                                                     self._class_grad(model, weights, xs[j], c, True)])
                                          for j, c in enumerate(cls.tolist())])
                    if gf is not None:
                        gs = w_t * gs + w_f * gf[rows]
                    dist = ops.grad_distance(gr[rows], gs, self.layout, self.s.metric)
                    dist.sum().backward(inputs=[leaf])
                    losses[rows] = dist.detach()
        finally:
            for p in named.values():
                p.requires_grad_(True)
        g = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        with torch.no_grad():
            if sequential:
                new_mom = mu ** C * momentum + _bcast(keep, g) * g
                new_images = leaf - lr * _bcast(total, g) * (_bcast(carry, g) * momentum + g)
            else:
                new_mom = mu * momentum + g
                new_images = images - lr * new_mom
            if self.ctx.active:  # other ranks' classes stay as they were here
                mask = _bcast(self.own_mask, images).bool()
                new_images = torch.where(mask, new_images, images)
                new_mom = torch.where(mask, new_mom, momentum)
        return new_images.detach(), new_mom, losses

    # --------------------------------------------------------------- network
    def train_network(self, model: nn.Module, opt: torch.optim.Optimizer,
                      pool: torch.Tensor) -> None:
        """``n_data`` real samples of SGD from ``pool`` (CutMix, per-sample DSA)."""
        s = self.s
        if s.n_data == 0:
            return
        steps = math.ceil(s.n_data / s.net_batch)
        order = pool[torch.randperm(len(pool), generator=self.gen)]
        if len(order) < steps * s.net_batch:  # small pools cycle
            order = order.repeat(math.ceil(steps * s.net_batch / len(order)))
        for i in range(steps):
            idx = order[i * s.net_batch:(i + 1) * s.net_batch]
            x = to_float(self.real_images[idx.to(self.device)])
            y = self.ds.train_labels[idx].to(self.device)
            dsa = augment.draw(s.net_strategy, len(idx), self.ds.image_size, self.gen,
                               shared_geometric=True)
            x = ops.decode_augment(x, 1, None, dsa, self.mean, self.std)
            shard = self.ctx.shard(len(idx)) if self.ctx.active else None
            loss = mixed_loss(model, x, y, s.net_cutmix, self.gen, shard)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            self.ctx.all_reduce_grads(model)
            opt.step()

    def new_network_optimizer(self, model):
        s = self.s
        return torch.optim.SGD(model.parameters(), lr=s.net_lr, momentum=s.net_momentum,
                               weight_decay=s.net_weight_decay)

    # ------------------------------------------------------------------ run
    def trainable_share(self, n_train: int, n_frozen: int) -> float:
        """Share of trainable images in each class's synthetic batch (1 without frozen ones)."""
        f2 = self.factor ** 2
        n_t = min(self.s.batch_syn, n_train * f2)
        if not n_frozen:
            return 1.0
        n_f = n_frozen * f2 if self.s.frozen_per_class == 0 else \
            min(self.s.frozen_per_class, n_frozen * f2)
        return n_t / (n_t + n_f)

    def distill(self, images: torch.Tensor, pools: list[torch.Tensor], net_pool: torch.Tensor,
                iterations: int, inner_steps: int, frozen: torch.Tensor | None = None,
                segment: int = 0, lr_scale: float = 1.0) -> torch.Tensor:
        """Run ``iterations`` outer iterations on the trainable ``images [C, n, ch, H, W]``.

        pools: per-class real indices matched against; net_pool: real indices of the network's
        updates; frozen: earlier segments (constants); lr_scale multiplies lr_img. Returns the
        distilled images.
        """
        self.lr_scale = lr_scale
        from tqdm.auto import tqdm

        images = images.to(self.device).float()
        start = images.clone()
        momentum = torch.zeros_like(images)
        n_frozen = 0 if frozen is None else frozen.shape[1]
        frozen = None if frozen is None else frozen.to(self.device).float()
        bar = tqdm(range(iterations), desc=f"segment {segment + 1}", disable=not self.progress,
                   leave=False, dynamic_ncols=True)
        t0 = time.perf_counter()
        acc = torch.zeros(self.C, device=self.device)
        n_acc = 0
        for it in bar:
            model = self.new_network()
            opt = self.new_network_optimizer(model)
            images = images.clamp(0, 1)
            for _ in range(inner_steps):
                draws = self.draw(pools, images.shape[1], n_frozen)
                images, momentum, loss = self.step(model, draws, images, momentum, frozen)
                acc += loss
                n_acc += 1
                self.train_network(model, opt, net_pool)
            if (it + 1) % self.cfg.match.log_every == 0 or it + 1 == iterations:
                per_class = self.ctx.all_reduce_(acc / max(n_acc, 1)).tolist()
                record = {"event": "match", "segment": segment, "iteration": it + 1,
                          "loss": sum(per_class) / self.C, "loss_per_class": per_class,
                          "image_change": (images - start).abs().mean().item(),
                          "seconds": round(time.perf_counter() - t0, 3)}
                self.log(record)
                bar.set_postfix(loss=f"{record['loss']:.3g}")
                acc.zero_()
                n_acc = 0
        return images.clamp(0, 1).detach()


def _activation_probe(m: Matcher) -> list[torch.Tensor]:
    """Per-image conv outputs of the matching network (shapes only, on the meta device)."""
    outs = []
    net = model_skeleton(m.model_name, m.ds.channels, m.C, m.ds.image_size, **m.model_opts)
    for mod in net.modules():
        if isinstance(mod, nn.Conv2d):
            mod.register_forward_hook(lambda _m, _i, o: outs.append(o[0]))
    with ops.override(instance_norm_relu_pool="reference"):
        net(torch.empty(1, m.ds.channels, *m.ds.image_size, device="meta"))
    return outs
