"""``auto`` by measurement on CUDA (issue 28): the committed table is what benchmarks/kernels.py
writes from the H200 measurements, ``auto`` follows it per device name and shape class, never
picks a backend its table shows slower, and falls back to the reference (or ``compile`` where it
was measured faster) on a device without a row. CUDA is faked: only the dispatch is tested."""
import json
import os

import pytest
import torch

from dasm import autotable, dispatch, ops

from conftest import ROOT, load_benchmark, random_dataset, smoke_config

SOURCE = "results/gpu/kernels-gpu.json"


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA available, the device named as the test says; nothing runs on it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("DASM_BACKEND", raising=False)
    ops.set_backend(None)

    def name(device_name):
        monkeypatch.setattr(dispatch, "_device_name", lambda device: device_name)

    return name


def test_table_is_written_from_the_measurements(tmp_path):
    """The committed table and module are exactly what ``kernels.py --table-from`` writes from
    the H200 file, and name its commit and device."""
    kernels = load_benchmark("kernels")
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        out = kernels.write_table([SOURCE], json_path=None, module_path=str(tmp_path / "t.py"))
    finally:
        os.chdir(cwd)
    with open(os.path.join(ROOT, "results/gpu/auto-table.json")) as f:
        assert json.load(f) == out
    assert out["devices"] == autotable.TABLE and out["default"] == autotable.DEFAULT
    src = autotable.TABLE["NVIDIA H200"]["source"]
    assert (src["commit"], src["device"], src["file"]) == ("2b2e5fa", "NVIDIA H200", SOURCE)
    module = (tmp_path / "t.py").read_text()
    with open(os.path.join(ROOT, "dasm/autotable.py")) as f:
        assert f.read() == module


def _measured_rows():
    """(shape class, {backend: ms}) for every measured row of the H200 file."""
    kernels = load_benchmark("kernels")
    with open(os.path.join(ROOT, SOURCE)) as f:
        rows = json.load(f)["rows"]
    per = {}
    for r in rows:
        key = kernels.shape_class(r)
        if key and "ms" in r:
            per.setdefault((key, r["op"], r["pass"]), {})[
                kernels.VARIANT_BACKEND[r["variant"]]] = r["ms"]
    return [(key, times) for (key, _, _), times in per.items()]


def test_auto_never_picks_a_path_its_table_shows_slower(fake_cuda):
    """On an H200, for every measured row, the backend auto runs for its shape class is the
    fastest one measured there (before: triton for decode_augment, at 0.45x compile, and for
    grad_distance l1 and mse, slower than eager)."""
    fake_cuda("NVIDIA H200")
    rows = _measured_rows()
    assert len({k for k, _ in rows}) >= 12
    for key, times in rows:
        op, _, shape = key.partition("/")
        got = ops.backend_for(op, "cuda", shape or None)
        assert got in times, (key, got, times)
        assert times[got] == min(times.values()), (key, got, times)


@pytest.mark.parametrize("key, want", [
    ("decode_augment/fwd+bwd", "compile"), ("sample_scores/float32", "compile"),
    ("grad_distance/l1/fwd+bwd", "reference"), ("grad_distance/cos/fwd+bwd", "triton"),
    ("instance_norm_relu_pool/fwd+bwd+2bwd", "triton"),
    ("instance_norm_relu_pool/fwd+bwd", "compile"), ("accumulate_class_grads", "reference")])
def test_h200_choices(fake_cuda, key, want):
    fake_cuda("NVIDIA H200")
    op, _, shape = key.partition("/")
    assert ops.backend_for(op, "cuda", shape or None) == want


def test_a_device_without_a_row_gets_the_reference_or_compile(fake_cuda):
    """Never a Triton kernel measured nowhere on it: the reference, or compile where compile
    beat the reference on every device measured."""
    fake_cuda("Some Future GPU")
    for key, default in autotable.DEFAULT.items():
        op, _, shape = key.partition("/")
        got = ops.backend_for(op, "cuda", shape or None)
        assert got == default and got in ("reference", "compile"), key
        if got == "compile":
            assert all(r["ms"][key]["compile"] < r["ms"][key]["reference"]
                       for r in autotable.TABLE.values() if key in r["ms"])
    assert ops.backend_for("sample_scores", "cuda", "float16") == "reference"  # no class


