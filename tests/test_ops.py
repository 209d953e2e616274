"""Reference ops against hand computations."""
import math

import pytest
import torch

from dasm import ops
from dasm.ops import GradLayout


def upsample_matrix(src: int, dst: int) -> torch.Tensor:
    """Bilinear (align_corners=False) interpolation weights [dst, src], written out by hand."""
    R = torch.zeros(dst, src)
    for d in range(dst):
        s = max((d + 0.5) * src / dst - 0.5, 0.0)
        i0 = int(math.floor(s))
        i1 = min(i0 + 1, src - 1)
        lam = s - i0
        R[d, i0] += 1 - lam
        R[d, i1] += lam
    return R


def test_decode_divisible_hand_case():
    stored = torch.arange(16.0).view(1, 1, 4, 4)
    out = ops.decode_augment(stored, factor=2)
    assert out.shape == (4, 1, 4, 4)
    R = upsample_matrix(2, 4)
    tiles = [stored[0, 0, :2, :2], stored[0, 0, :2, 2:], stored[0, 0, 2:, :2], stored[0, 0, 2:, 2:]]
    for t, tile in enumerate(tiles):  # row-major tile order
        torch.testing.assert_close(out[t, 0], R @ tile @ R.T)
    # a value by hand: row 1 (0.75, 0.25), col 2 (0.25, 0.75) of tile [[0, 1], [4, 5]]
    assert out[0, 0, 1, 2].item() == pytest.approx(0.75 * 0.75 + 0.25 * (0.25 * 4 + 0.75 * 5))


def test_decode_pads_with_half_and_selects():
    stored = torch.arange(9.0).view(1, 1, 3, 3) / 10
    out = ops.decode_augment(stored, factor=2, sel=torch.tensor([3, 0]))
    R = upsample_matrix(2, 3)
    tile3 = torch.tensor([[0.8, 0.5], [0.5, 0.5]])  # bottom-right tile padded with 0.5
    torch.testing.assert_close(out[0, 0], R @ tile3 @ R.T)
    torch.testing.assert_close(out[1, 0], R @ stored[0, 0, :2, :2] @ R.T)


def test_decode_normalises():
    stored = torch.rand(2, 3, 6, 6)
    mean, std = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 0.25, 2.0])
    out = ops.decode_augment(stored, 1, None, None, mean, std)
    torch.testing.assert_close(out, (stored - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))


def test_distances_by_hand():
    layout = GradLayout.from_shapes(["w"], [(2, 2)])
    gr = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    gs = torch.tensor([[0.0, 1.0, 2.0, 2.0]])
    assert ops.grad_distance(gr, gs, layout, "l1").item() == pytest.approx(1 + 1 + 1 + 1)
    assert ops.grad_distance(gr, gs, layout, "mse").item() == pytest.approx(1 + 1 + 1 + 1)
    # rows: [1,0]·[0,1] -> cos 0; [1,1]·[2,2] -> cos 4 / (sqrt2 sqrt8 + 1e-6)
    want = (1 - 0) + (1 - 4 / (math.sqrt(2) * math.sqrt(8) + 1e-6))
    assert ops.grad_distance(gr, gs, layout, "cos").item() == pytest.approx(want, abs=1e-6)


def test_distance_rows_follow_layout():
    layout = GradLayout.from_shapes(["a", "b"], [(2, 3), (1, 2)])
    assert layout.row_starts().tolist() == [0, 3, 6, 8]
    gr, gs = torch.randn(3, 8), torch.randn(3, 8)
    parts = []
    for (lo, hi) in ((0, 3), (3, 6), (6, 8)):
        x, y = gr[:, lo:hi], gs[:, lo:hi]
        parts.append(1 - (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1) + 1e-6))
    torch.testing.assert_close(ops.grad_distance(gr, gs, layout, "cos"), sum(parts))


