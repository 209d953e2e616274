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

import contextlib
import functools
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dsa as dsa_ops
from . import ops
from .dsa import Strategy
from .data import Dataset, to_float
from .distributed import context
from .errors import ConfigError
from .image_optim import ImageOptimizer, bcast
from .models import build_model, has_batch_norm, model_options, model_skeleton
from .chunking import classes_per_chunk, conv_floats_per_image, frozen_images_per_chunk
from .draws import StepDraws, StepDrawer
from .plan import Segment
from .step_graph import GraphedStep
from .train import network_optimizer, network_update


def matched_parameters(model: nn.Module, bias: bool, fc: bool) -> list[str]:
    """IDC's choice: 4-D (conv) weights; 1-D (biases, norms) with ``bias``; 2-D (fc) with ``fc``."""
    keep = {4: True, 1: bias, 2: fc}
    return [n for n, p in model.named_parameters() if keep.get(p.dim(), False)]


def check_engine(cfg, network: nn.Module) -> None:
    """The batched engine needs per-sample independence: no batch norm in the matching
    ``network`` (asked for by ``model.norm`` or built in: resnet18, vgg11). Raises ConfigError."""
    if cfg.match.engine == "batched" and has_batch_norm(network):
        key = "model.norm" if cfg.model.name == "convnet" else "model.name"
        raise ConfigError(f"config key {key!r}: {cfg.model.name} has batch norm, which couples "
                          f"the samples of a batch; the batched engine needs instance or no norm "
                          f"(or match.engine=loop)")


