"""Memory flat in IPC (issue 28): the frozen segments' gradients are computed in chunks counted
in images across classes, within ``match.frozen_chunk`` and ``match.memory_budget_mb``, and the
chunking does not change the step."""
import pytest
import torch

from dasm.matching import Matcher
from dasm.rules import resolve

from conftest import random_dataset, smoke_config
from test_matching import assert_close_to_scale, start_images


def _matcher(*overrides, class_batching="sequential"):
    ds = random_dataset()
    cfg = smoke_config("match.batch_real=6", "match.batch_syn=6", "model.width=4",
                       "match.frozen_per_class=0", f"match.class_batching={class_batching}",
                       *overrides)
    cfg = resolve(cfg, ds.name, ds.image_size, cuda=False)
    return Matcher(cfg, ds, torch.device("cpu"), torch.Generator().manual_seed(0)), ds


def _frozen_chunk_sizes(m, ds, n_frozen=3):
    """Images in each graph-free gradient chunk of one step (frozen images: ``n_frozen`` per
    class at factor 2, every one in the step)."""
    sizes = []
    real_accumulate = m._accumulate

    def recording(model, weights, buffer, x, classes, scale):
        sizes.append(x.shape[0] * x.shape[1])  # x: [classes, images, ch, H, W]
        return real_accumulate(model, weights, buffer, x, classes, scale)

    m._accumulate = recording
    model = m.new_network()
    images = start_images(ds, 2)
    frozen = start_images(ds, n_frozen, seed=1)
    draws = m.draw(ds.class_index(), 2, n_frozen)
    m.step(model, draws, images, torch.zeros_like(images), frozen)
    return sizes[1:]  # the real batches' accumulation comes first, one call


@pytest.mark.parametrize("class_batching", ["sequential", "vmap"])
def test_frozen_chunks_count_images_across_classes(class_batching):
    """12 frozen decoded images per class, 3 classes, ``frozen_chunk=5``: no chunk holds more
    than 5 images in total (before: 5 per class, 15 at once), and every image is in one."""
    m, ds = _matcher("match.frozen_chunk=5", class_batching=class_batching)
    sizes = _frozen_chunk_sizes(m, ds)
    assert max(sizes) <= 5, sizes
    assert sum(sizes) == 3 * 12


def test_frozen_chunks_fit_the_memory_budget():
    """``memory_budget_mb`` bounds a chunk too: at ~4 live float32 copies of an image's
    activations, a 1 MB budget holds 1 MiB / (16 x floats per image) images (width 4 on 28x28:
    4 x (784 + 196 + 49) floats, 15 images), whatever ``frozen_chunk`` says."""
    m, ds = _matcher("match.frozen_chunk=100000", "match.memory_budget_mb=1")
    floats = 4 * (28 * 28 + 14 * 14 + 7 * 7)
    budget = 2 ** 20 // (16 * floats)
    sizes = _frozen_chunk_sizes(m, ds)  # 12 per class, 36 in all
    assert budget == 15 and max(sizes) <= budget, sizes
    assert sum(sizes) == 3 * 12


@pytest.mark.numerics
@pytest.mark.parametrize("class_batching", ["sequential", "vmap"])
def test_frozen_chunking_does_not_change_the_step(class_batching):
    """One image a chunk against every frozen image at once: the same step."""
    out = []
    for chunk in (1, 100000):
        m, ds = _matcher(f"match.frozen_chunk={chunk}", "match.lr_img=0.02",
                         class_batching=class_batching)
        model = m.new_network()
        images = start_images(ds, 2)
        frozen = start_images(ds, 3, seed=1)
        draws = m.draw(ds.class_index(), 2, 3)
        out.append(m.step(model, draws, images, torch.zeros_like(images), frozen))
    assert_close_to_scale(out[0][0] - start_images(ds, 2), out[1][0] - start_images(ds, 2))
    torch.testing.assert_close(out[0][2], out[1][2], rtol=1e-4, atol=1e-6)


def test_graph_chunks_count_the_trainable_images_only(monkeypatch):
    """Frozen images enter the trainable graph as one constant gradient, so the classes per
    graph chunk follow the trainable batch alone (before: trainable + frozen, which at IPC 1000
    left one class per graph on a GPU, ten graphs a step, for no memory)."""
    m, ds = _matcher()
    asked = []
    real = m._chunk_classes
    monkeypatch.setattr(m, "_chunk_classes", lambda batch: asked.append(batch) or real(batch))
    images = start_images(ds, 2)
    draws = m.draw(ds.class_index(), 2, 3)
    m.step(m.new_network(), draws, images, torch.zeros_like(images), start_images(ds, 3, seed=1))
    assert asked == [draws.syn.shape[1]]
