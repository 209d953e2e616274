"""Matching-step throughput on the CPU (docs/protocol.md): dasm's engine against the IDC-style
per-class loop (baseline_loop.py), in the same process, on the same inputs.

Fashion-MNIST, IPC 50, factor 2, ConvNet-3 width 128, real batch 64, synthetic batch 128, one
full matching step (all 10 classes: decode + augment, real and synthetic gradients, distance,
backward, image update). Reported: class-steps per second (medians of pytest-benchmark rounds)
and the engine/baseline ratio.

    DASM_BENCH_ALLOCATOR=default|tuned python -m pytest benchmarks/bench_matching_cpu.py -s

``tuned`` applies :func:`dasm.runtime.tune_cpu_allocator` to the whole process first (baseline
included), ``default`` leaves glibc's allocator as it is. Results: results/matching-cpu.json.
"""
import os

import pytest
import torch

from dasm import ops, runtime

ALLOCATOR = os.environ.get("DASM_BENCH_ALLOCATOR", "default")
if ALLOCATOR == "tuned":
    assert runtime.tune_cpu_allocator(), "could not tune the allocator"

from dasm.config import load_config  # noqa: E402
from dasm.rules import resolve  # noqa: E402
from dasm.data import load_dataset  # noqa: E402
from dasm.matching import Matcher  # noqa: E402
from dasm.synthetic import init_mix  # noqa: E402

from _common import table, update_results  # noqa: E402
from baseline_loop import BaselineLoop, IDCConvNet  # noqa: E402

ROUNDS = int(os.environ.get("DASM_BENCH_ROUNDS", "5"))
IPC, FACTOR, WIDTH = 50, 2, 128
RESULTS: dict = {}


def make_matcher(ds, *overrides):
    cfg = load_config(None, [f"synthetic.ipc={IPC}", f"synthetic.factor={FACTOR}",
                             f"model.width={WIDTH}", "match.batch_real=64", "match.batch_syn=128",
                             *overrides])
    cfg = resolve(cfg, ds.name, ds.image_size, cuda=False)
    return Matcher(cfg, ds, torch.device("cpu"), torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def setup():
    ds = load_dataset("fashion-mnist")
    m = make_matcher(ds)
    model = m.new_network()
    g = torch.Generator().manual_seed(1)
    real = torch.stack([ds.train_images[i[torch.randperm(len(i), generator=g)[:IPC * FACTOR ** 2]]]
                        for i in ds.class_index()]).float() / 255
    images = init_mix(real, FACTOR)
    momentum = torch.zeros_like(images)
    draws = m.draw(ds.class_index(), IPC, 0)
    mean, std = ds.mean_std()
    base = BaselineLoop(IDCConvNet(1, 10, WIDTH).load_from(model), ds.train_images, mean, std,
                        FACTOR, m.m.metric, m.m.lr_img, m.m.mom_img)
    yield dict(ds=ds, m=m, model=model, images=images, momentum=momentum, draws=draws, base=base)
    report()


def record(name, benchmark, classes=10):
    med = benchmark.stats.stats.median
    RESULTS[name] = {"median_s": round(med, 4), "class_steps_per_s": round(classes / med, 3),
                     "rounds": benchmark.stats.stats.rounds}


def test_same_mathematics(setup):
    """The engine and the baseline compute the same losses and images on the same draws."""
    s = setup
    a = s["base"].run(s["images"], s["momentum"], s["draws"])
    b = s["m"].step(s["model"], s["draws"], s["images"], s["momentum"])
    torch.testing.assert_close(b[2].cpu(), a[2].float(), rtol=2e-3, atol=1e-3)
    torch.testing.assert_close(b[0], a[0], rtol=1e-4, atol=2e-5)  # l1: signs flip where g_r ~ g_s
    RESULTS["check"] = {"max_loss_rel_diff": float(((b[2] - a[2]).abs() / a[2].abs()).max()),
                        "max_image_diff": float((b[0] - a[0]).abs().max())}


def test_baseline_loop(benchmark, setup):
    s = setup
    benchmark.pedantic(s["base"].run, args=(s["images"], s["momentum"], s["draws"]),
                       rounds=ROUNDS, warmup_rounds=1)
    record("baseline_loop", benchmark)


def test_engine(benchmark, setup):
    s = setup
    benchmark.pedantic(s["m"].step, args=(s["model"], s["draws"], s["images"], s["momentum"]),
                       rounds=ROUNDS, warmup_rounds=1)
    record("engine", benchmark)


def test_engine_reference_backend(benchmark, setup):
    """The same engine with the extension's ops on the reference backend."""
    s = setup
    with ops.override(accumulate_class_grads="reference", instance_norm_relu_pool="reference"):
        benchmark.pedantic(s["m"].step, args=(s["model"], s["draws"], s["images"], s["momentum"]),
                           rounds=ROUNDS, warmup_rounds=1)
    record("engine_reference_backend", benchmark)


def test_engine_vmap(benchmark, setup):
    """Classes batched with torch.func.vmap (the GPU default) on the CPU."""
    s = setup
    m = make_matcher(s["ds"], "match.class_batching=vmap")
    benchmark.pedantic(m.step, args=(s["model"], s["draws"], s["images"], s["momentum"]),
                       rounds=max(2, ROUNDS // 2), warmup_rounds=1)
    record("engine_vmap", benchmark)


def report():
    base = RESULTS.get("baseline_loop", {}).get("median_s")
    rows = []
    for name, r in RESULTS.items():
        if name == "check":
            continue
        rows.append({"variant": name, "median s/step": r["median_s"],
                     "class-steps/s": r["class_steps_per_s"],
                     "vs baseline": f"{base / r['median_s']:.2f}x" if base else ""})
    print(f"\nmatching step, CPU, allocator={ALLOCATOR} (IPC {IPC}, factor {FACTOR}, "
          f"ConvNet-3 width {WIDTH}, real 64, syn 128)")
    print(table(rows, ["variant", "median s/step", "class-steps/s", "vs baseline"]))
    payload = {"setup": {"dataset": "fashion-mnist", "ipc": IPC, "factor": FACTOR, "width": WIDTH,
                         "batch_real": 64, "batch_syn": 128, "allocator": ALLOCATOR,
                         "rounds": ROUNDS},
               "variants": {k: v for k, v in RESULTS.items() if k != "check"},
               "check": RESULTS.get("check")}
    if base and "engine" in RESULTS:
        payload["speedup_engine_vs_baseline"] = round(base / RESULTS["engine"]["median_s"], 3)
    path = update_results("matching-cpu.json", f"throughput_{ALLOCATOR}", payload)
    print(f"-> {path}")
