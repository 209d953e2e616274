"""A matching step makes the host wait for the device nowhere after its first step (issue 28).

On the CPU the step runs on the ``meta`` device, which stands in for a GPU: its tensors' values
live elsewhere, so every read of them by the host is seen. :class:`HostReads` records each
dispatched op that would synchronise a GPU: scalar reads (``aten::_local_scalar_dense``:
``.item()``, ``int()``, ``float()``, ``bool()``), copies to the host (``.cpu()``, ``.tolist()``,
``.numpy()``) and ops whose output shape depends on values (``nonzero``, ``masked_select``,
``unique``, boolean indexing, ...). Host tensors (the matcher's class lists) are free to read,
but a host tensor that enters a device op is a copy, and a blocking copy waits for the device
too.
"""
from dataclasses import replace

import traceback
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dasm.matching import Matcher
from dasm.rules import resolve

from conftest import random_dataset, smoke_config
from test_matching import start_images

DEVICE = "meta"
_COPIES = {"aten::_to_copy", "aten::copy_", "aten::_copy_from", "aten::_copy_from_and_resize",
           "aten::to"}


def _on_device(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == DEVICE


class HostReads(TorchDispatchMode):
    """Records ``(op, shape)`` of every data-dependent host read of a ``meta`` tensor; a scalar
    read returns 0 and a copy to the host zeros, so the code under test runs on."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []  # "op (kind) at file:line code"

    def _where(self) -> str:
        """The innermost line of the package that led to the read."""
        frames = [f for f in traceback.extract_stack() if "/dasm/" in f.filename]
        return f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno} {frames[-1].line}" \
            if frames else "?"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name()
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        dst = kwargs.get("device")
        if dst is not None and torch.device(dst).type == DEVICE and any(
                t.device.type == "cpu" and t.dim() > 0 for t in tensors):
            self.reads.append(f"{name} (copy from the host) at {self._where()}")
            return func(*args, **kwargs)
        if not any(_on_device(t) for t in tensors):
            return func(*args, **kwargs)
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append(f"{name} (scalar read) at {self._where()}")
            return False if args[0].dtype == torch.bool else 0
        if name in _COPIES:
            dst = kwargs.get("device", args[1] if len(args) > 1 else None)
            to_host = (isinstance(dst, (str, torch.device)) and torch.device(dst).type == "cpu"
                       or name != "aten::_to_copy" and not _on_device(args[0]))
            if to_host:
                self.reads.append(f"{name} (copy to the host) at {self._where()}")
                src = args[0] if name == "aten::_to_copy" else args[1]
                if name == "aten::_to_copy":
                    return torch.zeros(src.shape, dtype=kwargs.get("dtype") or src.dtype)
                return args[0]
        host = [t for t in tensors if t.device.type == "cpu" and t.dim() > 0]
        if host:  # a host tensor in a device op: copied there first, which waits for the device
            self.reads.append(f"{name} (copy from the host) at {self._where()}")
        if func is torch.ops.aten.index.Tensor:
            if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
                self.reads.append(f"{name} (boolean index) at {self._where()}")
        elif torch.Tag.dynamic_output_shape in func.tags or \
                torch.Tag.data_dependent_output in func.tags:
            self.reads.append(f"{name} (value-dependent) at {self._where()}")
        return func(*args, **kwargs)


@pytest.mark.parametrize("read", ["item", "int", "cpu", "tolist", "nonzero", "masked_select",
                                  "unique", "bool_index"])
def test_recorder_sees_every_kind_of_host_read(read):
    x = torch.ones(4, device=DEVICE)
    fn = {"item": lambda: x.sum().item(), "int": lambda: int(x[0]), "cpu": lambda: x.cpu(),
          "tolist": lambda: x.tolist(), "nonzero": lambda: torch.nonzero(x),
          "masked_select": lambda: x.masked_select(x > 0), "unique": lambda: torch.unique(x),
          "bool_index": lambda: x[x > 0]}[read]
    with HostReads() as rec:
        try:
            fn()
        except Exception:  # noqa: BLE001 - meta has no values; the read was recorded first
            pass
    assert rec.reads, read
    with HostReads() as rec:  # and no false alarm on host tensors or device-only work
        torch.ones(4).sum().item()
        (x * 2).sum(0, keepdim=True).index_select(0, torch.zeros(1, dtype=torch.int64,
                                                                 device=DEVICE))
    assert rec.reads == []


def _matcher(class_batching: str, *overrides, device=DEVICE) -> tuple[Matcher, object]:
    ds = random_dataset()
    cfg = smoke_config("match.batch_real=6", "match.batch_syn=6", "model.width=4",
                       "match.engine=batched", f"match.class_batching={class_batching}",
                       *overrides)
    cfg = resolve(cfg, ds.name, ds.image_size, cuda=False)
    return Matcher(cfg, ds, torch.device(device), torch.Generator().manual_seed(0)), ds


def _draws(m: Matcher, ds, n_frozen: int):
    """A step's draws as a GPU makes them (``drawer.on_device``), on a CPU generator standing in for
    the device's, then put on the stand-in device."""
    m.drawer.on_device = True
    m.reseed_draws(device="cpu")
    d = m.draw(ds.class_index(), 2, n_frozen)
    return replace(d, real=d.real.to(DEVICE), syn=d.syn.to(DEVICE), dsa=d.dsa.to(DEVICE),
                   frozen=None if d.frozen is None else d.frozen.to(DEVICE))


@pytest.mark.parametrize("class_batching", ["sequential", "vmap"])
@pytest.mark.parametrize("frozen", [False, True], ids=["one-segment", "frozen"])
def test_matching_step_reads_nothing_back(class_batching, frozen):
    """Every engine and class batching ``auto`` can pick (the batched engine, per-class graphs
    or vmap), with and without frozen segments: the second step reads nothing back."""
    m, ds = _matcher(class_batching, "match.frozen_chunk=3")
    model = m.new_network()
    images = start_images(ds, 2).to(DEVICE)
    frozen_images = start_images(ds, 2, seed=1).to(DEVICE) if frozen else None
    momentum = torch.zeros_like(images)
    for step in range(2):
        draws = _draws(m, ds, 2 if frozen else 0)
        with HostReads() as rec:
            images, momentum, loss = m.step(model, draws, images, momentum, frozen_images)
        assert loss.shape == (ds.num_classes,)
    assert rec.reads == [], "\n".join(f"{n} x {r}" for r, n in Counter(rec.reads).items())


def test_device_draws_are_valid_subsets():
    """The device path of :meth:`Matcher.draw` (here on a CPU generator): each class's real
    indices a repeat-free subset of its pool, synthetic and frozen selections repeat-free and
    in range, one DSA row per class; the same seed draws the same."""
    ds = random_dataset()
    cfg = resolve(smoke_config("match.batch_real=5", "match.batch_syn=6", "model.width=4"),
                  ds.name, ds.image_size, cuda=False)
    m = Matcher(cfg, ds, torch.device("cpu"), torch.Generator().manual_seed(0))
    m.drawer.on_device = True
    pools = [idx[: 7 + 2 * c] for c, idx in enumerate(ds.class_index())]  # unequal pools
    d = m.draw(pools, 2, 3, factor=2, frozen_factor=2)
    assert d.real.shape == (3, 5) and d.syn.shape[0] == 3 and d.frozen.shape[0] == 3
    for c, p in enumerate(pools):
        assert set(d.real[c].tolist()) <= set(p.tolist()) and len(set(d.real[c].tolist())) == 5
        assert len(set(d.syn[c].tolist())) == d.syn.shape[1] and int(d.syn.max()) < 2 * 4
        assert len(set(d.frozen[c].tolist())) == d.frozen.shape[1] and int(d.frozen.max()) < 12
    assert len(d.dsa) == 3
    seen = set()
    for _ in range(30):  # every pool member gets drawn (the padding never)
        seen |= set(m.draw(pools, 2, 0).real[2].tolist())
    assert seen == set(pools[2].tolist())
    m2 = Matcher(cfg, ds, torch.device("cpu"), torch.Generator().manual_seed(0))
    m2.drawer.on_device = True
    assert torch.equal(m2.draw(pools, 2, 3, factor=2, frozen_factor=2).real, d.real)


def test_cpu_matcher_keeps_the_host_stream():
    """On the CPU the draws come from the run's generator as before: reseeding per segment
    takes nothing from it (the bit-for-bit runs of tests/test_schedule.py rest on this)."""
    m, _ = _matcher("sequential", device="cpu")
    assert not m.drawer.on_device
    before = m.gen.get_state()
    m.reseed_draws()
    assert torch.equal(m.gen.get_state(), before) and m.drawer.device_gen is None


@pytest.mark.cuda
@pytest.mark.parametrize("class_batching", ["sequential", "vmap"])
def test_cuda_step_does_not_synchronise(class_batching):
    """On a GPU, with the backends ``auto`` picks there: the second step under
    ``torch.cuda.set_sync_debug_mode('error')``, which raises on every synchronising call."""
    ds = random_dataset()
    cfg = smoke_config("match.batch_real=6", "match.batch_syn=6", "model.width=8",
                       f"match.class_batching={class_batching}", "match.frozen_chunk=3")
    cfg = resolve(cfg, ds.name, ds.image_size, cuda=True)
    m = Matcher(cfg, ds, torch.device("cuda"), torch.Generator().manual_seed(0))
    model = m.new_network()
    images = start_images(ds, 2).cuda()
    frozen = start_images(ds, 2, seed=1).cuda()
    momentum = torch.zeros_like(images)
    for step in range(2):
        draws = m.draw(ds.class_index(), 2, 2)
        if step:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            images, momentum, _ = m.step(model, draws, images, momentum, frozen)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