# ------------------------------------------------------------------------------ matcher
class Matcher:
    """Distils one segment (see the module docstring). Inputs live on ``device``; ``cfg`` is a
    resolved config (:func:`dasm.rules.resolve`) whose ``match`` section it reads."""

    def __init__(self, cfg, dataset: Dataset, device: torch.device, generator: torch.Generator,
                 log: Callable[[dict], None] | None = None, progress: bool = False):
        self.cfg, self.m = cfg, cfg.match
        self.strategy = Strategy.parse(self.m.augment, "match.augment")
        self.net_strategy = Strategy.parse(self.m.net_augment, "match.net_augment")
        self.ds = dataset
        self.device = torch.device(device)
        self.gen = generator
        self.log = log or (lambda record: None)
        self.progress = progress
        f = cfg.synthetic.factor
        self.factor = f if isinstance(f, int) else None  # draws' default: a uniform factor
        self.C = dataset.num_classes
        self.mean, self.std = dataset.mean_std(self.device)
        self.real_images = dataset.train_images.to(self.device)
        self.model_name, self.model_opts = model_options(cfg.model)
        probe = model_skeleton(self.model_name, dataset.channels, self.C, dataset.image_size,
                               **self.model_opts)  # shapes only; the generator is not touched
        check_engine(cfg, probe)
        self.matched = matched_parameters(probe, self.m.match_bias, self.m.match_fc)
        if not self.matched:
            raise ConfigError("no parameters to match (model has no conv weights and "
                              "match.match_bias/match_fc are off)")
        params = dict(probe.named_parameters())
        self.layout = ops.GradLayout.from_shapes(self.matched, [params[n].shape for n in self.matched])
        self.ctx = context()
        self.own = torch.tensor(self.ctx.owned(self.C), dtype=torch.int64)  # this rank's classes
        self.own_mask = torch.zeros(self.C, dtype=torch.bool)
        self.own_mask[self.own] = True
        self.class_batching = self.m.class_batching
        if self.class_batching == "auto":
            # measured: vmap is ~2x slower than per-class autograd on CPU; on GPU it batches launches
            self.class_batching = "vmap" if self.device.type == "cuda" else "sequential"
        self.drawer = StepDrawer(self.m, self.C, self.strategy, dataset.image_size, generator,
                                 self.device)
        self._device_rows: dict[tuple, torch.Tensor] = {}  # see _on
        self._image_opts: dict[float, ImageOptimizer] = {}  # per image step, on the device

    # ------------------------------------------------------------------ network
    def new_network(self) -> nn.Module:
        model = build_model(self.model_name, self.ds.channels, self.C, self.ds.image_size,
                            generator=self.gen, device=self.device, **self.model_opts)
        model.train()
        return model

    def _block_override(self):
        """Matching the norm's weights and biases needs second derivatives through their
        gradients, which the fused block does not implement: the reference serves then."""
        if self.m.match_bias:
            return ops.override(instance_norm_relu_pool="reference")
        return ops.override()

    # -------------------------------------------------------------------- draws
    def reseed_draws(self, device=None) -> None:
        """:meth:`dasm.draws.StepDrawer.reseed`: once per segment."""
        self.drawer.reseed(device)

    def draw(self, pools: list[torch.Tensor], n_train: int, n_frozen: int,
             factor: int | None = None, frozen_factor: int | None = None) -> StepDraws:
        """One step's draws (:meth:`dasm.draws.StepDrawer.draw`); factors default to the
        config's uniform factor."""
        return self.drawer.draw(pools, n_train, n_frozen, factor or self.factor,
                                frozen_factor or self.factor or 1)

    # ------------------------------------------------------------------- inputs
    def _real_batch(self, idx: torch.Tensor, dsa_rows: dsa_ops.DSAParams) -> torch.Tensor:
        x = to_float(self.real_images[idx.to(self.device)])
        return ops.decode_augment(x, 1, None, dsa_rows, self.mean, self.std)

    def _decoded(self, stored: torch.Tensor, factor: int, sel: torch.Tensor,
                 classes: torch.Tensor, dsa: dsa_ops.DSAParams) -> torch.Tensor:
        """Decoded + augmented images of ``classes`` from class-major ``stored [C, n, ...]`` at
        ``factor``: ``sel [len(classes), B]`` -> ``[len(classes) * B, ch, H, W]`` (class-major)."""
        n = stored.shape[1]
        flat = stored.reshape(-1, *stored.shape[2:])
        base = self._on(classes, sel.device).view(-1, 1) * (n * factor ** 2)
        return ops.decode_augment(flat, factor, (sel + base).reshape(-1).to(self.device),
                                  self._rows(dsa, classes, sel.shape[1]), self.mean, self.std)

    def _rows(self, dsa: dsa_ops.DSAParams, classes: torch.Tensor, per_class: int):
        """The siamese DSA rows of ``per_class`` samples of each of the host ``classes``."""
        rows = self._on(classes, dsa.flip.device)
        return dsa.index(rows.view(-1, 1).expand(-1, per_class).reshape(-1))

    def _on(self, classes: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Host class rows ``classes [k]`` on ``device``: on a GPU a copy made once per distinct
        list and kept, so a step copies nothing from the host (a blocking copy waits for the
        device)."""
        if device.type == "cpu":
            return classes
        key = (classes.dtype, *classes.tolist())  # a host tensor: no synchronisation
        if key not in self._device_rows:
            self._device_rows[key] = classes.to(device)
        return self._device_rows[key]

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

        y = self._on(classes, self.device).view(-1, 1).expand(-1, x.shape[1])
        g = vmap(grad(loss_fn), in_dims=(None, 0, 0))(weights, x, y)
        return [g[n] for n in self.matched]

    def _accumulate(self, model, weights, buffer, x: torch.Tensor, classes: torch.Tensor,
                    scale: float) -> None:
        """``buffer[classes] += scale * grad`` without a graph; ``x [Cc, B, ...]``, ``classes``
        host rows (the extension reads them there; the reference takes them on the device)."""
        host = ops.backend_for("accumulate_class_grads", buffer.device) == "ext"
        rows = classes if host else self._on(classes, buffer.device)
        with torch.enable_grad():
            if self.class_batching == "vmap":
                grads = self._vmap_grads(model, x.detach(), classes)
                ops.accumulate_class_grads(buffer, grads, self.layout.offsets, rows, scale)
                return
            for j, c in enumerate(classes.tolist()):
                g = self._class_grad(model, weights, x[j].detach(), c, create_graph=False)
                ops.accumulate_class_grads(buffer, [t.unsqueeze(0) for t in g], self.layout.offsets,
                                           rows[j:j + 1], scale)

    def _chunk_classes(self, batch: int) -> int:
        """Classes per graph chunk of ``batch`` images each (:func:`classes_per_chunk`)."""
        return classes_per_chunk(self.m, self.C, self.device, batch, self._floats_per_image)

    @functools.cached_property
    def _floats_per_image(self) -> int:
        return conv_floats_per_image(self.model_name, self.model_opts, self.ds.channels, self.C,
                                     self.ds.image_size)

    @contextlib.contextmanager
    def _matched_weights(self, model: nn.Module):
        """The matched parameters (a list), with gradients off for every other parameter while
        the block runs."""
        named = dict(model.named_parameters())
        for p in named.values():
            p.requires_grad_(False)
        weights = [named[n] for n in self.matched]
        for w in weights:
            w.requires_grad_(True)
        try:
            yield weights
        finally:
            for p in named.values():
                p.requires_grad_(True)

    # ------------------------------------------------------------------- steps
    def step(self, model: nn.Module, draws: StepDraws, images: torch.Tensor,
             momentum: torch.Tensor, frozen: torch.Tensor | None = None,
             lr_img: float | None = None):
        """One matching step for every class.

        images: ``[C, n, ch, H, W]`` current trainable segment (at ``draws.factor``); momentum:
        same shape; frozen: ``[C, n_f, ch, H, W]`` (at ``draws.frozen_factor``) or None;
        lr_img: the image step (default ``match.lr_img``). Returns ``(images, momentum,
        loss [C])``.
        """
        lr = self.m.lr_img if lr_img is None else lr_img
        with ops.second_order():  # the block's backward is differentiated again
            if self.m.engine == "loop":
                from .loop_engine import step_loop

                return step_loop(self, model, draws, images, momentum, frozen, lr)
            return self._step_batched(model, draws, images, momentum, frozen, lr)

    def _step_batched(self, model, draws, images, momentum, frozen, lr):
        opt = self._image_opt(lr)
        at = opt.lookahead(images, momentum)
        leaf = at.detach().requires_grad_(True)
        with self._matched_weights(model) as weights, self._block_override():
            gr = self._real_grads(model, weights, draws)
            gf = self._frozen_grads(model, weights, draws, frozen)
            losses = self._trainable_distance(model, weights, draws, leaf, gr, gf)
        grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        new_images, new_mom = opt.step(leaf.detach(), grad, images, momentum)
        if self.ctx.active:  # other ranks' classes stay as they were here
            mask = bcast(self._on(self.own_mask, self.device), images).bool()
            new_images = torch.where(mask, new_images, images)
            new_mom = torch.where(mask, new_mom, momentum)
        return new_images.detach(), new_mom, losses

    def _image_opt(self, lr: float) -> ImageOptimizer:
        """The image optimiser of step ``lr``, its coefficients on the device (made once)."""
        if lr not in self._image_opts:
            self._image_opts[lr] = ImageOptimizer(lr, self.m.mom_img, self.C,
                                                  self.m.image_update == "sequential",
                                                  device=self.device)
        return self._image_opts[lr]

    def _graph_blocker(self) -> str | None:
        """Why a GPU step cannot be captured as a CUDA graph here, or None."""
        if self.m.engine == "loop":
            return "the loop engine (IDC's literal loop, the oracle) is not captured"
        if ops.backend_for("accumulate_class_grads", self.device) == "ext":
            return ("the extension's accumulate_class_grads uploads its host rows on every "
                    "call, which a graph would replay from a stale buffer")
        return None

    def _real_grads(self, model, weights, draws: StepDraws) -> torch.Tensor:
        """``[C, P]`` gradients of this rank's classes' real batches (no graph)."""
        own, br = self.own, draws.real.shape[1]
        gr = torch.zeros(self.C, self.layout.numel, device=self.device)
        real = draws.real[self._on(own, draws.real.device)]
        xr = self._real_batch(real.reshape(-1), self._rows(draws.dsa, own, br))
        self._accumulate(model, weights, gr, xr.view(len(own), br, *xr.shape[1:]), own, 1.0)
        return gr

    def _frozen_grads(self, model, weights, draws: StepDraws,
                      frozen: torch.Tensor | None) -> torch.Tensor | None:
        """``[C, P]`` mean gradient of each class's sampled frozen images (no graph), computed in
        chunks of at most :func:`frozen_images_per_chunk` images across classes (whole classes while one
        class's sample fits, else part of one class); None without frozen segments."""
        if draws.frozen is None:
            return None
        own, n_f = self.own, draws.frozen.shape[1]
        images = frozen_images_per_chunk(self.m, self._floats_per_image)
        per = min(n_f, images)  # images of a class in one chunk
        k = max(1, images // n_f)  # classes in one chunk
        gf = torch.zeros(self.C, self.layout.numel, device=self.device)
        for c0 in range(0, len(own), k):
            cls = own[c0:c0 + k]
            for lo in range(0, n_f, per):
                sel = draws.frozen[self._on(cls, draws.frozen.device), lo:lo + per]
                with torch.no_grad():
                    xf = self._decoded(frozen, draws.frozen_factor, sel, cls, draws.dsa)
                self._accumulate(model, weights, gf,
                                 xf.view(len(cls), sel.shape[1], *xf.shape[1:]), cls,
                                 sel.shape[1] / n_f)
        return gf

    def _trainable_distance(self, model, weights, draws: StepDraws, leaf: torch.Tensor,
                            gr: torch.Tensor, gf: torch.Tensor | None) -> torch.Tensor:
        """Per-class match distance ``[C]`` of the trainable images ``leaf`` (mixed with the
        frozen gradient ``gf`` as one batch), backpropagated into ``leaf.grad`` a chunk of
        classes at a time (a graph per chunk)."""
        n_t = draws.syn.shape[1]
        n_f = 0 if draws.frozen is None else draws.frozen.shape[1]
        w_t, w_f = n_t / (n_t + n_f), n_f / (n_t + n_f)
        losses = torch.zeros(self.C, device=self.device)
        chunk = self._chunk_classes(n_t)  # the graph holds the trainable images only
        for lo in range(0, len(self.own), chunk):
            cls = self.own[lo:lo + chunk]
            rows = self._on(cls, self.device)
            xs = self._decoded(leaf, draws.factor, draws.syn[self._on(cls, draws.syn.device)],
                               cls, draws.dsa)
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
            dist = ops.grad_distance(gr[rows], gs, self.layout, self.m.metric)
            dist.sum().backward(inputs=[leaf])
            losses[rows] = dist.detach()
        return losses

    # ------------------------------------------------------------------ run
    def run_segment(self, images: torch.Tensor, pools: list[torch.Tensor], net_pool: torch.Tensor,
                    seg: Segment, frozen: tuple[torch.Tensor, int] | None = None,
                    starts: list[dict] | None = None) -> torch.Tensor:
        """Run segment ``seg``'s outer iterations on its trainable ``images [C, n, ch, H, W]``
        (stored at ``seg.factor``), stepping by ``seg.lr_img``.

        pools: per-class real indices matched against; net_pool: real indices of the network's
        updates; frozen: ``(images [C, n_f, ch, H, W], factor)`` of the earlier segments
        (constants; :func:`dasm.synthetic.frozen_view`); starts: state dicts that outer
        iteration ``i``'s network starts from (``starts[i % len]``) instead of its fresh
        initialisation. Returns the distilled images.
        """
        from tqdm.auto import tqdm

        segment, iterations, inner_steps = seg.index, seg.iterations, self.m.inner_steps
        start = images.to(self.device).float()
        # the segment's state lives in place (one step may be a CUDA graph that reads and
        # writes these very tensors): images, momentum, the loss sum, the matching network
        images = start.clone()
        momentum = torch.zeros_like(images)
        frozen, frozen_factor = frozen if frozen is not None else (None, None)
        n_frozen = 0 if frozen is None else frozen.shape[1]
        frozen = None if frozen is None else frozen.to(self.device).float()
        self.reseed_draws()  # per segment, so a resumed run draws as the uninterrupted one
        bar = tqdm(range(iterations), desc=f"segment {segment + 1}", disable=not self.progress,
                   leave=False, dynamic_ncols=True)
        t0 = time.perf_counter()
        acc = torch.zeros(self.C, device=self.device)
        n_acc = 0
        model: nn.Module | None = None

        def one_step() -> None:
            draws = self.draw(pools, images.shape[1], n_frozen, seg.factor, frozen_factor)
            new, mom, loss = self.step(model, draws, images, momentum, frozen, seg.lr_img)
            images.copy_(new)
            momentum.copy_(mom)
            acc.add_(loss)

        step = GraphedStep(one_step, self.device,
                           (self.drawer.device_gen,) if self.drawer.device_gen is not None else (),
                           log=lambda record: self.log({**record, "segment": segment}),
                           blocker=self._graph_blocker())
        for it in bar:
            fresh = self.new_network()
            if starts:
                fresh.load_state_dict(starts[it % len(starts)])
            if model is None:
                model = fresh
            else:  # copied in place: the step (and its graph) keeps reading the same tensors
                model.load_state_dict(fresh.state_dict())
            opt = network_optimizer(model, self.m)
            images.clamp_(0, 1)
            for _ in range(inner_steps):
                step()
                n_acc += 1
                network_update(model, opt, self.real_images, self.ds.train_labels, net_pool,
                               self.m, self.net_strategy, self.mean, self.std, self.gen)
            if (it + 1) % self.m.log_every == 0 or it + 1 == iterations:
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
