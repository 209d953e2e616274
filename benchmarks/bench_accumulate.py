"""accumulate_class_grads: the extension against the reference (index_add_ per layer) on the
ConvNet-3 (width 128, 28x28) layout, one gradient row per class for 10 and 100 classes.

    python -m pytest benchmarks/bench_accumulate.py -s   -> results/matching-cpu.json["accumulate"]
"""
import pytest
import torch

from dasm import ops

from _common import table, update_results

SHAPES = [(128, 1, 3, 3), (128, 128, 3, 3), (128, 128, 3, 3)]
RESULTS = []


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    by = {(r["classes"], r["impl"]): r for r in RESULTS}
    for r in RESULTS:
        ref = by.get((r["classes"], "reference"))
        if ref:
            r["vs reference"] = f"{ref['median_us'] / r['median_us']:.2f}x"
    print("\naccumulate_class_grads, CPU, ConvNet-3 layout (P = %d)" % sum(
        torch.Size(s).numel() for s in SHAPES))
    print(table(RESULTS, ["classes", "impl", "median_us", "GB/s", "vs reference"]))
    update_results("matching-cpu.json", "accumulate", RESULTS)


@pytest.mark.parametrize("classes", [10, 100])
@pytest.mark.parametrize("impl", ["reference", "ext"])
def test_accumulate(benchmark, classes, impl):
    if impl == "ext" and ops.ext() is None:
        pytest.skip(ops.ext_error())
    layout = ops.GradLayout.from_shapes(["a", "b", "c"], SHAPES)
    g = torch.Generator().manual_seed(0)
    buffer = torch.zeros(classes, layout.numel)
    grads = [torch.randn(classes, *s, generator=g) for s in SHAPES]
    idx = torch.arange(classes)
    fn = (ops.reference("accumulate_class_grads") if impl == "reference"
          else lambda *a: ops.ext().accumulate_class_grads(*a))
    benchmark.pedantic(fn, args=(buffer, grads, list(layout.offsets), idx, 1.0), rounds=30,
                       warmup_rounds=3)
    med = benchmark.stats.stats.median
    moved = 3 * classes * layout.numel * 4  # read grads, read + write buffer
    RESULTS.append({"classes": classes, "impl": impl, "median_us": round(med * 1e6, 1),
                    "GB/s": round(moved / med / 1e9, 2)})