def test_sample_scores_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 1.0]])
    labels = torch.tensor([0, 2])
    loss, el2n, margin = ops.sample_scores(logits, labels)
    z0 = math.exp(2) + 2
    assert loss[0].item() == pytest.approx(-math.log(math.exp(2) / z0), rel=1e-5)
    p = [math.exp(2) / z0, 1 / z0, 1 / z0]
    assert el2n[0].item() == pytest.approx(math.sqrt((p[0] - 1) ** 2 + p[1] ** 2 + p[2] ** 2), rel=1e-5)
    assert margin.tolist() == pytest.approx([2.0, -2.0])


def test_accumulate_reference_semantics():
    buffer = torch.zeros(3, 7)
    g1 = torch.arange(8.0).view(2, 2, 2)  # two rows of a [2, 2] parameter
    g2 = torch.ones(2, 3)
    ops.reference("accumulate_class_grads")(buffer, [g1, g2], [0, 4], torch.tensor([2, 2]), 0.5)
    want = torch.zeros(3, 7)
    want[2, :4] = 0.5 * (g1[0].flatten() + g1[1].flatten())
    want[2, 4:] = 1.0
    torch.testing.assert_close(buffer, want)


def test_forced_backend_that_cannot_run_is_an_error(monkeypatch):
    from dasm.errors import BackendUnavailable

    monkeypatch.setenv("DASM_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("a GPU can run triton")
    with pytest.raises(BackendUnavailable, match="triton"):
        ops.grad_distance(torch.zeros(1, 4), torch.zeros(1, 4),
                          GradLayout.from_shapes(["w"], [(2, 2)]), "l1")


def test_unknown_backend_spec(monkeypatch):
    from dasm.errors import ConfigError

    monkeypatch.setenv("DASM_BACKEND", "fast")
    with pytest.raises(ConfigError, match="unknown backend 'fast'"):
        ops.backend_for("grad_distance", "cpu")


# ------------------------------------------------- host checks (a device assert kills CUDA)
@pytest.mark.parametrize("call, message", [
    (lambda: ops.decode_augment(torch.rand(2, 1, 4, 4), 2, sel=torch.tensor([0, 8])),
     r"decode_augment: sel outside \[0, 8\)"),
    (lambda: ops.decode_augment(torch.rand(2, 1, 4, 4), 1, sel=torch.tensor([-1])),
     r"decode_augment: sel outside \[0, 2\)"),
    (lambda: ops.sample_scores(torch.randn(3, 4), torch.tensor([0, 4, 1])),
     r"sample_scores: labels outside \[0, 4\)"),
    (lambda: ops.accumulate_class_grads(torch.zeros(3, 4), [torch.ones(2, 4)], [0],
                                        torch.tensor([0, 3])),
     r"accumulate_class_grads: classes outside \[0, 3\)"),
    (lambda: ops.accumulate_class_grads(torch.zeros(3, 8), [torch.ones(1, 4), torch.ones(1, 4)],
                                        [0, 3], torch.tensor([1])),
     "overlap"),
    (lambda: ops.accumulate_class_grads(torch.zeros(3, 8), [torch.ones(1, 6)], [3],
                                        torch.tensor([1])),
     "columns"),
])
def test_bad_indices_are_host_errors(call, message):
    """Out-of-range indices and overlapping layer spans are refused on the host, by every
    backend, with the op and the argument named."""
    with pytest.raises(ValueError, match=message):
        call()


def test_accumulate_takes_device_classes_and_float64_buffers():
    """Class rows given on any device are checked on the host; a float64 buffer, which the
    extension does not take, runs on the reference under ``auto`` and is an error where the
    extension is forced."""
    from dasm.errors import BackendUnavailable

    g = torch.arange(6.0, dtype=torch.float64).view(2, 3)
    buffer = torch.zeros(2, 3, dtype=torch.float64)
    ops.accumulate_class_grads(buffer, [g], [0], torch.tensor([1, 1]), 0.5)
    torch.testing.assert_close(buffer, torch.tensor([[0.0, 0, 0], [1.5, 2.5, 3.5]],
                                                    dtype=torch.float64))
    if ops.ext() is not None:
        with ops.override(accumulate_class_grads="ext"), \
                pytest.raises(BackendUnavailable, match="float32 only"):
            ops.accumulate_class_grads(buffer, [g], [0], torch.tensor([1]))
