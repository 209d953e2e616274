"""Shared fixtures. Triton kernels run on the CPU interpreter where no GPU is present; the
variable must be set before anything imports triton."""
import os
import sys
import subprocess

import pytest

if os.environ.get("DASM_TEST_CUDA") != "1":
    try:
        has_gpu = subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        has_gpu = False
    if not has_gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from dasm.config import load_config  # noqa: E402
from dasm.data import Dataset, load_dataset  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def fmnist_small() -> Dataset:
    """Fashion-MNIST, 40 training images per class, 500 test images."""
    return load_dataset("fashion-mnist", train_per_class=40, test_limit=500)


def random_dataset(classes=3, per_class=12, channels=1, size=(28, 28), seed=0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    n = classes * per_class
    images = torch.randint(0, 256, (n, channels, *size), generator=g, dtype=torch.uint8)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return Dataset(f"random{classes}", images, labels, images[: n // 2].clone(),
                   labels[: n // 2].clone(), [f"c{i}" for i in range(classes)],
                   (0.5,) * channels, (0.25,) * channels)


@pytest.fixture
def tiny_ds() -> Dataset:
    return random_dataset()


def block_derivatives(fn, z0, w0, b0, pool, seed=1):
    """``fn(z, w, b, pool)``'s output, first derivatives (z, w, b) for a random output
    gradient, and second derivatives (z, output gradient, w) of a random projection of dz."""
    z, w, b = (t.clone().requires_grad_() for t in (z0, w0, b0))
    out = fn(z, w, b, pool)
    gen = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=gen).to(z0.device).requires_grad_()
    gz, gw, gb = torch.autograd.grad(out, (z, w, b), go, create_graph=True)
    v = torch.randn(gz.shape, generator=gen).to(z0.device)
    uz, ugo, uw = torch.autograd.grad((gz * v).sum(), (z, go, w))
    return out, gz, gw, gb, uz, ugo, uw


def assert_block_matches_reference(fused, pool, size, device="cpu", rtol=1e-4, atol=1e-5):
    """A fused block (``fused(z, w, b, pool, eps)``) against the reference, values and first
    and second derivatives, on a fresh random case."""
    from dasm import ops

    ref = ops.reference("instance_norm_relu_pool")
    g = torch.Generator().manual_seed(sum(size) + pool)
    z0 = torch.randn(2, 3, *size, generator=g).to(device)
    w0 = torch.randn(3, generator=g).to(device)
    b0 = (torch.randn(3, generator=g) * 0.5).to(device)
    want = block_derivatives(lambda *a: ref(*a, 1e-5), z0, w0, b0, pool)
    got = block_derivatives(lambda *a: fused(*a, 1e-5), z0, w0, b0, pool)
    for name, a, b in zip(("out", "dz", "dw", "db", "ddz", "ddg", "ddw"), want, got):
        torch.testing.assert_close(b.cpu(), a.cpu(), rtol=rtol, atol=atol, msg=name)


def smoke_config(*overrides):
    return load_config(SMOKE, list(overrides))


@pytest.fixture
def smoke_cfg():
    return smoke_config


def load_benchmark(name: str):
    """A script of ``benchmarks/`` as a module (they are scripts, not a package). Its folder is
    on ``sys.path`` only while it loads: the scripts put it there for their siblings, and left
    there it would shadow this ``conftest`` (benchmarks/ has its own) in later imports, such as
    those of the processes test_distributed spawns."""
    import importlib.util

    folder = os.path.join(ROOT, "benchmarks")
    path = os.path.join(folder, f"{name}.py")
    saved = list(sys.path)
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module
