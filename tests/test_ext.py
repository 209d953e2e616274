"""The compiled extension against the reference backend: accumulate_class_grads and the fused
instance-norm/ReLU/pool block (forward, backward, double backward)."""
import pytest
import torch

from dasm import ops

from conftest import assert_block_matches_reference

ext = ops.ext()
pytestmark = pytest.mark.skipif(ext is None, reason=f"dasm._C not built: {ops.ext_error()}")


def random_case(seed, C=5, B=4, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    shapes = [tuple(int(s) for s in torch.randint(1, 6, (int(torch.randint(1, 4, (1,), generator=g)),),
                                                    generator=g)) for _ in range(4)]
    offsets, total = [], 0
    for s in shapes:
        offsets.append(total + int(torch.randint(0, 3, (1,), generator=g)))
        total = offsets[-1] + int(torch.tensor(s).prod())
    buffer = torch.randn(C, total + 2, generator=g)
    grads = [torch.randn(B, *s, generator=g) for s in shapes]
    classes = torch.randint(0, C, (B,), generator=g)
    return buffer.to(device), [t.to(device) for t in grads], offsets, classes.to(device)


@pytest.mark.parametrize("seed", range(5))
def test_accumulate_matches_reference(seed):
    buffer, grads, offsets, classes = random_case(seed)
    classes[1] = classes[0]  # repeated rows accumulate
    want = ops.reference("accumulate_class_grads")(buffer.clone(), grads, offsets, classes, 0.37)
    got = buffer.clone()
    ext.accumulate_class_grads(got, grads, offsets, classes, 0.37)
    torch.testing.assert_close(got, want)


def test_accumulate_non_contiguous_inputs():
    buffer, grads, offsets, classes = random_case(11)
    grads = [torch.randn(*g.shape[:1], *reversed(g.shape[1:])).transpose(1, -1) if g.dim() > 2 else g
             for g in grads]
    classes = torch.stack([classes, torch.zeros_like(classes)], 1)[:, 0]  # a stride-2 view
    assert any(not g.is_contiguous() for g in grads) and not classes.is_contiguous()
    want = ops.reference("accumulate_class_grads")(buffer.clone(), grads, offsets, classes, 1.0)
    got = buffer.clone()
    ext.accumulate_class_grads(got, grads, offsets, classes, 1.0)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("mutate, message", [
    (lambda b, g, o, c: (b.double(), g, o, c), "buffer must be float32"),
    (lambda b, g, o, c: (b, [g[0].double()] + g[1:], o, c), "must be float32"),
    (lambda b, g, o, c: (b, g, [o[0] + 10_000] + o[1:], c), "does not fit a row"),
    (lambda b, g, o, c: (b, g, o[:-1], c), "offsets"),
    (lambda b, g, o, c: (b, [g[0][:1]] + g[1:], o, c), "leading dimension"),
    (lambda b, g, o, c: (b, g, o, c + 100), "out of range"),
    (lambda b, g, o, c: (b[0], g, o, c), "2-D"),
    (lambda b, g, o, c: (b, g, o, c.to("meta")), "classes must be a CPU tensor"),
    (lambda b, g, o, c: (b, g, o, c.int()), "int64"),
])
def test_accumulate_bad_inputs_raise(mutate, message):
    args = mutate(*random_case(3))
    with pytest.raises(RuntimeError, match=message):
        ext.accumulate_class_grads(*args, 1.0)


def test_accumulate_dispatch_uses_ext():
    buffer, grads, offsets, classes = random_case(4)
    assert ops.backend_for("accumulate_class_grads", "cpu") == "ext"
    want = ops.reference("accumulate_class_grads")(buffer.clone(), grads, offsets, classes, 2.0)
    torch.testing.assert_close(ops.accumulate_class_grads(buffer, grads, offsets, classes, 2.0), want)


@pytest.mark.cuda
def test_accumulate_cuda_matches_reference():
    if not ext.has_cuda():
        pytest.skip("extension built without CUDA")
    buffer, grads, offsets, classes = random_case(5, C=7, B=9, device="cuda")
    classes = classes.cpu()  # class indices stay on the host, where their range is checked
    classes[2] = classes[0]
    classes = torch.stack([classes, torch.zeros_like(classes)], 1)[:, 0]  # not contiguous
    want = ops.reference("accumulate_class_grads")(buffer.clone(), grads, offsets,
                                                   classes.cuda(), 0.5)
    got = buffer.clone()
    ext.accumulate_class_grads(got, grads, offsets, classes, 0.5)
    torch.testing.assert_close(got, want)


@pytest.mark.cuda
def test_accumulate_cuda_bad_classes_are_host_errors():
    """Class rows out of range, given on the device, are one host error (no device assert, which
    would end the CUDA context): the next launch still runs."""
    buffer, grads, offsets, classes = random_case(6, C=4, B=3, device="cuda")
    with pytest.raises(ValueError, match=r"classes outside \[0, 4\)"):
        ops.accumulate_class_grads(buffer, grads, offsets, (classes + 4).cuda())
    ops.accumulate_class_grads(buffer, grads, offsets, classes)
    torch.cuda.synchronize()


def ext_block(z, w, b, pool, eps):
    from dasm import _ext, fused_block

    return fused_block.instance_norm_relu_pool(z, w, b, pool, eps, _ext.BlockKernels)


@pytest.mark.parametrize("pool, size", [(True, (8, 8)), (False, (5, 7)), (True, (7, 9)),
                                        (True, (32, 32))])
def test_block_forward_backward_double_backward(pool, size):
    assert_block_matches_reference(ext_block, pool, size)


def test_block_rejects_second_order_through_affine_grads():
    fused = ext_block
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    w, b = torch.ones(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    out = fused(z, w, b, True, 1e-5)
    _, gw, _ = torch.autograd.grad(out.sum(), (z, w, b), create_graph=True)
    with pytest.raises(NotImplementedError, match="match_bias"):
        torch.autograd.grad(gw.sum(), z)


def test_block_checks_input():
    with pytest.raises(RuntimeError, match="float32"):
        ext.inrp_forward(torch.zeros(1, 2, 4, 4, dtype=torch.float64), torch.ones(2),
                         torch.zeros(2), True, 1e-5)
    with pytest.raises(RuntimeError, match="weight and bias"):
        ext.inrp_forward(torch.zeros(1, 2, 4, 4), torch.ones(3), torch.zeros(3), True, 1e-5)
