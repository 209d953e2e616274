"""GPU benchmarks of the Triton kernels and the matching step (docs/protocol.md, issues 5 and 13).

Each op against its reference (eager) and ``torch.compile`` of the reference, forward and
forward+backward (the fused block also with the double backward matching needs),
``triton.testing.do_bench`` medians, and the fraction of the measured device-to-device copy
bandwidth reached; then the matching step of the last segment at IPC 50 and 1000 (every frozen
image in the step) per backend and class batching: ms, class-steps/s, max memory allocated.

    python benchmarks/kernels.py [--out results/kernels-gpu.json] [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import machine, table  # noqa: E402

from dasm import io  # noqa: E402


def bench(fn, warmup=10, rep=50):
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")  # milliseconds


def copy_bandwidth(nbytes=2 ** 30):
    x = torch.empty(nbytes // 4, device="cuda")
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * nbytes / (ms * 1e-3) / 1e9  # GB/s (read + write)


def compiled(fn):
    try:
        return torch.compile(fn, dynamic=False)
    except Exception as e:  # noqa: BLE001
        print(f"torch.compile unavailable: {e}")
        return None


def time_variants(name, variants, nbytes, bw, rows, backward=None):
    """variants: label -> callable (forward); backward(label) -> callable for fwd+bwd or None."""
    for label, fn in variants.items():
        if fn is None:
            continue
        try:
            ms = bench(fn)
        except Exception as e:  # noqa: BLE001
            rows.append({"op": name, "variant": label, "pass": "fwd", "error": str(e)[:80]})
            continue
        rows.append({"op": name, "variant": label, "pass": "fwd", "ms": round(ms, 4),
                     "GB/s": round(nbytes / (ms * 1e-3) / 1e9, 1),
                     "of copy bw": f"{nbytes / (ms * 1e-3) / 1e9 / bw * 100:.0f}%"})
        if backward is not None:
            fb = backward(label)
            if fb is not None:
                try:
                    ms = bench(fb)
                    rows.append({"op": name, "variant": label, "pass": "fwd+bwd",
                                 "ms": round(ms, 4)})
                except Exception as e:  # noqa: BLE001
                    rows.append({"op": name, "variant": label, "pass": "fwd+bwd",
                                 "error": str(e)[:80]})


def bench_sample_scores(bw, rows, n=1 << 24, k=10):
    from dasm import ops
    from dasm.kernels import sample_scores as ks

    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(n, k, device="cuda").to(dtype)
        labels = torch.randint(0, k, (n,), device="cuda")
        ref = ops.reference("sample_scores")
        nbytes = logits.numel() * logits.element_size() + labels.numel() * 8 + 3 * n * 4
        time_variants(f"sample_scores {str(dtype)[6:]} N={n} K={k}",
                      {"eager": lambda: ref(logits, labels),
                       "compile": (lambda c: (lambda: c(logits, labels)))(compiled(ref)),
                       "triton": lambda: ks.sample_scores(logits, labels)}, nbytes, bw, rows)


def bench_grad_distance(bw, rows, classes=10):
    from dasm import ops
    from dasm.kernels import grad_distance as kd

    shapes = [(128, 1, 3, 3), (128, 128, 3, 3), (128, 128, 3, 3)]
    layout = ops.GradLayout.from_shapes(["a", "b", "c"], shapes)
    gr = torch.randn(classes, layout.numel, device="cuda")
    gs0 = torch.randn(classes, layout.numel, device="cuda")
    ref = ops.reference("grad_distance")
    for metric in ("l1", "mse", "cos"):
        gs = gs0.clone().requires_grad_()
        comp = compiled(lambda a, b: ref(a, b, layout, metric))
        impl = {"eager": lambda: ref(gr, gs, layout, metric),
                "compile": (lambda: comp(gr, gs)) if comp else None,
                "triton": lambda: kd.grad_distance(gr, gs, layout, metric)}

        def fb(label, impl=impl):
            f = impl.get(label)
            return None if f is None else (lambda: f().sum().backward())

        time_variants(f"grad_distance {metric} C={classes}", impl, 2 * gr.numel() * 4, bw, rows,
                      backward=fb)


def bench_decode_augment(bw, rows, stored_n=2048, factor=2, size=28):
    from dasm import dsa, ops
    from dasm.dsa import Strategy
    from dasm.kernels import decode_augment as kda

    g = torch.Generator().manual_seed(0)
    stored = torch.rand(stored_n, 1, size, size, device="cuda").requires_grad_()
    M = stored_n * factor * factor
    mean, std = torch.tensor([0.2861], device="cuda"), torch.tensor([0.353], device="cuda")
    ref = ops.reference("decode_augment")
    for strategy in ("color_crop_cutout", "color_crop_cutout_flip_scale_rotate"):
        p = dsa.draw(Strategy.parse(strategy), M, (size, size), g).to("cuda")
        comp = compiled(lambda x: ref(x, factor, None, p, mean, std))
        impl = {"eager": lambda: ref(stored, factor, None, p, mean, std),
                "compile": (lambda: comp(stored)) if comp else None,
                "triton": lambda: kda.decode_augment(stored, factor, None, p, mean, std)}

        def fb(label, impl=impl):
            f = impl.get(label)
            return None if f is None else (lambda: f().sum().backward())

        nbytes = stored.numel() * 4 + M * size * size * 4
        time_variants(f"decode_augment {strategy} M={M}", impl, nbytes, bw, rows, backward=fb)


def bench_block(bw, rows, n=512, c=128, size=28):
    """instance_norm_relu_pool: forward, fwd+bwd, and fwd+bwd+double backward (what matching
    runs); torch.compile has no double backward, so it is timed on the first two only."""
    from dasm import fused_block, ops
    from dasm.kernels import instance_norm_relu_pool as kb

    ref = ops.reference("instance_norm_relu_pool")
    z = torch.randn(n, c, size, size, device="cuda").requires_grad_()
    w = torch.rand(c, device="cuda").add_(0.5).requires_grad_()
    b = torch.randn(c, device="cuda").mul_(0.1).requires_grad_()
    comp = compiled(lambda z_, w_, b_: ref(z_, w_, b_, True, 1e-5))
    impl = {"eager": lambda: ref(z, w, b, True, 1e-5),
            "compile": (lambda: comp(z, w, b)) if comp else None,
            "triton": lambda: fused_block.instance_norm_relu_pool(z, w, b, True, 1e-5, kb)}

    def fb(label):
        f = impl.get(label)
        return None if f is None else (lambda: torch.autograd.grad(f().sum(), (z, w, b)))

    nbytes = z.numel() * 4 * 5 // 4  # read z, write the pooled output
    time_variants(f"instance_norm_relu_pool N={n} C={c} {size}x{size}", impl, nbytes, bw, rows,
                  backward=fb)
    v = torch.randn(n, c, size, size, device="cuda")
    for label in ("eager", "triton"):
        def fbb(f=impl[label]):
            out = f()
            gz, = torch.autograd.grad(out, (z,), torch.ones_like(out), create_graph=True)
            return torch.autograd.grad((gz * v).sum(), (z, w))
        try:
            rows.append({"op": f"instance_norm_relu_pool N={n} C={c} {size}x{size}",
                         "variant": label, "pass": "fwd+bwd+2bwd", "ms": round(bench(fbb), 4)})
        except Exception as e:  # noqa: BLE001
            rows.append({"op": "instance_norm_relu_pool", "variant": label,
                         "pass": "fwd+bwd+2bwd", "error": str(e)[:80]})


def bench_matching_step(rows, ipc=50, segment=50, width=128, steps=5,
                        variants=(("reference", "vmap"), ("auto", "vmap"),
                                  ("auto", "sequential"))):
    """One matching step of the last segment (``segment`` trainable, ``ipc - segment`` frozen
    stored images per class, every frozen image taking part): seconds, class-steps per second
    and ``torch.cuda.max_memory_allocated``, per (backend, class batching)."""
    from dasm import ops
    from dasm.config import load_config
    from dasm.data import load_dataset
    from dasm.matching import Matcher
    from dasm.rules import resolve

    root = os.environ.get("DASM_DATA_ROOT", "data")
    ds = load_dataset("fashion-mnist", root=root)
    out = {}
    for backend, batching in variants:
        cfg = resolve(load_config(None, [
            f"synthetic.ipc={ipc}", f"dasm.segments={ipc // segment}", f"model.width={width}",
            "device=cuda", "match.frozen_per_class=0", f"match.class_batching={batching}"]),
            ds.name, ds.image_size, True, ds.channels)
        ops.set_backend(backend)
        try:
            m = Matcher(cfg, ds, torch.device("cuda"), torch.Generator().manual_seed(0))
            model = m.new_network()
            nf = ipc - segment
            images = torch.rand(10, segment, 1, 28, 28, device="cuda")
            frozen = torch.rand(10, nf, 1, 28, 28, device="cuda") if nf else None
            mom = torch.zeros_like(images)
            draws = [m.draw(ds.class_index(), segment, nf) for _ in range(steps + 2)]
            for d in draws[:2]:
                m.step(model, d, images, mom, frozen)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            for d in draws[2:]:
                m.step(model, d, images, mom, frozen)
            torch.cuda.synchronize()
            sec = (time.perf_counter() - t) / steps
            out[(backend, batching)] = sec
            rows.append({"op": f"matching step IPC {ipc} (last segment {segment}) width {width}",
                         "variant": f"{backend}/{batching}", "pass": "step",
                         "ms": round(sec * 1e3, 2), "class-steps/s": round(10 / sec, 1),
                         "max MB": round(torch.cuda.max_memory_allocated() / 2 ** 20)})
        except Exception as e:  # noqa: BLE001
            rows.append({"op": f"matching step IPC {ipc}", "variant": f"{backend}/{batching}",
                         "pass": "step", "error": str(e)[:80]})
        finally:
            ops.set_backend(None)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="results/kernels-gpu.json")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA device; nothing measured")
        return 0
    rows = []
    bw = copy_bandwidth()
    print(f"device-to-device copy: {bw:.0f} GB/s on {torch.cuda.get_device_name()}", flush=True)
    bench_sample_scores(bw, rows, n=1 << (22 if a.quick else 24))
    bench_grad_distance(bw, rows)
    bench_decode_augment(bw, rows, stored_n=512 if a.quick else 2048)
    bench_block(bw, rows, n=128 if a.quick else 512)
    step = bench_matching_step(rows, steps=3 if a.quick else 5)
    best = min((v, k) for k, v in step.items() if k[0] == "auto")[1] if step else None
    if best:  # the last segment at IPC 1000, every frozen image in the step
        bench_matching_step(rows, ipc=1000, steps=2, variants=(("reference", "vmap"), best))
    cols = ["op", "variant", "pass", "ms", "GB/s", "of copy bw", "class-steps/s", "max MB",
            "error"]
    print(table(rows, cols))
    ref = step.get(("reference", "vmap"))
    payload = {"machine": machine(), "copy_bandwidth_GBps": round(bw, 1), "rows": rows,
               "matching_step_speedup": round(ref / step[best], 2) if ref and best else None}
    io.write_json(a.out, payload)  # atomic, like every results file
    print(f"-> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