def test_forced_backends_and_the_cpu_do_not_read_the_table(fake_cuda, monkeypatch):
    fake_cuda("NVIDIA H200")
    monkeypatch.setenv("DASM_BACKEND", "grad_distance=triton")
    assert ops.backend_for("grad_distance", "cuda", "l1/fwd+bwd") == "triton"
    assert ops.backend_for("decode_augment", "cpu", "fwd+bwd") == "reference"
    table = ops.backend_table("cuda")
    assert table["grad_distance"] == "triton" and "fwd+bwd=compile" in table["decode_augment"]


def test_ops_pass_their_shape_class(fake_cuda, monkeypatch):
    """Each op asks for the class it is: the pass (a backward coming or not), the metric, the
    dtype; the block inside a matching step is second order (never compile, which has no
    double backward)."""
    asked = []
    monkeypatch.setattr(ops, "backend_for",
                        lambda op, device, shape=None: asked.append((op, shape)) or "reference")
    x = torch.rand(2, 1, 4, 4, requires_grad=True)
    ops.decode_augment(x, 1)
    with torch.no_grad():
        ops.decode_augment(x, 1)
    layout = ops.GradLayout.from_shapes(["w"], [(2, 2)])
    ops.grad_distance(torch.zeros(1, 4), torch.zeros(1, 4, requires_grad=True), layout, "cos")
    ops.sample_scores(torch.zeros(2, 3, dtype=torch.bfloat16), torch.tensor([0, 1]))
    z, w, b = torch.rand(1, 2, 4, 4, requires_grad=True), torch.ones(2), torch.zeros(2)
    ops.instance_norm_relu_pool(z, w, b)
    with ops.second_order():
        ops.instance_norm_relu_pool(z, w, b)
    assert asked == [("decode_augment", "fwd+bwd"), ("decode_augment", "fwd"),
                     ("grad_distance", "cos/fwd+bwd"), ("sample_scores", "bfloat16"),
                     ("instance_norm_relu_pool", "fwd+bwd"),
                     ("instance_norm_relu_pool", "fwd+bwd+2bwd")]


def test_a_matching_step_is_second_order(monkeypatch):
    """Every block call of a step (both engines) is looked up as second order."""
    from dasm.matching import Matcher
    from dasm.rules import resolve
    from test_matching import start_images

    seen = []
    real = ops.instance_norm_relu_pool
    monkeypatch.setattr(ops, "instance_norm_relu_pool",
                        lambda *a, **k: seen.append(ops._second_order_depth) or real(*a, **k))
    ds = random_dataset()
    for engine in ("batched", "loop"):
        cfg = resolve(smoke_config("match.batch_real=4", "match.batch_syn=4", "model.width=4",
                                   f"match.engine={engine}"), ds.name, ds.image_size, cuda=False)
        m = Matcher(cfg, ds, torch.device("cpu"), torch.Generator().manual_seed(0))
        images = start_images(ds, 2)
        m.step(m.new_network(), m.draw(ds.class_index(), 2, 0), images, torch.zeros_like(images))
    assert seen and all(seen)


def test_the_gpu_run_reports_the_issue_figures():
    """benchmarks/kernels.py's summary (written after every stage of the GPU run): the fastest
    auto step at IPC 50, its speed-up over the reference, ms per class-step, and its memory at
    IPC 1000 over IPC 50."""
    kernels = load_benchmark("kernels")
    rows = [{"op": f"matching step IPC {ipc} (last segment 50) width 128", "variant": v,
             "pass": "step", "ms": ms, "max MB": mb}
            for ipc, v, ms, mb in ((50, "reference/vmap", 90.0, 2000),
                                   (50, "auto/vmap", 30.0, 1000),
                                   (50, "auto/sequential", 45.0, 900),
                                   (1000, "auto/vmap", 300.0, 1200))]
    step = {("reference", "vmap"): 0.09, ("auto", "vmap"): 0.03, ("auto", "sequential"): 0.045}
    out = kernels.summary({"gpu": "X"}, 1000.0, rows, step)
    assert out["auto_step"] == "auto/vmap" and out["matching_step_speedup"] == 3.0
    assert out["class_step_ms_ipc50"] == 3.0 and out["memory_ipc1000_over_ipc50"] == 1.2
